"""Tiny trees in each benchmark's official layout, for tests.

One writer per layout; each writes a few small generated images per class (PNG or JPEG,
varying sizes, every third one greyscale as some CUB images are) and the annotation files
in the archive's format, and returns the folder to pass as ``--data-root``:

- ``write_cub(root)``: ``root/CUB_200_2011/`` (images.txt, image_class_labels.txt,
  classes.txt, train_test_split.txt, images/<class>/<file>.jpg).
- ``write_cars_classic(root)``: ``root/cars_annos.mat`` and ``root/car_ims/<6 digits>.jpg``.
- ``write_cars_pml(root)``: names.csv, anno_train.csv, anno_test.csv and
  car_data/car_data/{train,test}/<class name>/<5 digits>.jpg (the Kaggle release).
- ``write_sop(root)``: ``root/Stanford_Online_Products/`` (Ebay_train.txt, Ebay_test.txt,
  Ebay_info.txt, <super class>_final/<product>_<n>.JPG).
- ``write_inshop(root)``: ``root/Eval/list_eval_partition.txt`` (or at ``root`` with
  ``eval_folder=False``) and ``root/img/<GENDER>/<category>/id_<8 digits>/<n>_<view>.jpg``.
- ``write_imagefolder(root)``: ``root/<class>/<n>.png``.
- ``edit_line(path, number, text)``: one line of an annotation file changed, to damage it;
  ``write_cars_classic(root, edit=...)`` and ``write_cars_annos`` do the same for cars_annos.mat.

Class ids are the archives' 1-based ids; the defaults straddle each split's boundary.
Each writer returns the root; ``EXPECTED`` holds the (train classes, train images) and
(test classes, test images) counts the defaults give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZES = ((8, 8), (20, 16), (13, 11), (16, 9))  # (width, height) cycled over images


def class_colour(class_id: int) -> np.ndarray:
    """The RGB colour ``[3]`` a class's images are drawn around (0-255)."""
    return np.array([(37 * class_id) % 256, (91 * class_id) % 256, (153 * class_id) % 256], dtype=np.float64)


def write_image(path: Path, class_id: int, index: int) -> Path:
    """A small image of ``class_colour(class_id)`` plus noise: PNG or JPEG by suffix, every
    third one greyscale (mode L)."""
    from PIL import Image

    width, height = SIZES[index % len(SIZES)]
    rng = np.random.default_rng([class_id, index])
    pixels = np.clip(class_colour(class_id) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if index % 3 == 2:
        image = image.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_cub(root, class_ids=(1, 2, 100, 101, 102, 200), images_per_class: int = 3) -> Path:
    """CUB-200-2011 as CUB_200_2011.tgz extracts, with only ``class_ids``."""
    folder = Path(root) / "CUB_200_2011"
    images, labels, classes, split = [], [], [], []
    image_id = 0
    for class_id in class_ids:
        name = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {name}")
        for index in range(images_per_class):
            image_id += 1
            relative = f"{name}/Bird_{class_id}_{index:04d}_{1000 + image_id}.jpg"
            write_image(folder / "images" / relative, class_id, index)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {index % 2}")
    for filename, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                            ("train_test_split.txt", split)):
        (folder / filename).write_text("\n".join(lines) + "\n")
    return Path(root)


def _car_name(class_id: int) -> str:
    return f"Make{class_id} Model C/V {2000 + class_id % 13}"  # a '/' as in "Ram C/V Cargo Van Minivan 2012"


CARS_CLASS_IDS = (1, 2, 98, 99, 100, 196)


CARS_ANNOTATION_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def write_cars_annos(path: Path, records: list[tuple], class_count: int) -> None:
    """cars_annos.mat with one annotation per record ``(relative_im_path, x1, y1, x2, y2,
    class, test)``: each value in its own MATLAB cell as the release stores them (ints as
    uint16 [1, 1], other numbers as they are), and ``class_names`` for ``class_count`` classes."""
    from scipy.io import savemat

    annotations = np.empty((1, len(records)), dtype=[(name, object) for name in CARS_ANNOTATION_FIELDS])
    for column, record in enumerate(records):
        numbers = tuple(np.array([[value]], dtype=np.uint16 if isinstance(value, int) else None) for value in record[1:])
        annotations[0, column] = (np.array([record[0]]), *numbers)
    class_names = np.empty((1, class_count), dtype=object)
    for class_id in range(1, class_count + 1):
        class_names[0, class_id - 1] = _car_name(class_id)
    savemat(path, {"annotations": annotations, "class_names": class_names})


def write_cars_classic(root, class_ids=CARS_CLASS_IDS, images_per_class: int = 3, edit=None) -> Path:
    """Stanford Cars' classic release: car_ims.tgz extracted next to cars_annos.mat (a struct
    array ``annotations`` with relative_im_path, bbox_x1..bbox_y2, class, test; and
    ``class_names``). The ``test`` flag alternates within every class, as in the release.
    ``edit(records) -> records``, when given, changes the annotations before they are written
    (``write_cars_annos``'s records), e.g. to damage one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    image_id = 0
    for class_id in class_ids:
        for index in range(images_per_class):
            image_id += 1
            relative = f"car_ims/{image_id:06d}.jpg"
            write_image(root / relative, class_id, index)
            records.append((relative, 1, 1, 7, 7, class_id, index % 2))
    write_cars_annos(root / "cars_annos.mat", records if edit is None else edit(records), max(class_ids))
    return root


def write_cars_pml(root, class_ids=CARS_CLASS_IDS, images_per_class: int = 3) -> Path:
    """Stanford Cars as distributed today (Kaggle's stanford-car-dataset-by-classes-folder):
    names.csv (one class name a line), anno_train.csv / anno_test.csv without a header
    (file,x1,y1,x2,y2,class), images under car_data/car_data/<split>/<name, '/' as '-'>/."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "names.csv").write_text("".join(f"{_car_name(class_id)}\n" for class_id in range(1, max(class_ids) + 1)))
    rows = {"train": [], "test": []}
    image_id = 0
    for class_id in class_ids:
        for index in range(images_per_class):
            image_id += 1
            split = "train" if index % 2 == 0 else "test"
            filename = f"{image_id:05d}.jpg"
            folder = root / "car_data" / "car_data" / split / _car_name(class_id).replace("/", "-")
            write_image(folder / filename, class_id, index)
            rows[split].append(f"{filename},1,1,7,7,{class_id}\n")
    for split, lines in rows.items():
        (root / f"anno_{split}.csv").write_text("".join(lines))
    return root


SOP_SUPER_CLASSES = ("bicycle", "cabinet", "chair")


def write_sop(root, train_classes: int = 3, test_classes: int = 3, images_per_class: int = 2) -> Path:
    """Stanford Online Products as Stanford_Online_Products.zip extracts: Ebay_{train,test,info}.txt
    with the header ``image_id class_id super_class_id path``; train classes 1..train_classes,
    test classes from 11319 (as in the release, where classes 11319-22634 test)."""
    folder = Path(root) / "Stanford_Online_Products"
    class_ids = {"train": range(1, train_classes + 1), "test": range(11319, 11319 + test_classes)}
    lines = {"train": [], "test": []}
    image_id = 0
    for split, ids in class_ids.items():
        for class_id in ids:
            super_id = class_id % len(SOP_SUPER_CLASSES) + 1
            for index in range(images_per_class):
                image_id += 1
                relative = f"{SOP_SUPER_CLASSES[super_id - 1]}_final/{111085122800 + class_id}_{index}.JPG"
                write_image(folder / relative, class_id, index)
                lines[split].append(f"{image_id} {class_id} {super_id} {relative}")
    header = "image_id class_id super_class_id path"
    for split in ("train", "test"):
        (folder / f"Ebay_{split}.txt").write_text("\n".join([header, *lines[split]]) + "\n")
    (folder / "Ebay_info.txt").write_text("\n".join([header, *lines["train"], *lines["test"]]) + "\n")
    return Path(root)


def write_inshop(root, train_items: int = 3, test_items: int = 3, eval_folder: bool = True) -> Path:
    """DeepFashion In-shop: list_eval_partition.txt (an image count line, the header
    ``image_name item_id evaluation_status``, then rows) and img/ with per-item folders.
    Each train item has 2 train images, each test item 1 query and 2 gallery images;
    ``eval_folder=False`` puts the list at the root instead of under Eval/."""
    root = Path(root)
    rows = []
    number = 0
    for status_items, statuses in ((train_items, ("train", "train")), (test_items, ("query", "gallery", "gallery"))):
        for _ in range(status_items):
            number += 1
            item = f"id_{number:08d}"
            gender = "WOMEN" if number % 2 else "MEN"
            for index, status in enumerate(statuses):
                relative = f"img/{gender}/Dresses/{item}/{index + 1:02d}_{index + 1}_{('front', 'side', 'back')[index]}.jpg"
                write_image(root / relative, number, index)
                rows.append(f"{relative:<60}{item:<16}{status}")
    listing = root / "Eval" if eval_folder else root
    listing.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), "image_name item_id evaluation_status", *rows]
    (listing / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def edit_line(path: Path, number: int, text: str | None) -> str:
    """Replace line ``number`` (1-based) of the text file ``path`` by ``text`` (None removes
    it); returns the line it replaced."""
    path = Path(path)
    lines = path.read_text().split("\n")
    old = lines[number - 1]
    lines[number - 1:number] = [] if text is None else [text]
    path.write_text("\n".join(lines))
    return old


def write_imagefolder(root, classes: int = 4, images_per_class: int = 2) -> Path:
    """``root/<class>/<n>.png`` with classes named class_0, class_1, ..."""
    root = Path(root)
    for class_index in range(classes):
        for index in range(images_per_class):
            write_image(root / f"class_{class_index}" / f"{index}.png", class_index + 1, index)
    return root


# (classes, images) per split with each writer's defaults
EXPECTED = {
    "cub": {"train": {"classes": 3, "images": 9}, "test": {"classes": 3, "images": 9}},
    "cars196": {"train": {"classes": 3, "images": 9}, "test": {"classes": 3, "images": 9}},
    "sop": {"train": {"classes": 3, "images": 6}, "test": {"classes": 3, "images": 6}},
    "inshop": {"train": {"classes": 3, "images": 6}, "query": {"classes": 3, "images": 3},
               "gallery": {"classes": 3, "images": 6}},
    "imagefolder": {"train": {"classes": 2, "images": 4}, "test": {"classes": 2, "images": 4}},
}
