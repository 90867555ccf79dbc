"""The four benchmarks' archive readers: each finds its files under the dataset root (the
folder the archive was extracted into, or the archive's top folder) and returns the
benchmark's splits as ``ImageListDataset``s, ``LOADERS[name](root, train_tf, test_tf) ->
(train, query, gallery or None)``.

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
"""

from __future__ import annotations

from pathlib import Path

from .images import ImageListDataset, LayoutError

CUB_FOLDER = "CUB_200_2011"
SOP_FOLDER = "Stanford_Online_Products"
CARS_KAGGLE_FOLDER = "stanford-car-dataset-by-classes-folder"  # the name of the archive it comes as
INSHOP_FOLDER = "In-shop Clothes Retrieval Benchmark"
CARS_TRAIN_CLASSES = range(1, 99)  # 1-based class ids 1..98 train, 99..196 test


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


def check_root(root) -> Path:
    """``root`` with ``~`` expanded; FileNotFoundError when it is not a directory."""
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


LOADERS = {"cub": _load_cub, "cars196": _load_cars, "sop": _load_sop, "inshop": _load_inshop}
