"""Datasets for metric learning: the embedded collage data, image lists and ImageFolder
trees, the papers' torchvision transforms, and a class-balanced batch sampler.

- ``CollageDataset(split)``: embedded data, digits 0-4 train, 5-9 test.
- ``ImageListDataset(paths, class_ids, transform)``: images by path, 0-based labels; the
  four benchmarks (``benchmarks.py``) are built from it. Attributes ``paths``, ``labels``
  (LongTensor ``[n]``), ``class_names``, ``num_classes``. Missing files raise
  FileNotFoundError when it is built, undecodable ones ImageReadError (naming the path)
  when read; ``check_images(paths)`` tries every header up front. ``LayoutError``: a
  folder or annotation file not in the layout expected.
- ``ImageFolderSplit(root, split)``: ``root/<class>/<image>``, first half of the sorted
  classes train, the rest test.
- ``train_transform(image_size=227)``, ``test_transform(resize=256, crop=227)``;
  ``papers_resize(crop)``: the test-time shorter side for a crop (256/227 of it).
- ``ClassBalancedBatchSampler(labels, batch_size, samples_per_class)``.

Every dataset returns ``(image [3, S, S] float32, label int)`` with labels 0-based within
its split.
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


def train_transform(image_size: int = 227):
    """The papers' training augmentation (torchvision): random-resized crop to ``image_size``
    (scale 0.16-1, aspect 3/4-4/3), horizontal flip, ImageNet normalization.
    PIL image -> ``[3, image_size, image_size]`` float32."""
    from torchvision import transforms

    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(resize: int = 256, crop: int = 227):
    """The papers' test preprocessing (torchvision): shorter side resized to ``resize``, centre
    crop of ``crop``, ImageNet normalization. PIL image -> ``[3, crop, crop]`` float32."""
    from torchvision import transforms

    if not 1 <= crop <= resize:
        raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


test_transform.__test__ = False  # a transform, not a pytest test, when imported into a test module


def papers_resize(crop: int) -> int:
    """The papers' test-time shorter side for a centre crop of ``crop``: 256/227 of it, rounded."""
    return round(crop * 256 / 227)


class ImageReadError(OSError):
    """An image file listed by a dataset could not be decoded; the message names the path."""


class LayoutError(ValueError):
    """A dataset folder or annotation file is not in the layout expected; the message names
    the file or folder and what was expected."""


def relabel(class_ids: list, classes: list | None = None) -> tuple[Tensor, list]:
    """0-based labels ``[n]`` for per-image class identifiers, in the order of ``classes``
    (default: the sorted distinct identifiers). -> (labels, classes)."""
    if classes is None:
        classes = sorted(set(class_ids))
    index = {name: position for position, name in enumerate(classes)}
    unknown = set(class_ids) - index.keys()
    if unknown:
        raise ValueError(f"class ids {sorted(unknown, key=str)[:5]} are not among the {len(classes)} classes given")
    return torch.tensor([index[name] for name in class_ids], dtype=torch.long), list(classes)


def _first_few(lines: list[str], count: int = 5) -> str:
    """The first ``count`` lines, indented, and how many more there are."""
    more = f"\n  ... and {len(lines) - count} more" if len(lines) > count else ""
    return "".join(f"\n  {line}" for line in lines[:count]) + more


def report_missing_files(paths: list[str], source: str) -> None:
    """Raise FileNotFoundError naming the first few of ``paths`` that are not files (and how
    many are missing); ``source`` says where the list came from."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} images listed in {source} are missing:"
                                f"{_first_few(missing)}")


def _header_error(path: str) -> str | None:
    """"path: reason" when PIL cannot identify the image at ``path`` from its header, else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some broken headers
        return f"{path}: {error}"
    return None


def check_images(paths: list[str], threads: int = 16) -> None:
    """Open every image's header with PIL (``Image.verify``, no decoding of the pixels; on
    ``threads`` threads) and raise ImageReadError naming the first few that fail, and how
    many: the check ``load_benchmark`` runs, so a bad file stops a run before training rather
    than in the middle of an epoch. (A file cut short after a valid header is only found
    when it is decoded; ``ImageListDataset`` then names it.)"""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        failures = [failure for failure in pool.map(_header_error, paths, chunksize=64) if failure is not None]
    if failures:
        raise ImageReadError(f"{len(failures)} of {len(paths)} images cannot be read:{_first_few(failures)}")


class ImageListDataset(Dataset):
    """Images given by path with a class identifier each: ``(image, label)`` with the image
    read by PIL as RGB and passed through ``transform`` (default: ``[3, H, W]`` in [0, 1]).

    Labels are 0-based in the order of ``classes`` (default: the sorted distinct ids), so a
    query and a gallery set can share one numbering. Every path is checked to be a file when
    the dataset is built (``check_files``); a file that PIL cannot decode raises
    ImageReadError naming it. Attributes: paths, labels ``[n]`` (LongTensor), class_names,
    num_classes, transform.
    """

    def __init__(self, paths: list, class_ids: list, transform=None, *, classes: list | None = None,
                 source: str = "the dataset", check_files: bool = True):
        if len(paths) != len(class_ids):
            raise ValueError(f"{len(paths)} paths but {len(class_ids)} class ids")
        if not paths:
            raise ValueError(f"no images in {source}")
        self.paths = [str(path) for path in paths]
        if check_files:
            report_missing_files(self.paths, source)
        self.labels, classes = relabel(list(class_ids), classes)
        self.class_names = [str(name) for name in classes]
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ImageReadError(f"cannot read image {path}: {error}") from error
        if self.transform is None:
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1), int(self.labels[index])
        return self.transform(image), int(self.labels[index])


def split_class_names(class_names: list[str], split: str, num_train_classes: int | None = None) -> list[str]:
    """Class-split rule of ImageFolder trees: the first half of the sorted classes train (or
    the first ``num_train_classes``), the rest test."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = sorted(class_names)
    cut = len(names) // 2 if num_train_classes is None else num_train_classes
    if not 0 < cut < len(names):
        raise ValueError(f"need 0 < num_train_classes < {len(names)} (classes found), got {cut}")
    return names[:cut] if split == "train" else names[cut:]


class ImageFolderSplit(ImageListDataset):
    """``root/<class>/**/<image>`` trees (listed by torchvision's ``make_dataset``), split by
    class with ``split_class_names``: ``(image, 0-based label within the split)``.

    ``transform`` defaults to ``train_transform(image_size)`` for the train split and
    ``test_transform(papers_resize(image_size), image_size)`` for the test split.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 224,
                 num_train_classes: int | None = None, transform=None):
        from torchvision.datasets.folder import make_dataset

        root = Path(root)
        if not root.is_dir():
            raise LayoutError(f"dataset root {str(root)!r} is not a directory")
        class_dirs = [entry.name for entry in root.iterdir() if entry.is_dir()]
        if len(class_dirs) < 2:
            raise LayoutError(f"{str(root)!r} needs at least 2 class folders, found {len(class_dirs)}")
        names = split_class_names(class_dirs, split, num_train_classes)
        samples = make_dataset(root, {name: index for index, name in enumerate(names)}, IMAGE_EXTENSIONS, allow_empty=True)
        if not samples:
            raise LayoutError(f"no images with extensions {IMAGE_EXTENSIONS} under {str(root)!r} for split {split!r}")
        if transform is None:
            if split == "train":
                transform = train_transform(image_size)
            else:
                transform = test_transform(papers_resize(image_size), image_size)
        super().__init__([path for path, _ in samples], [names[index] for _, index in samples], transform,
                         source=f"the class folders of {root}")


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``samples_per_class`` samples from each of ``batch_size // samples_per_class``
    random classes, grouped by class (so the zero-shot loss's halves hold different classes).

    With fewer classes than a batch needs, every class is drawn and the samples per class
    grow to fill the batch. Deterministic in (seed, epoch): call ``set_epoch``. Under DDP
    (``world_size`` ranks) every rank draws the same global step of ``world_size`` batches
    and keeps its own: the ranks' classes in one step are disjoint. An epoch has
    ``num_batches`` steps (default len(labels) // (batch_size * world_size)).
    """

    def __init__(self, labels: Tensor, batch_size: int, samples_per_class: int = 4, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_batches: int | None = None):
        labels = torch.as_tensor(labels)
        if samples_per_class < 1 or batch_size < samples_per_class:
            raise ValueError(f"need 1 <= samples_per_class <= batch_size, got {samples_per_class} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 (or None), got {num_batches}")
        self.by_class = [torch.nonzero(labels == value).flatten() for value in torch.unique(labels)]
        num_classes = len(self.by_class)
        if num_classes < 2 * world_size:
            raise ValueError(f"class-balanced batches need at least 2 classes per rank, got {num_classes} classes for {world_size} rank(s)")
        self.classes_per_batch = min(num_classes // world_size, max(2, batch_size // samples_per_class))
        self.samples_per_class = batch_size // self.classes_per_batch
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.num_batches = num_batches or max(1, len(labels) // (self.batch_size * world_size))
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, fixes the batch order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        # One generator for every rank (the 0 keeps the single-process order of earlier versions).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, 0)) % (2**62))
        per_rank = self.classes_per_batch
        for _ in range(self.num_batches):
            drawn = torch.randperm(len(self.by_class), generator=generator)[: per_rank * self.world_size]
            for rank in range(self.world_size):  # every rank's picks, so the generator stays in step
                batch = []
                for class_index in drawn[rank * per_rank : (rank + 1) * per_rank].sort().values.tolist():
                    members = self.by_class[class_index]
                    if len(members) >= self.samples_per_class:
                        picks = torch.randperm(len(members), generator=generator)[: self.samples_per_class]
                    else:
                        picks = torch.randint(len(members), (self.samples_per_class,), generator=generator)
                    batch.extend(members[picks].tolist())
                if rank == self.rank:
                    mine = batch
            yield mine
