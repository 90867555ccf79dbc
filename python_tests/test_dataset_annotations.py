"""Every line of the benchmarks' annotation files is checked, pytorch-metric-learning's parsers
included (python_tests/dataset_fixtures.py's trees, one line damaged): an image path that
leaves the dataset folder ('..', absolute, a symbolic link out), a malformed line, an unknown
value, an id or an image given twice, a corrupt cars_annos.mat are LayoutErrors naming the file
and the line (number and text) in one line, and the CLI reports them with exit status 2; links
inside the folder, and a linked dataset folder, still load."""

import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torchvision")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("scipy")

import dataset_fixtures as fixtures

from gsp_kernels import cli
from gsp_kernels.training import transforms
from gsp_kernels.training.datasets import load_benchmark
from gsp_kernels.training.datasets.images import LayoutError
from gsp_kernels.training.datasets.readers import AnnotationError

SMALL = {"train_transform": transforms.train_transform(20), "test_transform": transforms.test_transform(24, 20)}
CUB_IMAGES, CUB_LABELS = "CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt"
SOP_TRAIN, SOP_TEST = "Stanford_Online_Products/Ebay_train.txt", "Stanford_Online_Products/Ebay_test.txt"
INSHOP_LIST = "Eval/list_eval_partition.txt"


def _sop_path(line, path):
    return " ".join(line.split()[:3] + [path])


def _csv_path(line, path):
    return ",".join([path] + line.split(",")[1:])


def _inshop_path(line, path):
    return " ".join([path] + line.split()[1:])


# layout: (dataset, writer, annotation file, line of the second train image, the line with another
# image path, the '..' that climbs from where the path is joined to the data root's parent)
TEXT_LAYOUTS = {
    "cub": ("cub", fixtures.write_cub, CUB_IMAGES, 2, lambda line, path: f"{line.split()[0]} {path}", "../../../"),
    "sop": ("sop", fixtures.write_sop, SOP_TRAIN, 3, _sop_path, "../../"),
    "cars_pml": ("cars196", fixtures.write_cars_pml, "anno_train.csv", 2, _csv_path, "../../../../../"),
    "inshop": ("inshop", fixtures.write_inshop, INSHOP_LIST, 4, _inshop_path, "../"),
}
LAYOUTS = [*TEXT_LAYOUTS, "cars_classic"]


def _outside_image(tmp_path):
    """A valid image outside the data root (tmp_path/data): a reader that followed a path to it would load."""
    return fixtures.write_image(tmp_path / "outside" / "x.jpg", 1, 0)


def _error(name, root) -> AnnotationError:
    with pytest.raises(LayoutError) as caught:
        load_benchmark(name, root, **SMALL)
    return caught.value


def _assert_names_the_line(error, path, number, text, unit="line", problem=""):
    message = str(error)
    assert isinstance(error, AnnotationError) and isinstance(error, ValueError), message
    assert "\n" not in message and message.startswith(f"{path}, {unit} {number}: "), message
    assert (error.path, error.line, error.text) == (str(path), number, text)
    assert repr(text) in message and problem in message, message


def _mat_entry(relative, class_id):
    return f"relative_im_path={relative!r}, class={class_id!r}"


def _with_entry(index, **values):
    """An edit for write_cars_classic: annotation ``index`` (0-based) with other values."""
    def edit(records):
        record = list(records[index])
        for key, value in values.items():
            record[fixtures.CARS_ANNOTATION_FIELDS.index(key)] = value
        return records[:index] + [tuple(record)] + records[index + 1:]
    return edit


@pytest.mark.parametrize("how", ["dotdot", "absolute", "etc_passwd", "symlink"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_image_path_out_of_the_dataset_folder_names_the_line(layout, how, tmp_path):
    outside = _outside_image(tmp_path)
    if layout == "cars_classic":
        name, unit, number, file = "cars196", "annotation", 2, tmp_path / "data" / "cars_annos.mat"
        target = {"dotdot": "../outside/x.jpg", "absolute": str(outside), "etc_passwd": "/etc/passwd"}.get(how)
        root = fixtures.write_cars_classic(tmp_path / "data", edit=None if target is None else _with_entry(1, relative_im_path=target))
        text = _mat_entry(target or "car_ims/000002.jpg", 1)
    else:
        name, writer, relative, number, replace, climb = TEXT_LAYOUTS[layout]
        root, unit = writer(tmp_path / "data"), "line"
        file = root / relative
        target = {"dotdot": f"{climb}outside/x.jpg", "absolute": str(outside), "etc_passwd": "/etc/passwd"}.get(how)
        original = file.read_text().split("\n")[number - 1]
        text = original if target is None else replace(original, target)
        fixtures.edit_line(file, number, text)
    if how == "symlink":  # the line unchanged, its image a link out of the folder
        image = load_benchmark(name, root, verify_images=False, **SMALL).train.paths[1]
        os.unlink(image)
        os.symlink(outside, image)
    problem = {"dotdot": "climbs out of", "absolute": "is absolute", "etc_passwd": "is absolute",
               "symlink": f"leads through a symbolic link to {outside}"}[how]
    _assert_names_the_line(_error(name, root), file, number, text, unit, problem)


def test_a_linked_folder_inside_pointing_out_is_refused(tmp_path):
    root = fixtures.write_cub(tmp_path / "data")
    folder = root / "CUB_200_2011" / "images" / "002.Bird_2"
    shutil.move(str(folder), str(tmp_path / "elsewhere"))
    os.symlink(tmp_path / "elsewhere", folder)
    lines = (root / CUB_IMAGES).read_text().split("\n")
    _assert_names_the_line(_error("cub", root), root / CUB_IMAGES, 4, lines[3], problem="symbolic link")


def test_an_annotation_file_linked_out_of_the_folder_is_refused(tmp_path):
    root = fixtures.write_cub(tmp_path / "data")
    listing = root / CUB_IMAGES
    shutil.move(str(listing), str(tmp_path / "images.txt"))
    os.symlink(tmp_path / "images.txt", listing)
    with pytest.raises(LayoutError, match=f"{listing} is a symbolic link to {tmp_path / 'images.txt'}, outside"):
        load_benchmark("cub", root, **SMALL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_linked_dataset_folder_and_links_inside_it_load(layout, tmp_path):
    name, writer = ("cars196", fixtures.write_cars_classic) if layout == "cars_classic" else TEXT_LAYOUTS[layout][:2]
    real = writer(tmp_path / "disk")
    top = {"cub": "CUB_200_2011", "sop": "Stanford_Online_Products"}.get(layout)
    (tmp_path / "data").mkdir()
    if top:  # the archive's folder linked into the data root
        os.symlink(real / top, tmp_path / "data" / top)
        root = tmp_path / "data"
    else:  # the data root itself a link
        root = tmp_path / "data" / "link"
        os.symlink(real, root)
    benchmark = load_benchmark(name, root, **SMALL)
    assert benchmark.describe() == fixtures.EXPECTED[name]
    image = benchmark.train.paths[1]  # a link to another image inside the folder is followed
    os.unlink(image)
    os.symlink(os.path.realpath(benchmark.train.paths[0]), image)
    assert load_benchmark(name, root, **SMALL).train.paths == benchmark.train.paths


def test_an_imagefolder_tree_follows_its_links(tmp_path):
    """ImageFolder trees have no annotation file and are often built of links: links are followed."""
    root = fixtures.write_imagefolder(tmp_path / "data")
    (root / "class_0" / "0.png").unlink()
    os.symlink(fixtures.write_image(tmp_path / "outside" / "0.png", 1, 0), root / "class_0" / "0.png")
    assert load_benchmark("imagefolder", root, **SMALL).describe() == fixtures.EXPECTED["imagefolder"]


# (layout, file, line, the line's new text (a function of the lines), what the message says)
MALFORMED = {
    "cub label not a number": ("cub", CUB_LABELS, 3, lambda lines: "3 abc", "class id 'abc' is not a whole number"),
    "cub class 0": ("cub", CUB_LABELS, 3, lambda lines: "3 0", "class id 0 is out of range"),
    "cub class 201": ("cub", CUB_LABELS, 3, lambda lines: "3 201", "class id 201 is out of range"),
    "cub label fields": ("cub", CUB_LABELS, 3, lambda lines: "3 1 7", "expected 2 fields 'image_id class_id', got 3"),
    "cub ids differ": ("cub", CUB_LABELS, 3, lambda lines: "4 1", "image id 4, but line 3 of"),
    "cub blank line": ("cub", CUB_LABELS, 3, lambda lines: "", "the line is blank"),
    "cub path with a space": ("cub", CUB_IMAGES, 3, lambda lines: "3 a b.jpg", "expected 2 fields 'image_id path', got 3"),
    "cub id not a number": ("cub", CUB_IMAGES, 3, lambda lines: "x a.jpg", "image id 'x' is not a whole number"),
    "cub id twice": ("cub", CUB_IMAGES, 3, lambda lines: "2 a.jpg", "image id 2 appears twice (first on line 2)"),
    "cub image twice": ("cub", CUB_IMAGES, 3, lambda lines: "3 " + lines[1].split()[1], "appears twice (first on line 2)"),
    "sop no header": ("sop", SOP_TRAIN, 1, lambda lines: lines[1], "expected the header 'image_id class_id super_class_id path'"),
    "sop fields": ("sop", SOP_TRAIN, 3, lambda lines: "2 1 2", "expected 4 fields"),
    "sop class not a number": ("sop", SOP_TRAIN, 3, lambda lines: "2 one 2 a.JPG", "class id 'one' is not a whole number"),
    "sop super class 13": ("sop", SOP_TRAIN, 3, lambda lines: "2 1 13 a.JPG", "super class id 13 is out of range"),
    "sop id twice": ("sop", SOP_TRAIN, 3, lambda lines: "1 1 2 a.JPG", "image id 1 appears twice (first on line 2)"),
    "sop image in both files": ("sop", SOP_TEST, 2, lambda lines: "7 11319 1 cabinet_final/111085122801_0.JPG",
                                "appears twice (first on Ebay_train.txt line 2)"),
    "cars fields": ("cars_pml", "anno_train.csv", 2, lambda lines: "00003.jpg,1,1,7,1", "expected 6 fields 'file,x1,y1,x2,y2,class'"),
    "cars class not a number": ("cars_pml", "anno_train.csv", 2, lambda lines: "00003.jpg,1,1,7,7,x", "class 'x' is not"),
    "cars class 197": ("cars_pml", "anno_train.csv", 2, lambda lines: "00003.jpg,1,1,7,7,197", "class 197 is out of range"),
    "cars class 0": ("cars_pml", "anno_train.csv", 2, lambda lines: "00003.jpg,1,1,7,7,0", "class 0 is out of range"),
    "cars box": ("cars_pml", "anno_train.csv", 2, lambda lines: "00003.jpg,a,1,7,7,1", "bounding box x1 'a' is not"),
    "cars image twice": ("cars_pml", "anno_train.csv", 2, lambda lines: lines[0], "appears twice (first on anno_train.csv line 1)"),
    "cars blank line": ("cars_pml", "anno_train.csv", 2, lambda lines: "", "the line is blank"),
    "inshop unknown status": ("inshop", INSHOP_LIST, 4, lambda lines: lines[3].replace("train", "trian"),
                              "unknown evaluation_status 'trian'"),
    "inshop fields": ("inshop", INSHOP_LIST, 4, lambda lines: lines[3] + " front", "rows need 3 columns"),
    "inshop image twice": ("inshop", INSHOP_LIST, 4, lambda lines: lines[2], "appears twice (first on line 3)"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_line_names_the_file_and_line(case, tmp_path):
    layout, relative, number, new, problem = MALFORMED[case]
    name, writer = TEXT_LAYOUTS[layout][:2]
    root = writer(tmp_path / "data")
    lines = (root / relative).read_text().split("\n")
    text = new(lines)
    fixtures.edit_line(root / relative, number, text)
    _assert_names_the_line(_error(name, root), root / relative, number, text, problem=problem)


def test_cub_files_of_different_lengths_name_the_extra_line(tmp_path):
    root = fixtures.write_cub(tmp_path / "data")
    fixtures.edit_line(root / CUB_LABELS, 18, None)  # the last of 18
    last = (root / CUB_IMAGES).read_text().split("\n")[17]
    _assert_names_the_line(_error("cub", root), root / CUB_IMAGES, 18, last,
                           problem="images.txt has 18 lines but image_class_labels.txt 17")


def test_cars_class_without_a_name_names_the_line(tmp_path):
    root = fixtures.write_cars_pml(tmp_path / "data")
    fixtures.edit_line(root / "names.csv", 1, "")
    line = (root / "anno_train.csv").read_text().split("\n")[0]
    _assert_names_the_line(_error("cars196", root), root / "anno_train.csv", 1, line,
                           problem=f"class 1, whose name (line 1 of {root / 'names.csv'}) is blank")


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
    root = fixtures.write_cub(tmp_path / "data")
    listing = root / CUB_IMAGES
    data = listing.read_bytes().split(b"\n")
    data[2] = b"3 caf\xe9.jpg"
    listing.write_bytes(b"\n".join(data))
    _assert_names_the_line(_error("cub", root), listing, 3, "3 caf\ufffd.jpg", problem="byte 0xe9 is not UTF-8 text")


@pytest.mark.parametrize("class_value, shown", [(0, "0"), (197, "197"), (1.5, "1.5"), (float("nan"), "nan")])
def test_a_cars_annotation_with_a_bad_class_names_its_entry(class_value, shown, tmp_path):
    root = fixtures.write_cars_classic(tmp_path / "data", edit=_with_entry(2, **{"class": class_value}))
    error = _error("cars196", root)
    assert f"class {shown} is not a class id 1-196" in str(error)
    assert error.line == 3 and str(error).startswith(f"{root / 'cars_annos.mat'}, annotation 3: ")


def test_a_cars_annotation_without_a_path_or_twice_names_its_entry(tmp_path):
    root = fixtures.write_cars_classic(tmp_path / "data", edit=_with_entry(2, relative_im_path=5))
    _assert_names_the_line(_error("cars196", root), root / "cars_annos.mat", 3, "relative_im_path=[[5]], class=1",
                           "annotation", "relative_im_path is not one string")
    root = fixtures.write_cars_classic(tmp_path / "twice", edit=_with_entry(2, relative_im_path="car_ims/000001.jpg"))
    _assert_names_the_line(_error("cars196", root), root / "cars_annos.mat", 3, _mat_entry("car_ims/000001.jpg", 1),
                           "annotation", "appears twice (first on annotation 1)")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_cars_annos_mat_is_a_layout_error_naming_it(damage, tmp_path):
    root = fixtures.write_cars_classic(tmp_path / "data")
    mat = root / "cars_annos.mat"
    data = mat.read_bytes()
    mat.write_bytes({"garbage": b"not a MATLAB file " * 20, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    with pytest.raises(LayoutError, match=f"^{mat} cannot be read as a MATLAB file .*: it should be the classic release's"):
        load_benchmark("cars196", root, **SMALL)


def test_the_cli_reports_a_bad_line_in_one_line_with_status_2(tmp_path, capsys):
    root = fixtures.write_inshop(tmp_path / "data")
    listing = root / INSHOP_LIST
    fixtures.edit_line(listing, 4, listing.read_text().split("\n")[3].replace("train", "trian"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "inshop", "--data-root", str(root), "--arch", "smallcnn", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"gsp-kernels train: error: {listing}, line 4: unknown evaluation_status 'trian'"), err


def test_valid_trees_give_the_same_paths_as_before(tmp_path):
    """What the readers return for the valid fixtures is what pytorch-metric-learning's parsers
    (and the old joins) give: the checks add errors, not changes."""
    from pytorch_metric_learning.datasets import CUB, Cars196, StanfordOnlineProducts

    for name, writer, reader in (("cub", fixtures.write_cub, CUB), ("sop", fixtures.write_sop, StanfordOnlineProducts),
                                 ("cars196", fixtures.write_cars_pml, Cars196)):
        root = writer(tmp_path / name / "data")
        benchmark = load_benchmark(name, root, **SMALL)
        for split, dataset in (("train", benchmark.train), ("test", benchmark.query)):
            parsed = reader(root=str(root), split=split, download=False)
            assert dataset.paths == parsed.paths and dataset.class_names == [str(c) for c in sorted(set(parsed.labels))]
    root = fixtures.write_inshop(tmp_path / "inshop")
    rows = [line.split() for line in (root / INSHOP_LIST).read_text().splitlines()[2:]]
    benchmark = load_benchmark("inshop", root, **SMALL)
    assert benchmark.train.paths == [str(root / row[0]) for row in rows if row[2] == "train"]
    assert np.array_equal(benchmark.gallery.labels.numpy(), [int(row[1][3:]) - 4 for row in rows if row[2] == "gallery"])
