"""The metric-learning benchmarks as their archives extract, with the papers' class splits.

API (``name`` in DATASETS; ``collage`` is built by ``collage.CollageDataset`` instead):

- ``load_benchmark(name, root, *, train_transform=None, test_transform=None,
  num_train_classes=None, verify_images=True) -> BenchmarkData``: ``root`` is the folder the
  official archive was extracted into, or the archive's top folder itself (``~`` expanded).
  Transforms default to ``transforms.train_transform()`` / ``transforms.test_transform()``.
  Every image's header is read before it returns (``images.check_images``).
- ``BenchmarkData``: ``train``, ``query``, ``gallery`` (None: the query set is searched
  against itself, all against all; In-Shop has a gallery), ``recall_ks`` (the benchmark's
  usual Recall@K), ``describe()`` (classes and images per split, for results.json),
  ``differences_from_papers()`` (against ``PAPER_SPLITS``, the full archives' sizes).
- ``class_folds(labels, num_folds=4, seed=0)``: class-disjoint folds for cross-validation.
- ``subset(dataset, indices, transform=None)``: a dataset of those samples, classes
  renumbered 0-based, with the same attributes (paths, labels, class_names, num_classes).

Every dataset yields ``(image [3, S, S] float32, label int)``, labels 0-based within the split,
and has ``paths``, ``labels`` (LongTensor ``[n]``), ``class_names`` and ``num_classes``.

The modules: ``readers`` (the archives of cub, cars196, sop and inshop: ``LOADERS``, with one
module each, ``cub``, ``cars``, ``sop``, ``inshop``, and ``annotations``, the line-by-line
checks they share), ``images`` (image lists, and ``imagefolder``: ``root/<class>/<image>``, the
first half of the sorted classes train, or ``num_train_classes``), ``collage`` (the embedded data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import transforms
from .images import ImageFolderSplit, ImageListDataset, check_images, relabel
from .readers import LOADERS, check_root

DATASETS = ("collage", "imagefolder", "cub", "cars196", "sop", "inshop")
RECALL_KS = {
    "collage": (1, 2, 4, 8),
    "imagefolder": (1, 2, 4, 8),
    "cub": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}
# Classes and images per split of each full archive, as the papers use them (describe()'s keys).
PAPER_SPLITS = {
    "cub": {"train": {"classes": 100, "images": 5864}, "test": {"classes": 100, "images": 5924}},
    "cars196": {"train": {"classes": 98, "images": 8054}, "test": {"classes": 98, "images": 8131}},
    "sop": {"train": {"classes": 11318, "images": 59551}, "test": {"classes": 11316, "images": 60502}},
    "inshop": {"train": {"classes": 3997, "images": 25882}, "query": {"images": 14218}, "gallery": {"images": 12612}},
}


@dataclass
class BenchmarkData:
    """The splits of one benchmark: train on ``train``; evaluate ``query`` against ``gallery``,
    or against itself (each query excluded from its own neighbours) when gallery is None."""

    train: Dataset
    query: Dataset
    gallery: Dataset | None
    recall_ks: tuple[int, ...]
    name: str = ""

    def describe(self) -> dict:
        """Classes and images per split: {"train": {...}, "test": {...}} for all-against-all
        evaluation, {"train", "query", "gallery"} with a gallery. Classes counts the distinct
        labels present (a query and a gallery set share one numbering)."""
        splits = {"train": self.train}
        if self.gallery is None:
            splits["test"] = self.query
        else:
            splits.update(query=self.query, gallery=self.gallery)
        return {split: {"classes": len(torch.unique(dataset.labels)), "images": len(dataset)}
                for split, dataset in splits.items()}

    def differences_from_papers(self) -> list[str] | None:
        """How the splits differ from the papers' (``PAPER_SPLITS``): e.g. ["train images 9
        (the papers: 5864)"]; [] when they match, None for data without a paper split."""
        expected = PAPER_SPLITS.get(self.name)
        if expected is None:
            return None
        found = self.describe()
        return [f"{split} {key} {found[split][key]} (the papers: {value})"
                for split, sizes in expected.items() for key, value in sizes.items() if found[split][key] != value]


def load_benchmark(name: str, root, *, train_transform=None, test_transform=None,
                   num_train_classes: int | None = None, verify_images: bool = True) -> BenchmarkData:
    """The benchmark ``name`` (one of DATASETS but "collage") from its extracted archive at
    ``root``, split as the papers do. ``num_train_classes`` applies to ImageFolder trees only
    (the others have a fixed split). Missing images, or a folder without the layout, raise
    FileNotFoundError naming the files expected and where they were looked for; a malformed
    annotation line, an unknown value, an image listed twice or an image path that leaves the
    benchmark's folder (absolute, '..', a symbolic link out) LayoutError naming the file and
    the line (``readers.AnnotationError``); with ``verify_images``, every image's header is read
    (``images.check_images``) and one PIL cannot identify raises ImageReadError naming it."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "collage":
        raise ValueError("the collage data is built by collage.CollageDataset, not read from disk")
    if num_train_classes is not None and name != "imagefolder":
        raise ValueError(f"{name} has a fixed class split; num_train_classes applies to imagefolder only")
    root = check_root(root)
    train_tf = transforms.train_transform() if train_transform is None else train_transform
    test_tf = transforms.test_transform() if test_transform is None else test_transform
    if name == "imagefolder":
        train = ImageFolderSplit(root, "train", num_train_classes=num_train_classes, transform=train_tf)
        query, gallery = ImageFolderSplit(root, "test", num_train_classes=num_train_classes, transform=test_tf), None
    else:
        train, query, gallery = LOADERS[name](root, train_tf, test_tf)
    if verify_images:
        check_images([path for split in (train, query, gallery) if split is not None for path in split.paths])
    return BenchmarkData(train=train, query=query, gallery=gallery, recall_ks=RECALL_KS[name], name=name)


def class_folds(labels: Tensor, num_folds: int = 4, seed: int | None = 0) -> list[tuple[Tensor, Tensor]]:
    """Class-disjoint cross-validation folds: the classes (shuffled by ``seed``; in sorted
    order when seed is None) are cut into ``num_folds`` near-equal groups, and fold k
    validates on group k's samples and trains on the rest. -> [(train_indices, val_indices)],
    LongTensors into ``labels``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    classes = torch.unique(labels)  # sorted
    if not 2 <= num_folds <= len(classes):
        raise ValueError(f"need 2 <= num_folds <= {len(classes)} (the number of classes), got {num_folds}")
    if seed is not None:
        classes = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]
    folds = []
    for group in torch.tensor_split(classes, num_folds):
        in_fold = torch.isin(labels, group)  # [n]
        folds.append((torch.nonzero(~in_fold).flatten(), torch.nonzero(in_fold).flatten()))
    return folds


def held_out_classes(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train_indices, held_out_indices) into ``labels``: round(fraction x classes) classes (at
    least 1), drawn by ``seed``, held out whole; ValueError when that leaves fewer than 2
    classes to train on."""
    labels = torch.as_tensor(labels)
    classes = torch.unique(labels)
    count = max(1, round(fraction * len(classes)))
    if len(classes) - count < 2:
        raise ValueError(f"holding out {count} of the {len(classes)} training classes leaves {len(classes) - count} to train on "
                         f"(at least 2 are needed)")
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
    held_out = torch.isin(labels, classes[order[:count]])  # [n]
    return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()


class LabelledSubset(Dataset):
    """Some samples of a dataset without paths (e.g. CollageDataset), classes renumbered
    0-based, images optionally passed through ``transform``."""

    def __init__(self, dataset: Dataset, indices: Tensor, transform=None):
        self.dataset, self.indices, self.transform = dataset, indices, transform
        self.labels, classes = relabel(dataset.labels[indices].tolist())
        names = getattr(dataset, "class_names", None)
        self.class_names = [str(names[label]) if names is not None else str(label) for label in classes]
        self.paths = [dataset.paths[index] for index in indices.tolist()] if hasattr(dataset, "paths") else []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _ = self.dataset[int(self.indices[index])]
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])


def subset(dataset: Dataset, indices, transform=None) -> Dataset:
    """The samples ``indices`` of ``dataset`` as a dataset of their own, classes renumbered
    0-based (in the order of the original labels), with ``transform`` replacing the
    dataset's own (None keeps it): e.g. the test-time transform for a validation fold."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    if len(indices) == 0:
        raise ValueError("subset needs at least one index")
    if int(indices.min()) < 0 or int(indices.max()) >= len(dataset):
        raise ValueError(f"indices must lie in [0, {len(dataset)}), got [{int(indices.min())}, {int(indices.max())}]")
    if isinstance(dataset, ImageListDataset):
        original = dataset.labels[indices].tolist()
        classes = sorted(set(original))
        return ImageListDataset([dataset.paths[index] for index in indices.tolist()],
                                [dataset.class_names[label] for label in original],
                                dataset.transform if transform is None else transform,
                                classes=[dataset.class_names[label] for label in classes], check_files=False)
    return LabelledSubset(dataset, indices, transform)
