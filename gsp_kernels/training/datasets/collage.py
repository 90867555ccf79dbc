"""The embedded data (``dataset="collage"``, the default and the demo's): ``CollageDataset(split)``,
2x2 collages of a handwritten digit (the class) and three nuisance textures; digits 0-4
train, 5-9 test.

Every sample is ``(image [3, 32, 32] float32, label int)``, labels 0-based within the split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

TILE_SIZE = 16  # pixels per collage tile; a collage is 2x2 tiles
COLLAGE_SIZE = 2 * TILE_SIZE
TRAIN_DIGITS = (0, 1, 2, 3, 4)
TEST_DIGITS = (5, 6, 7, 8, 9)


def _digit_tiles() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, upsampled to TILE_SIZE: ([n, T, T] in [0, 1], labels [n])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [n, 1, 8, 8]
    tiles = F.interpolate(small, size=(TILE_SIZE, TILE_SIZE), mode="bilinear", align_corners=False)[:, 0]
    return tiles.clamp(0, 1).numpy(), digits.target.astype(np.int64)


def _nuisance_tiles(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` texture tiles ``[count, 3, T, T]`` from a fixed distribution: half oriented
    colour stripes (random angle, frequency, phase, two colours), half smooth colour noise."""
    coords = np.arange(TILE_SIZE, dtype=np.float32)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")  # [T, T]
    angle = rng.uniform(0, math.pi, count)[:, None, None]
    frequency = rng.uniform(0.4, 1.6, count)[:, None, None]
    phase = rng.uniform(0, 2 * math.pi, count)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(frequency * (np.cos(angle) * cols + np.sin(angle) * rows) + phase)  # [count, T, T]
    color_a = rng.uniform(0, 1, (count, 3, 1, 1))
    color_b = rng.uniform(0, 1, (count, 3, 1, 1))
    stripes = color_a * wave[:, None] + color_b * (1 - wave[:, None])  # [count, 3, T, T]
    coarse = torch.from_numpy(rng.uniform(0, 1, (count, 3, 4, 4)).astype(np.float32))
    blobs = F.interpolate(coarse, size=(TILE_SIZE, TILE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1).numpy()
    use_stripes = (rng.uniform(0, 1, count) < 0.5)[:, None, None, None]
    return np.where(use_stripes, stripes, blobs).astype(np.float32)


class CollageDataset(Dataset):
    """Embedded metric-learning data: 2x2 collages of TILE_SIZE tiles, 3 x 32 x 32.

    One tile (at a random position) shows a handwritten digit (scikit-learn's digits) in a
    random bright ink on a random dark background: the digit is the class. The other three
    tiles are nuisance textures (stripes or smooth colour noise) from one fixed
    distribution, independent of the class. Train classes are digits 0-4 and test
    classes digits 5-9, so retrieval is evaluated on unseen classes; every source digit
    image is used in one split only. Labels are 0-based within the split.

    Attributes: images ``[n, 3, 32, 32]`` float32 in [0, 1], labels ``[n]``, class_tiles
    ``[n]`` (0..3, row-major position of the digit tile), digits ``[n]`` (the digit shown).
    """

    def __init__(self, split: str = "train", collages_per_digit: int | None = None, seed: int = 0, noise: float = 0.05):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if collages_per_digit is None:
            collages_per_digit = 2 if split == "train" else 1
        if collages_per_digit < 1:
            raise ValueError(f"collages_per_digit must be >= 1, got {collages_per_digit}")
        class_digits = TRAIN_DIGITS if split == "train" else TEST_DIGITS
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        tiles, targets = _digit_tiles()
        keep = np.isin(targets, class_digits)
        source = np.repeat(np.flatnonzero(keep), collages_per_digit)  # [n] index into tiles
        count = source.shape[0]
        ink = rng.uniform(0.6, 1.0, (count, 3, 1, 1))
        background = rng.uniform(0.0, 0.3, (count, 3, 1, 1))
        mask = tiles[source][:, None]  # [n, 1, T, T]
        digit_tiles = background * (1 - mask) + ink * mask  # [n, 3, T, T]
        nuisance = _nuisance_tiles(3 * count, rng).reshape(count, 3, 3, TILE_SIZE, TILE_SIZE)
        class_tiles = rng.integers(0, 4, count)
        images = np.empty((count, 3, COLLAGE_SIZE, COLLAGE_SIZE), dtype=np.float32)
        for position in range(4):
            top, left = (position // 2) * TILE_SIZE, (position % 2) * TILE_SIZE
            # nuisance slot for this position: positions after the digit tile shift down by one
            slot = np.where(position < class_tiles, position, position - 1).clip(0, 2)
            tile = np.where((class_tiles == position)[:, None, None, None], digit_tiles, nuisance[np.arange(count), slot])
            images[:, :, top : top + TILE_SIZE, left : left + TILE_SIZE] = tile
        images += rng.normal(0, noise, images.shape).astype(np.float32)
        self.images = torch.from_numpy(images.clip(0, 1))
        self.digits = torch.from_numpy(targets[source])
        self.labels = self.digits - min(class_digits)
        self.class_tiles = torch.from_numpy(class_tiles.astype(np.int64))
        self.class_names = [str(digit) for digit in class_digits]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

