"""CUB-200-2011: ``CUB_200_2011/{images.txt, image_class_labels.txt, images/}``; classes
1-100 train, 101-200 test. pytorch-metric-learning's ``CUB`` parses the two files, after
every line of both is checked here: ``image_id path`` and ``image_id class_id`` (class
1-200), the same image id on the same line of both, no id or image twice, every path inside
the dataset folder (``annotations.Containment``)."""

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

CUB_FOLDER = "CUB_200_2011"
CUB_CLASSES = 200
CUB_SPLITS = {"train": range(1, 101), "test": range(101, 201)}  # as pytorch-metric-learning's CUB splits


def read_cub(pml_root: Path) -> dict[str, list[tuple[str, int]]]:
    """{split: [(image path as pytorch-metric-learning joins it, class id)]} in file order,
    from ``pml_root/CUB_200_2011``'s images.txt and image_class_labels.txt, every line checked."""
    folder = pml_root / CUB_FOLDER
    guard = Containment(folder)
    images_path = guard.check_file(folder / "images.txt")
    labels_path = guard.check_file(folder / "image_class_labels.txt")
    images, labels = read_lines(images_path), read_lines(labels_path)
    ids, seen_paths = {}, {}
    splits = {split: [] for split in CUB_SPLITS}
    for number, (image_line, label_line) in enumerate(zip(images, labels), 1):
        image_field, relative = fields(image_line, images_path, number, ("image_id", "path"))
        image_id = integer(image_field, images_path, number, image_line, "image id")
        first_seen(image_id, ids, images_path, number, image_line, "image id")
        label_field, class_field = fields(label_line, labels_path, number, ("image_id", "class_id"))
        label_id = integer(label_field, labels_path, number, label_line, "image id")
        class_id = integer(class_field, labels_path, number, label_line, "class id", 1, CUB_CLASSES)
        if label_id != image_id:
            raise AnnotationError(labels_path, number, label_line,
                                  f"image id {label_id}, but line {number} of {images_path} is image {image_id}",
                                  "correct the line: the two files list the same images in the same order, one a line")
        joined = os.path.join(str(pml_root), CUB_FOLDER, "images", relative)  # as pytorch-metric-learning joins it
        guard.check(joined, relative, images_path, number, image_line)
        first_seen(repr(os.path.normpath(relative)), seen_paths, images_path, number, image_line, "image")
        splits["train" if class_id in CUB_SPLITS["train"] else "test"].append((joined, class_id))
    if len(images) != len(labels):
        longer, other = (images_path, labels_path) if len(images) > len(labels) else (labels_path, images_path)
        extra = min(len(images), len(labels))
        raise AnnotationError(longer, extra + 1, (images if longer == images_path else labels)[extra],
                              f"{longer.name} has {max(len(images), len(labels))} lines but {other.name} {extra}",
                              "the two files list the same images, one a line: remove the extra lines or restore the missing ones")
    return splits


def load_cub(root: Path, train_tf, test_tf):
    from pytorch_metric_learning.datasets import CUB

    required = ("images.txt", "image_class_labels.txt")
    pml_root = pml_folder(root, CUB_FOLDER, required, "cub (CUB-200-2011)")
    expected = read_cub(pml_root)
    source = str(pml_root / CUB_FOLDER / "images.txt")
    datasets = []
    for split, transform in (("train", train_tf), ("test", test_tf)):
        if not expected[split]:
            classes = CUB_SPLITS[split]
            raise no_images(source, split, f"classes {classes.start}-{classes.stop - 1}")
        datasets.append(from_pml(CUB, pml_root, split, transform, source, expected[split]))
    return datasets[0], datasets[1], None
