"""The metric-learning benchmarks as their archives extract, with the papers' class splits.

API (``name`` in DATASETS; ``collage`` is built by ``data.CollageDataset`` instead):

- ``load_benchmark(name, root, *, train_transform=None, test_transform=None,
  num_train_classes=None, verify_images=True) -> BenchmarkData``: ``root`` is the folder the
  official archive was extracted into, or the archive's top folder itself (``~`` expanded).
  Transforms default to ``data.train_transform()`` / ``data.test_transform()``. Every
  image's header is read before it returns (``data.check_images``).
- ``BenchmarkData``: ``train``, ``query``, ``gallery`` (None: the query set is searched
  against itself, all against all; In-Shop has a gallery), ``recall_ks`` (the benchmark's
  usual Recall@K), ``describe()`` (classes and images per split, for results.json),
  ``differences_from_papers()`` (against ``PAPER_SPLITS``, the full archives' sizes).
- ``class_folds(labels, num_folds=4, seed=0)``: class-disjoint folds for cross-validation.
- ``subset(dataset, indices, transform=None)``: a dataset of those samples, classes
  renumbered 0-based, with the same attributes (paths, labels, class_names, num_classes).

Every dataset yields ``(image [3, S, S] float32, label int)``, labels 0-based within the split,
and has ``paths``, ``labels`` (LongTensor ``[n]``), ``class_names`` and ``num_classes``.

Layouts and splits:

- ``cub``: ``CUB_200_2011/{images.txt, image_class_labels.txt, images/}``; classes 1-100
  train, 101-200 test (pytorch-metric-learning's ``CUB`` parses it).
- ``cars196``: the classic release (``cars_annos.mat`` next to ``car_ims/``, read with scipy;
  the ``test`` flag is ignored) or the layout distributed today (``names.csv``,
  ``anno_train.csv``, ``anno_test.csv``, ``car_data/car_data/{train,test}/<class>/``, parsed by
  pytorch-metric-learning's ``Cars196``); classes 1-98 train, 99-196 test.
- ``sop``: ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt}`` define the split
  (pytorch-metric-learning's ``StanfordOnlineProducts`` parses them).
- ``inshop``: ``list_eval_partition.txt`` (under ``Eval/`` or at the root) and ``img/``
  (at the root or under ``Img/``): train on ``train``, evaluate ``query`` against ``gallery``.
- ``imagefolder``: ``root/<class>/<image>``, the first half of the sorted classes train
  (or ``num_train_classes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import data
from .data import ImageFolderSplit, ImageListDataset, LayoutError, check_images, relabel

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
CUB_FOLDER = "CUB_200_2011"
SOP_FOLDER = "Stanford_Online_Products"
CARS_KAGGLE_FOLDER = "stanford-car-dataset-by-classes-folder"  # the name of the archive it comes as
INSHOP_FOLDER = "In-shop Clothes Retrieval Benchmark"
CARS_TRAIN_CLASSES = range(1, 99)  # 1-based class ids 1..98 train, 99..196 test


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


def _locate(root: Path, required: tuple[str, ...], folders: list[Path], layout: str) -> Path:
    """The first of ``folders`` holding every ``required`` file; FileNotFoundError naming the
    files expected and every folder searched otherwise."""
    for folder in folders:
        if all((folder / name).is_file() for name in required):
            return folder
    searched = "\n  ".join(str(folder) for folder in dict.fromkeys(folders))
    raise FileNotFoundError(f"{layout}: expected {', '.join(required)} in one of:\n  {searched}\n"
                            f"(the dataset root, {root}, should be the folder the archive was extracted into, "
                            f"or the archive's top folder)")


def _check_root(root) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} is not a directory")
    return root


def _pml_folder(root: Path, top_folder: str, required: tuple[str, ...], layout: str) -> Path:
    """The parent of ``top_folder`` for pytorch-metric-learning's readers, which join
    ``root/top_folder/...`` themselves: accepts the parent or the top folder itself."""
    folder = _locate(root, required, [root / top_folder, root], layout)
    if folder.name != top_folder:
        raise FileNotFoundError(f"{layout}: found {required[0]} in {folder}, but the folder must keep the archive's name "
                                f"{top_folder!r} (pytorch-metric-learning reads <root>/{top_folder}/)")
    return folder.parent


def _from_pml(reader, pml_root: Path, split: str, transform, source: str) -> ImageListDataset:
    """An ImageListDataset from one of pytorch-metric-learning's dataset classes, used only as
    a parser (paths and 1-based class ids): their __getitem__ neither converts greyscale images
    to RGB nor names the file it failed to read."""
    parsed = reader(root=str(pml_root), split=split, download=False)
    return ImageListDataset(parsed.paths, parsed.labels, transform, source=source)


def _load_cub(root: Path, train_tf, test_tf):
    from pytorch_metric_learning.datasets import CUB

    required = ("images.txt", "image_class_labels.txt")
    pml_root = _pml_folder(root, CUB_FOLDER, required, "cub (CUB-200-2011)")
    source = str(pml_root / CUB_FOLDER / "images.txt")
    return _from_pml(CUB, pml_root, "train", train_tf, source), _from_pml(CUB, pml_root, "test", test_tf, source), None


def _load_sop(root: Path, train_tf, test_tf):
    from pytorch_metric_learning.datasets import StanfordOnlineProducts

    required = ("Ebay_train.txt", "Ebay_test.txt")
    pml_root = _pml_folder(root, SOP_FOLDER, required, "sop (Stanford Online Products)")
    folder = pml_root / SOP_FOLDER
    train = _from_pml(StanfordOnlineProducts, pml_root, "train", train_tf, str(folder / "Ebay_train.txt"))
    test = _from_pml(StanfordOnlineProducts, pml_root, "test", test_tf, str(folder / "Ebay_test.txt"))
    return train, test, None


def _read_cars_annos(path: Path) -> tuple[list[str], list[int]]:
    """(relative image paths, 1-based classes) from the classic release's cars_annos.mat."""
    from scipy.io import loadmat

    annotations = loadmat(str(path)).get("annotations")
    fields = ("relative_im_path", "class")
    if annotations is None or annotations.dtype.names is None or not set(fields) <= set(annotations.dtype.names):
        raise LayoutError(f"{path} should hold a struct array 'annotations' with fields {fields}")
    relative = [str(entry.item()) for entry in annotations["relative_im_path"].ravel()]
    classes = [int(entry.item()) for entry in annotations["class"].ravel()]
    return relative, classes


def _load_cars(root: Path, train_tf, test_tf):
    classic = [root] + ([root.parent] if root.name == "car_ims" else [])
    try:
        folder = _locate(root, ("cars_annos.mat",), classic, "cars196 (classic release)")
    except FileNotFoundError as classic_error:
        try:
            folder = _locate(root, ("names.csv", "anno_train.csv", "anno_test.csv"), [root, root / CARS_KAGGLE_FOLDER],
                             "cars196 (names.csv layout)")
        except FileNotFoundError as csv_error:
            raise FileNotFoundError(f"{classic_error}\nnor\n{csv_error}") from None
        from pytorch_metric_learning.datasets import Cars196

        source = f"{folder / 'anno_train.csv'} and anno_test.csv"
        train = _from_pml(Cars196, folder, "train", train_tf, source)
        return train, _from_pml(Cars196, folder, "test", test_tf, source), None
    relative, classes = _read_cars_annos(folder / "cars_annos.mat")
    splits = []
    for is_train, transform in ((True, train_tf), (False, test_tf)):
        keep = [index for index, class_id in enumerate(classes) if (class_id in CARS_TRAIN_CLASSES) == is_train]
        splits.append(ImageListDataset([folder / relative[index] for index in keep], [classes[index] for index in keep],
                                       transform, source=str(folder / "cars_annos.mat")))
    return splits[0], splits[1], None


def _read_inshop_partition(path: Path) -> list[tuple[str, str, str]]:
    """(image_name, item_id, evaluation_status) rows of list_eval_partition.txt: a count line,
    a header line, then one row per image."""
    lines = path.read_text().splitlines()
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise LayoutError(f"{path}: expected an image count on line 1 and the header "
                          f"'image_name item_id evaluation_status' on line 2")
    rows = [tuple(line.split()) for line in lines[2:] if line.strip()]
    bad = [row for row in rows if len(row) != 3]
    if bad:
        raise LayoutError(f"{path}: rows need 3 columns, got {bad[0]!r}")
    if not lines[0].strip().isdigit() or int(lines[0]) != len(rows):
        raise LayoutError(f"{path}: line 1 says {lines[0].strip()!r} images but {len(rows)} rows follow")
    return rows


def _load_inshop(root: Path, train_tf, test_tf):
    candidates = []
    for base in (root, root / INSHOP_FOLDER):
        candidates += [base / "Eval", base]
    listing = _locate(root, ("list_eval_partition.txt",), candidates, "inshop (DeepFashion In-shop)")
    partition = listing / "list_eval_partition.txt"
    rows = _read_inshop_partition(partition)
    by_status = {status: [(name, item) for name, item, row_status in rows if row_status == status]
                 for status in ("train", "query", "gallery")}
    empty = [status for status, entries in by_status.items() if not entries]
    if empty:
        raise LayoutError(f"{partition} has no {' / '.join(empty)} rows")
    # image names are relative to the folder holding img/: the benchmark's folder, or its Img/
    benchmark = listing.parent if listing.name == "Eval" else listing
    image_bases = [benchmark, benchmark / "Img"]
    first_folder = Path(rows[0][0]).parts[0]
    image_base = next((base for base in image_bases if (base / first_folder).is_dir()), None)
    if image_base is None:
        raise FileNotFoundError(f"inshop: {partition} lists images under {first_folder}/, found no such folder in "
                                f"{' or '.join(str(base) for base in image_bases)}")
    test_items = sorted({item for status in ("query", "gallery") for _, item in by_status[status]})

    def split(status, transform, classes=None):
        names, items = zip(*by_status[status])
        return ImageListDataset([image_base / name for name in names], list(items), transform, classes=classes,
                                source=str(partition))

    return split("train", train_tf), split("query", test_tf, test_items), split("gallery", test_tf, test_items)


_LOADERS = {"cub": _load_cub, "cars196": _load_cars, "sop": _load_sop, "inshop": _load_inshop}


def load_benchmark(name: str, root, *, train_transform=None, test_transform=None,
                   num_train_classes: int | None = None, verify_images: bool = True) -> BenchmarkData:
    """The benchmark ``name`` (one of DATASETS but "collage") from its extracted archive at
    ``root``, split as the papers do. ``num_train_classes`` applies to ImageFolder trees only
    (the others have a fixed split). Missing images, or a folder without the layout, raise
    FileNotFoundError naming the files expected and where they were looked for; a malformed
    annotation file LayoutError; with ``verify_images``, every image's header is read
    (``data.check_images``) and one PIL cannot identify raises ImageReadError naming it."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "collage":
        raise ValueError("the collage data is built by data.CollageDataset, not read from disk")
    if num_train_classes is not None and name != "imagefolder":
        raise ValueError(f"{name} has a fixed class split; num_train_classes applies to imagefolder only")
    root = _check_root(root)
    train_tf = data.train_transform() if train_transform is None else train_transform
    test_tf = data.test_transform() if test_transform is None else test_transform
    if name == "imagefolder":
        train = ImageFolderSplit(root, "train", num_train_classes=num_train_classes, transform=train_tf)
        query, gallery = ImageFolderSplit(root, "test", num_train_classes=num_train_classes, transform=test_tf), None
    else:
        train, query, gallery = _LOADERS[name](root, train_tf, test_tf)
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
