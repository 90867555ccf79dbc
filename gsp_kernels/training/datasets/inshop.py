"""DeepFashion In-shop: ``list_eval_partition.txt`` (under ``Eval/`` or at the root) and
``img/`` (at the root or under ``Img/``): train on ``train``, evaluate ``query`` against
``gallery``. Parsed here: an image count line, the header ``image_name item_id
evaluation_status``, then one row per image (blank lines aside): three fields, a status
train, query or gallery, no image twice, every path inside the dataset folder
(``annotations.Containment``)."""

from __future__ import annotations

import os
from pathlib import Path

from .annotations import AnnotationError, Containment, first_seen, locate, read_lines
from .images import ImageListDataset, LayoutError

INSHOP_FOLDER = "In-shop Clothes Retrieval Benchmark"
INSHOP_STATUSES = ("train", "query", "gallery")


def read_inshop_partition(path: Path) -> list[tuple[int, str, str, str, str]]:
    """(line number, line, image_name, item_id, evaluation_status) rows of
    list_eval_partition.txt, every row checked (its paths are checked by the caller, which
    knows where the images lie)."""
    lines = read_lines(path)
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise LayoutError(f"{path}: expected an image count on line 1 and the header "
                          f"'image_name item_id evaluation_status' on line 2")
    rows, seen = [], {}
    for number, line in enumerate(lines[2:], 3):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise AnnotationError(path, number, line, f"rows need 3 columns 'image_name item_id evaluation_status', "
                                  f"got {len(parts)}", "correct the row (an image name may not hold spaces)")
        name, item, status = parts
        if status not in INSHOP_STATUSES:
            raise AnnotationError(path, number, line, f"unknown evaluation_status {status!r}",
                                  f"it must be one of {', '.join(INSHOP_STATUSES)}")
        first_seen(repr(os.path.normpath(name)), seen, path, number, line, "image")
        rows.append((number, line, name, item, status))
    if not lines[0].strip().isdigit() or int(lines[0]) != len(rows):
        raise LayoutError(f"{path}: line 1 says {lines[0].strip()!r} images but {len(rows)} rows follow")
    return rows


def load_inshop(root: Path, train_tf, test_tf):
    candidates = []
    for base in (root, root / INSHOP_FOLDER):
        candidates += [base / "Eval", base]
    listing = locate(root, ("list_eval_partition.txt",), candidates, "inshop (DeepFashion In-shop)")
    # image names are relative to the folder holding img/: the benchmark's folder, or its Img/
    benchmark = listing.parent if listing.name == "Eval" else listing
    guard = Containment(benchmark)
    partition = guard.check_file(listing / "list_eval_partition.txt")
    rows = read_inshop_partition(partition)
    by_status = {status: [(name, item) for _, _, name, item, row_status in rows if row_status == status]
                 for status in INSHOP_STATUSES}
    empty = [status for status, entries in by_status.items() if not entries]
    if empty:
        raise LayoutError(f"{partition} has no {' / '.join(empty)} rows")
    image_bases = [benchmark, benchmark / "Img"]
    first_folder = Path(rows[0][2]).parts[0]
    image_base = next((base for base in image_bases if (base / first_folder).is_dir()), None)
    if image_base is None:
        raise FileNotFoundError(f"inshop: {partition} lists images under {first_folder}/, found no such folder in "
                                f"{' or '.join(str(base) for base in image_bases)}")
    for number, line, name, _, _ in rows:
        guard.check(str(image_base / name), name, partition, number, line)
    test_items = sorted({item for status in ("query", "gallery") for _, item in by_status[status]})

    def split(status, transform, classes=None):
        names, items = zip(*by_status[status])
        return ImageListDataset([image_base / name for name in names], list(items), transform, classes=classes,
                                source=str(partition))

    return split("train", train_tf), split("query", test_tf, test_items), split("gallery", test_tf, test_items)
