"""Stanford Online Products: ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt}``
define the split. pytorch-metric-learning's ``StanfordOnlineProducts`` parses them, after
every line is checked here: the header ``image_id class_id super_class_id path``, then four
fields a line (class 1-22634, super class 1-12), no image id twice in a file, no image twice
in the two, every path inside the dataset folder (``annotations.Containment``)."""

from __future__ import annotations

import os
from pathlib import Path

from .annotations import (
    AnnotationError,
    Containment,
    fields,
    first_seen,
    from_pml,
    integer,
    no_images,
    pml_folder,
    read_lines,
)

SOP_FOLDER = "Stanford_Online_Products"
SOP_CLASSES, SOP_SUPER_CLASSES = 22634, 12
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")


def read_sop(pml_root: Path) -> dict[str, list[tuple[str, int]]]:
    """{split: [(image path as pytorch-metric-learning joins it, class id)]} in file order,
    from ``pml_root/Stanford_Online_Products/Ebay_{train,test}.txt``, every line checked."""
    folder = pml_root / SOP_FOLDER
    guard = Containment(folder)
    seen_paths: dict = {}
    splits = {}
    for split in ("train", "test"):
        path = guard.check_file(folder / f"Ebay_{split}.txt")
        lines = read_lines(path)
        if not lines or lines[0].split() != list(SOP_HEADER):
            raise AnnotationError(path, 1, lines[0] if lines else "", f"expected the header '{' '.join(SOP_HEADER)}'",
                                  "the first line must be that header (pytorch-metric-learning skips the first line)")
        ids: dict = {}
        entries = splits[split] = []
        for number, line in enumerate(lines[1:], 2):
            id_field, class_field, super_field, relative = fields(line, path, number, SOP_HEADER)
            first_seen(integer(id_field, path, number, line, "image id"), ids, path, number, line, "image id")
            class_id = integer(class_field, path, number, line, "class id", 1, SOP_CLASSES)
            integer(super_field, path, number, line, "super class id", 1, SOP_SUPER_CLASSES)
            joined = os.path.join(str(pml_root), SOP_FOLDER, relative)  # as pytorch-metric-learning joins it
            guard.check(joined, relative, path, number, line)
            first_seen(repr(os.path.normpath(relative)), seen_paths, path, number, line, "image", f"{path.name} line {number}")
            entries.append((joined, class_id))
    return splits


def load_sop(root: Path, train_tf, test_tf):
    from pytorch_metric_learning.datasets import StanfordOnlineProducts

    required = ("Ebay_train.txt", "Ebay_test.txt")
    pml_root = pml_folder(root, SOP_FOLDER, required, "sop (Stanford Online Products)")
    expected = read_sop(pml_root)
    datasets = []
    for split, transform in (("train", train_tf), ("test", test_tf)):
        source = str(pml_root / SOP_FOLDER / f"Ebay_{split}.txt")
        if not expected[split]:
            raise no_images(source, split, "the lines after its header")
        datasets.append(from_pml(StanfordOnlineProducts, pml_root, split, transform, source, expected[split]))
    return datasets[0], datasets[1], None
