"""Image datasets on disk: images by path (``ImageListDataset``), ImageFolder trees
(``ImageFolderSplit``), and their checks.

- ``ImageListDataset(paths, class_ids, transform)``: images by path, 0-based labels; the four
  benchmarks (``readers.py``) are built from it. Attributes ``paths``, ``labels``
  (LongTensor ``[n]``), ``class_names``, ``num_classes``. Missing files raise
  FileNotFoundError when it is built, undecodable ones ImageReadError (naming the path)
  when read; ``check_images(paths)`` tries every header up front. ``LayoutError``: a
  folder or annotation file not in the layout expected.
- ``ImageFolderSplit(root, split)``: ``root/<class>/<image>``, first half of the sorted
  classes train, the rest test.
- ``relabel(class_ids)``: 0-based labels for per-image class identifiers.

Every dataset returns ``(image [3, S, S] float32, label int)`` with labels 0-based within
its split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import papers_resize, test_transform, train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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
        what = f"--num-train-classes {cut}" if num_train_classes is not None else f"{len(names)} class folder(s)"
        raise LayoutError(
            f"{what}: an ImageFolder tree needs at least one class for training and one for testing; found "
            f"{len(names)} class folder(s): set --num-train-classes between 1 and {len(names) - 1}"
            if len(names) > 1 else f"{what}: an ImageFolder tree needs at least two class folders, found {len(names)}"
        )
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
