"""Stanford Cars (cars196), classes 1-98 train, 99-196 test, in either release:

- the classic one: ``cars_annos.mat`` next to ``car_ims/``, read here with scipy (a struct
  array ``annotations`` with ``relative_im_path`` and ``class``; the ``test`` flag is
  ignored), every entry checked;
- the one distributed today (Kaggle's ``stanford-car-dataset-by-classes-folder``):
  ``names.csv``, ``anno_train.csv``, ``anno_test.csv`` and
  ``car_data/car_data/{train,test}/<class name>/``, parsed by pytorch-metric-learning's
  ``Cars196`` after every line is checked here (``file,x1,y1,x2,y2,class``, class 1-196 and
  named in names.csv).

Every image path must resolve inside the dataset folder (``annotations.Containment``) and
appear once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .annotations import (
    AnnotationError,
    Containment,
    fields,
    first_seen,
    from_pml,
    integer,
    locate,
    no_images,
    read_lines,
)
from .images import ImageListDataset, LayoutError

CARS_KAGGLE_FOLDER = "stanford-car-dataset-by-classes-folder"  # the name of the archive it comes as
CARS_CLASSES = 196
CARS_TRAIN_CLASSES = range(1, 99)  # 1-based class ids 1..98 train, 99..196 test
CSV_FIELDS = ("file", "x1", "y1", "x2", "y2", "class")


def _entry_text(relative, class_value) -> str:
    return f"relative_im_path={relative!r}, class={class_value!r}"


def _single(value, kinds: str):
    """The one element of a MATLAB cell ``value`` when its dtype kind is in ``kinds``, else None."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in kinds:
        return None
    return value.reshape(()).item()


def read_cars_annos(path: Path) -> tuple[list[str], list[int]]:
    """(relative image paths, 1-based classes) from the classic release's cars_annos.mat; a
    file scipy cannot read, or an entry without a path and a class 1-196, is a LayoutError."""
    from scipy.io import loadmat

    try:
        contents = loadmat(str(path))
    except MemoryError:
        raise
    except Exception as error:
        raise LayoutError(f"{path} cannot be read as a MATLAB file ({type(error).__name__}: {error}): it should be the "
                          f"classic release's cars_annos.mat; download or extract it again") from error
    annotations = contents.get("annotations")
    names = ("relative_im_path", "class")
    if annotations is None or annotations.dtype.names is None or not set(names) <= set(annotations.dtype.names):
        raise LayoutError(f"{path} should hold a struct array 'annotations' with fields {names}")
    relative, classes = [], []
    for number, (path_cell, class_cell) in enumerate(zip(annotations["relative_im_path"].ravel(),
                                                         annotations["class"].ravel()), 1):
        text, class_value = _single(path_cell, "U"), _single(class_cell, "iuf")
        class_shown = class_value if class_value is not None else np.asarray(class_cell).tolist()
        shown = _entry_text(text if text is not None else np.asarray(path_cell).tolist(), class_shown)
        if text is None:
            raise AnnotationError(path, number, shown, "relative_im_path is not one string",
                                  "each annotation names its image, e.g. 'car_ims/000001.jpg'", unit="annotation")
        if class_value is None or not np.isfinite(class_value) or class_value != int(class_value) \
                or not 1 <= class_value <= CARS_CLASSES:
            raise AnnotationError(path, number, shown, f"class {class_shown!r} is not a class id 1-196",
                                  "each annotation has one whole-number class id 1-196", unit="annotation")
        relative.append(text)
        classes.append(int(class_value))
    return relative, classes


def _load_classic(folder: Path, train_tf, test_tf):
    guard = Containment(folder)
    annos = guard.check_file(folder / "cars_annos.mat")
    relative, classes = read_cars_annos(annos)
    paths, seen = [], {}
    for number, (text, class_id) in enumerate(zip(relative, classes), 1):
        joined = folder / text
        guard.check(str(joined), text, annos, number, _entry_text(text, class_id), unit="annotation")
        first_seen(repr(os.path.normpath(text)), seen, annos, number, _entry_text(text, class_id), "image",
                   unit="annotation")
        paths.append(joined)
    splits = []
    for is_train, transform in ((True, train_tf), (False, test_tf)):
        keep = [index for index, class_id in enumerate(classes) if (class_id in CARS_TRAIN_CLASSES) == is_train]
        if not keep:
            raise no_images(str(annos), "train" if is_train else "test", "classes 1-98" if is_train else "classes 99-196")
        splits.append(ImageListDataset([paths[index] for index in keep], [classes[index] for index in keep],
                                       transform, source=str(annos)))
    return splits[0], splits[1], None


def read_cars_csv(folder: Path) -> dict[str, list[tuple[str, int]]]:
    """{split: [(image path as pytorch-metric-learning joins it, class id)]} as its Cars196
    reader orders them (anno_train.csv then anno_test.csv, by the class split), every line of
    names.csv, anno_train.csv and anno_test.csv checked."""
    guard = Containment(folder)
    names_path = guard.check_file(folder / "names.csv")
    names = [line.strip() for line in read_lines(names_path)]  # as pytorch-metric-learning reads them
    entries, seen = [], {}
    for split in ("train", "test"):
        path = guard.check_file(folder / f"anno_{split}.csv")
        for number, line in enumerate(read_lines(path), 1):
            parts = fields(line, path, number, CSV_FIELDS, ",")
            for name, value in zip(CSV_FIELDS[1:5], parts[1:5]):
                integer(value, path, number, line, f"bounding box {name}", 0)
            class_id = integer(parts[5], path, number, line, "class", 1, CARS_CLASSES)
            if class_id > len(names) or not names[class_id - 1]:
                problem = (f"class {class_id}, but {names_path} names {len(names)} classes" if class_id > len(names)
                           else f"class {class_id}, whose name (line {class_id} of {names_path}) is blank")
                raise AnnotationError(path, number, line, problem, f"line k of {names_path.name} names class k: restore it")
            relative = os.path.join("car_data", "car_data", split, names[class_id - 1].replace("/", "-"), parts[0])
            joined = os.path.join(str(folder), relative)  # as pytorch-metric-learning joins it
            guard.check(joined, relative, path, number, line)
            first_seen(repr(os.path.normpath(relative)), seen, path, number, line, "image", f"{path.name} line {number}")
            entries.append((joined, class_id))
    return {"train": [entry for entry in entries if entry[1] in CARS_TRAIN_CLASSES],
            "test": [entry for entry in entries if entry[1] not in CARS_TRAIN_CLASSES]}


def _load_csv_release(folder: Path, train_tf, test_tf):
    from pytorch_metric_learning.datasets import Cars196

    expected = read_cars_csv(folder)
    source = f"{folder / 'anno_train.csv'} and anno_test.csv"
    datasets = []
    for split, transform in (("train", train_tf), ("test", test_tf)):
        if not expected[split]:
            raise no_images(source, split, "classes 1-98" if split == "train" else "classes 99-196")
        datasets.append(from_pml(Cars196, folder, split, transform, source, expected[split]))
    return datasets[0], datasets[1], None


def load_cars(root: Path, train_tf, test_tf):
    classic = [root] + ([root.parent] if root.name == "car_ims" else [])
    try:
        folder = locate(root, ("cars_annos.mat",), classic, "cars196 (classic release)")
    except FileNotFoundError as classic_error:
        try:
            folder = locate(root, ("names.csv", "anno_train.csv", "anno_test.csv"), [root, root / CARS_KAGGLE_FOLDER],
                            "cars196 (names.csv layout)")
        except FileNotFoundError as csv_error:
            raise FileNotFoundError(f"{classic_error}\nnor\n{csv_error}") from None
        return _load_csv_release(folder, train_tf, test_tf)
    return _load_classic(folder, train_tf, test_tf)
