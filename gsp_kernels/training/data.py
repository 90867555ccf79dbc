"""Datasets for metric learning: the embedded collage data, ImageFolder-style benchmarks,
and a class-balanced batch sampler.

Both datasets split by class: the first classes train, the others test (unseen classes).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

TILE_SIZE = 16  # pixels per collage tile; a collage is 2x2 tiles
COLLAGE_SIZE = 2 * TILE_SIZE
TRAIN_DIGITS = (0, 1, 2, 3, 4)
TEST_DIGITS = (5, 6, 7, 8, 9)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def split_class_names(class_names: list[str], split: str, num_train_classes: int | None = None) -> list[str]:
    """Class-split rule of the benchmarks: the first half of the sorted classes train (or the
    first ``num_train_classes``), the rest test (CUB 100/100, Cars 98/98, SOP 11318/11316)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = sorted(class_names)
    cut = len(names) // 2 if num_train_classes is None else num_train_classes
    if not 0 < cut < len(names):
        raise ValueError(f"need 0 < num_train_classes < {len(names)} (classes found), got {cut}")
    return names[:cut] if split == "train" else names[cut:]


class ImageFolderSplit(Dataset):
    """``root/<class>/<image>`` benchmarks (CUB-200-2011, Cars196, SOP, In-Shop laid out by
    class) loaded with PIL, split by class with ``split_class_names``.

    Train images get a random resized crop and a horizontal flip; test images a resize of
    the shorter side to image_size * 8/7 and a centre crop. Output: ImageNet-normalized
    ``[3, image_size, image_size]`` float32 and a 0-based label within the split.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 224, num_train_classes: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"dataset root {str(root)!r} is not a directory")
        class_dirs = [entry.name for entry in root.iterdir() if entry.is_dir()]
        if len(class_dirs) < 2:
            raise ValueError(f"{str(root)!r} needs at least 2 class folders, found {len(class_dirs)}")
        self.class_names = split_class_names(class_dirs, split, num_train_classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {str(root)!r} for split {split!r}")
        self.labels = torch.tensor([label for _, label in self.samples])
        self.image_size = image_size
        self.train = split == "train"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def _crop(self, image):
        """PIL image -> square PIL crop of image_size (random resized crop + flip, or centre)."""
        from PIL import Image

        width, height = image.size
        if self.train:
            area = width * height * float(torch.empty(1).uniform_(0.16, 1.0))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
            crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
            crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
            left = int(torch.randint(0, width - crop_w + 1, (1,)))
            top = int(torch.randint(0, height - crop_h + 1, (1,)))
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
            if float(torch.rand(1)) < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            return image
        resize = round(self.image_size * 8 / 7)
        scale = resize / min(width, height)
        image = image.resize((max(resize, round(width * scale)), max(resize, round(height * scale))), Image.BILINEAR)
        left = (image.size[0] - self.image_size) // 2
        top = (image.size[1] - self.image_size) // 2
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            crop = self._crop(image.convert("RGB"))
        array = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (array - mean) / std, label


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``samples_per_class`` samples from each of ``batch_size // samples_per_class``
    random classes, grouped by class (so the zero-shot loss's halves hold different classes).

    With fewer classes than a batch needs, every class is drawn and the samples per class
    grow to fill the batch. Deterministic in (seed, epoch, rank): call ``set_epoch``. Under
    DDP each rank draws its own batches; an epoch has len(labels) // (batch_size * world_size)
    batches per rank.
    """

    def __init__(self, labels: Tensor, batch_size: int, samples_per_class: int = 4, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = torch.as_tensor(labels)
        if samples_per_class < 1 or batch_size < samples_per_class:
            raise ValueError(f"need 1 <= samples_per_class <= batch_size, got {samples_per_class} and {batch_size}")
        self.by_class = [torch.nonzero(labels == value).flatten() for value in torch.unique(labels)]
        num_classes = len(self.by_class)
        if num_classes < 2:
            raise ValueError(f"class-balanced batches need at least 2 classes, got {num_classes}")
        self.classes_per_batch = min(num_classes, max(2, batch_size // samples_per_class))
        self.samples_per_class = batch_size // self.classes_per_batch
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.num_batches = max(1, len(labels) // (self.batch_size * world_size))
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the rank, fixes the batch order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % (2**62))
        for _ in range(self.num_batches):
            classes = torch.randperm(len(self.by_class), generator=generator)[: self.classes_per_batch]
            batch = []
            for class_index in classes.sort().values.tolist():
                members = self.by_class[class_index]
                if len(members) >= self.samples_per_class:
                    picks = torch.randperm(len(members), generator=generator)[: self.samples_per_class]
                else:
                    picks = torch.randint(len(members), (self.samples_per_class,), generator=generator)
                batch.extend(members[picks].tolist())
            yield batch
