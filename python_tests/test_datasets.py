"""The benchmark loaders on tiny trees in each archive's layout (python_tests/dataset_fixtures.py):
class splits, 0-based labels that match each image's class, top folder or parent accepted,
errors that name the files expected, missing and unreadable images by path; the papers'
transforms; class-disjoint folds and relabelled subsets."""

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("scipy")

import dataset_fixtures as fixtures
from PIL import Image

from gsp_kernels.training import transforms
from gsp_kernels.training.datasets import (
    DATASETS,
    PAPER_SPLITS,
    RECALL_KS,
    BenchmarkData,
    LabelledSubset,
    class_folds,
    load_benchmark,
    subset,
)
from gsp_kernels.training.datasets.collage import CollageDataset
from gsp_kernels.training.datasets.images import (
    ImageFolderSplit,
    ImageListDataset,
    ImageReadError,
    LayoutError,
    check_images,
)
from gsp_kernels.training.datasets.readers import CARS_KAGGLE_FOLDER
from gsp_kernels.training.samplers import ClassBalancedBatchSampler
from gsp_kernels.training.transforms import IMAGENET_MEAN, IMAGENET_STD

WRITERS = {
    "cub": ("cub", fixtures.write_cub),
    "cars_classic": ("cars196", fixtures.write_cars_classic),
    "cars_pml": ("cars196", fixtures.write_cars_pml),
    "sop": ("sop", fixtures.write_sop),
    "inshop": ("inshop", fixtures.write_inshop),
    "imagefolder": ("imagefolder", fixtures.write_imagefolder),
}
# the archives' 1-based class ids of each split with the writers' defaults
SPLIT_CLASSES = {
    "cub": (["1", "2", "100"], ["101", "102", "200"]),
    "cars196": (["1", "2", "98"], ["99", "100", "196"]),
    "sop": (["1", "2", "3"], ["11319", "11320", "11321"]),
    "inshop": (["id_00000001", "id_00000002", "id_00000003"], ["id_00000004", "id_00000005", "id_00000006"]),
    "imagefolder": (["class_0", "class_1"], ["class_2", "class_3"]),
}
SMALL = {"train_transform": transforms.train_transform(20), "test_transform": transforms.test_transform(24, 20)}


def _splits(benchmark):
    return [benchmark.train, benchmark.query] + ([benchmark.gallery] if benchmark.gallery is not None else [])


def _colour_class(path: str, candidates: list[int]) -> int | None:
    """The class id among ``candidates`` whose fixture colour is nearest the image's mean
    colour (None for greyscale images, which carry no colour)."""
    with Image.open(path) as image:
        if image.mode != "RGB":
            return None
        mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    distances = [np.abs(mean - fixtures.class_colour(class_id)).sum() for class_id in candidates]
    return candidates[int(np.argmin(distances))]


@pytest.mark.parametrize("layout", list(WRITERS))
def test_layout_loads_with_the_papers_split(layout, tmp_path):
    name, writer = WRITERS[layout]
    benchmark = load_benchmark(name, writer(tmp_path), **SMALL)
    assert benchmark.describe() == fixtures.EXPECTED[name]
    assert benchmark.recall_ks == RECALL_KS[name] and benchmark.name == name
    assert (benchmark.gallery is not None) == (name == "inshop")
    train_classes, test_classes = SPLIT_CLASSES[name]
    assert benchmark.train.class_names == train_classes and benchmark.query.class_names == test_classes
    for dataset in _splits(benchmark):
        assert dataset.labels.dtype == torch.long and len(dataset.paths) == len(dataset) == len(dataset.labels)
        assert set(dataset.labels.tolist()) <= set(range(dataset.num_classes))
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 20, 20) and image.dtype == torch.float32  # greyscale files come as RGB
            assert label == dataset.labels[index]
            # the label matches the image's content (its class colour) or its item folder
            if name in ("inshop", "imagefolder"):
                assert dataset.class_names[label] == dataset.paths[index].split("/")[-2]
            else:
                candidates = [int(class_id) for class_id in dataset.class_names]
                found = _colour_class(dataset.paths[index], candidates)
                assert found in (None, int(dataset.class_names[label]))
    assert all(len(set(dataset.labels.tolist())) == dataset.num_classes for dataset in (benchmark.train, benchmark.query))


def test_inshop_query_and_gallery_share_one_numbering(tmp_path):
    benchmark = load_benchmark("inshop", fixtures.write_inshop(tmp_path), **SMALL)
    query, gallery = benchmark.query, benchmark.gallery
    assert query.class_names == gallery.class_names
    for dataset in (query, gallery):
        for path, label in zip(dataset.paths, dataset.labels.tolist()):
            assert f"/{dataset.class_names[label]}/" in path
    assert sorted(set(query.labels.tolist())) == sorted(set(gallery.labels.tolist())) == [0, 1, 2]
    assert not set(query.paths) & set(gallery.paths)


def test_defaults_are_the_papers_transforms(tmp_path):
    benchmark = load_benchmark("cub", fixtures.write_cub(tmp_path))
    assert benchmark.train[0][0].shape == benchmark.query[0][0].shape == (3, 227, 227)


@pytest.mark.parametrize("layout, inner", [("cub", "CUB_200_2011"), ("sop", "Stanford_Online_Products"),
                                           ("cars_classic", "car_ims")])
def test_top_folder_or_its_parent(layout, inner, tmp_path):
    name, writer = WRITERS[layout]
    root = writer(tmp_path)
    assert load_benchmark(name, root / inner, **SMALL).describe() == load_benchmark(name, root, **SMALL).describe()


def test_cars_current_release_in_its_archive_folder_or_given_directly(tmp_path):
    folder = fixtures.write_cars_pml(tmp_path / CARS_KAGGLE_FOLDER)
    for given in (tmp_path, folder):
        assert load_benchmark("cars196", given, **SMALL).describe() == fixtures.EXPECTED["cars196"]


def test_home_folder_in_the_root_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fixtures.write_sop(tmp_path / "data")
    assert load_benchmark("sop", "~/data", **SMALL).describe() == fixtures.EXPECTED["sop"]


@pytest.mark.parametrize("eval_folder", [True, False])
def test_inshop_list_under_eval_or_at_the_root_and_archive_folder(eval_folder, tmp_path):
    root = fixtures.write_inshop(tmp_path / "In-shop Clothes Retrieval Benchmark", eval_folder=eval_folder)
    for given in (root, tmp_path):
        assert load_benchmark("inshop", given, **SMALL).describe() == fixtures.EXPECTED["inshop"]


def test_inshop_images_under_img_folder(tmp_path):
    root = fixtures.write_inshop(tmp_path)
    (root / "Img").mkdir()
    shutil.move(str(root / "img"), str(root / "Img" / "img"))
    assert load_benchmark("inshop", root, **SMALL).describe() == fixtures.EXPECTED["inshop"]


@pytest.mark.parametrize("name, expected", [
    ("cub", "images.txt"), ("sop", "Ebay_train.txt"), ("inshop", "list_eval_partition.txt"),
    ("cars196", "cars_annos.mat"), ("imagefolder", "class folders"),
])
def test_empty_folder_names_the_file_expected_and_where_it_looked(name, expected, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)) as caught:
        load_benchmark(name, tmp_path, **SMALL)
    message = str(caught.value)
    assert expected in message
    if name != "imagefolder":
        assert str(tmp_path) in message
    if name == "cars196":
        assert "names.csv" in message  # both releases are named
    if name == "cub":
        assert str(tmp_path / "CUB_200_2011") in message


def test_renamed_top_folder_is_reported(tmp_path):
    root = fixtures.write_cub(tmp_path)
    renamed = root / "birds"
    (root / "CUB_200_2011").rename(renamed)
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        load_benchmark("cub", renamed, **SMALL)


def test_missing_root_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_benchmark("cub", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_benchmark("cifar", tmp_path)
    with pytest.raises(ValueError, match="CollageDataset"):
        load_benchmark("collage", tmp_path)
    with pytest.raises(ValueError, match="fixed class split"):
        load_benchmark("cub", fixtures.write_cub(tmp_path), num_train_classes=2)
    assert "collage" in DATASETS and set(RECALL_KS) == set(DATASETS)


def test_imagefolder_num_train_classes(tmp_path):
    benchmark = load_benchmark("imagefolder", fixtures.write_imagefolder(tmp_path), num_train_classes=3, **SMALL)
    assert benchmark.train.class_names == ["class_0", "class_1", "class_2"] and benchmark.query.class_names == ["class_3"]


@pytest.mark.parametrize("layout", ["cub", "cars_classic", "cars_pml", "sop", "inshop"])
def test_missing_images_are_listed_by_path_when_built(layout, tmp_path):
    name, writer = WRITERS[layout]
    benchmark = load_benchmark(name, writer(tmp_path), **SMALL)
    gone = [benchmark.query.paths[0], benchmark.query.paths[-1]]
    for path in gone:
        (tmp_path / path).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        load_benchmark(name, tmp_path, **SMALL)
    message = str(caught.value)
    assert all(path in message for path in gone) and f"2 of the {len(benchmark.query)} images" in message


def test_many_missing_images_are_counted():
    paths = [f"/nonexistent/{index}.jpg" for index in range(12)]
    with pytest.raises(FileNotFoundError, match=r"(?s)12 of the 12 images listed in the list.*4.jpg\n  ... and 7 more"):
        ImageListDataset(paths, [0] * 12, source="the list")


@pytest.mark.parametrize("layout", list(WRITERS))
def test_an_undecodable_image_stops_the_load_and_is_named(layout, tmp_path):
    name, writer = WRITERS[layout]
    benchmark = load_benchmark(name, writer(tmp_path), **SMALL)
    broken = [benchmark.train.paths[-1], benchmark.query.paths[0]]
    for path in broken:
        with open(path, "wb") as handle:
            handle.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageReadError) as caught:
        load_benchmark(name, tmp_path, **SMALL)  # before any training step
    message = str(caught.value)
    assert message.startswith(f"2 of {sum(len(split) for split in _splits(benchmark))} images cannot be read")
    assert all(path in message for path in broken)
    load_benchmark(name, tmp_path, verify_images=False, **SMALL)  # found only when read


def test_split_sizes_against_the_papers(tmp_path):
    benchmark = load_benchmark("inshop", fixtures.write_inshop(tmp_path), **SMALL)
    assert benchmark.differences_from_papers() == ["train classes 3 (the papers: 3997)", "train images 6 (the papers: 25882)",
                                                   "query images 3 (the papers: 14218)", "gallery images 6 (the papers: 12612)"]
    folder = load_benchmark("imagefolder", fixtures.write_imagefolder(tmp_path / "folder"), **SMALL)
    assert folder.differences_from_papers() is None  # no paper split to compare with

    class Sized:  # a split with the papers' sizes, without the images
        def __init__(self, classes, images):
            self.labels = torch.arange(images) % classes

        def __len__(self):
            return len(self.labels)

    for name, splits in PAPER_SPLITS.items():
        parts = {split: Sized(sizes.get("classes", 3985), sizes["images"]) for split, sizes in splits.items()}
        full = BenchmarkData(train=parts["train"], query=parts.get("test", parts.get("query")), gallery=parts.get("gallery"),
                             recall_ks=RECALL_KS[name], name=name)
        assert full.differences_from_papers() == [], name
    assert PAPER_SPLITS["cub"]["train"] == {"classes": 100, "images": 5864}  # the first 5864 images, classes 1-100


def test_malformed_files_raise_layout_errors(tmp_path):
    root = fixtures.write_inshop(tmp_path)
    listing = root / "Eval" / "list_eval_partition.txt"
    listing.write_text("\n".join(listing.read_text().splitlines()[:2] + ["img/a.jpg id_1"]))
    with pytest.raises(LayoutError, match="rows need 3 columns"):
        load_benchmark("inshop", root, **SMALL)
    with pytest.raises(LayoutError, match="2 class folders"):
        ImageFolderSplit(fixtures.write_imagefolder(tmp_path / "one", classes=1))
    assert issubclass(LayoutError, ValueError)


def test_unreadable_image_names_its_path(tmp_path):
    benchmark = load_benchmark("sop", fixtures.write_sop(tmp_path), **SMALL)
    broken = benchmark.train.paths[1]
    with open(broken, "wb") as handle:
        handle.write(b"not an image at all")
    benchmark.train[0]  # the others still load
    with pytest.raises(ImageReadError, match=broken):
        benchmark.train[1]
    with pytest.raises(ImageReadError, match=f"1 of {len(benchmark.train)} images cannot be read:\n  {broken}"):
        check_images(benchmark.train.paths)
    check_images(benchmark.query.paths)


def test_malformed_annotation_files(tmp_path):
    root = fixtures.write_inshop(tmp_path / "inshop")
    listing = root / "Eval" / "list_eval_partition.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([lines[0], "image item status", *lines[2:]]))
    with pytest.raises(ValueError, match="image_name item_id evaluation_status"):
        load_benchmark("inshop", root, **SMALL)
    listing.write_text("\n".join(["99", *lines[1:]]))
    with pytest.raises(ValueError, match="99"):
        load_benchmark("inshop", root, **SMALL)
    no_gallery = [line for line in lines[2:] if not line.endswith("gallery")]
    listing.write_text("\n".join([str(len(no_gallery)), lines[1], *no_gallery]))
    with pytest.raises(ValueError, match="no gallery rows"):
        load_benchmark("inshop", root, **SMALL)
    listing.write_text("\n".join(lines))
    shutil.rmtree(root / "img")
    with pytest.raises(FileNotFoundError, match=r"under img/, found no such folder in .*inshop or .*Img"):
        load_benchmark("inshop", root, **SMALL)
    from scipy.io import savemat

    (tmp_path / "cars").mkdir()
    savemat(tmp_path / "cars" / "cars_annos.mat", {"class_names": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="relative_im_path"):
        load_benchmark("cars196", tmp_path / "cars", **SMALL)


def test_cars_classic_split_ignores_the_test_flag(tmp_path):
    from scipy.io import loadmat

    root = fixtures.write_cars_classic(tmp_path)
    annotations = loadmat(root / "cars_annos.mat")["annotations"][0]
    flags = {int(entry["test"].item()) for entry in annotations}
    assert flags == {0, 1}  # the fixture marks images of every class both ways
    benchmark = load_benchmark("cars196", root, **SMALL)
    assert len(benchmark.train) + len(benchmark.query) == len(annotations)
    # split by class (1-98 train, 99-196 test), every image of a class on its side whatever its flag
    assert benchmark.train.class_names == ["1", "2", "98"] and benchmark.query.class_names == ["99", "100", "196"]
    assert benchmark.describe() == fixtures.EXPECTED["cars196"]  # 9 images a side (by the flag: 12 and 6, all 6 classes in each)


def _constant_image(width, height, colour=(200, 40, 90)):
    return Image.new("RGB", (width, height), colour)


def test_transforms_shapes_and_normalization():
    expected = (torch.tensor([200, 40, 90]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for transform, size in ((transforms.train_transform(), 227), (transforms.test_transform(), 227), (transforms.test_transform(40, 31), 31)):
        out = transform(_constant_image(300, 200))
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="crop"):
        transforms.test_transform(200, 227)


def test_test_transform_is_a_centre_crop_of_the_short_side_resize():
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[:, 256:] = 255  # left half black, right half white
    out = transforms.test_transform(256, 128)(Image.fromarray(pixels))  # 512x256 -> centre 128x128
    left, right = out[:, :, :60], out[:, :, 68:]
    assert torch.allclose(left, left[:, :1, :1]) and torch.allclose(right, right[:, :1, :1])
    assert (right[:, 0, 0] > left[:, 0, 0]).all()
    torch.testing.assert_close(transforms.test_transform(256, 128)(Image.fromarray(pixels)), out)


def test_train_transform_flips_and_crops_randomly():
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255  # bright left half
    image = Image.fromarray(pixels)
    transform = transforms.train_transform(32)
    torch.manual_seed(0)
    sides = {bool(out[:, :, :4].mean() > out[:, :, -4:].mean()) for out in (transform(image) for _ in range(40))}
    assert sides == {True, False}


def test_image_folder_split_keeps_its_old_call(tmp_path):
    root = fixtures.write_imagefolder(tmp_path, classes=3)
    train = ImageFolderSplit(root, "train", image_size=24)
    test = ImageFolderSplit(root, "test", 24, None)
    assert train.class_names == ["class_0"] and test.class_names == ["class_1", "class_2"]
    assert train[0][0].shape == test[3][0].shape == (3, 24, 24)


@pytest.mark.parametrize("num_classes, num_folds", [(4, 4), (7, 4), (5, 2), (13, 3)])
def test_class_folds_are_class_disjoint_and_cover_everything(num_classes, num_folds):
    order = torch.randperm(3 * num_classes, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(num_classes).repeat_interleave(3)[order]
    folds = class_folds(labels, num_folds, seed=5)
    assert len(folds) == num_folds
    all_val = torch.cat([val for _, val in folds]).sort().values
    assert torch.equal(all_val, torch.arange(len(labels)))  # every sample validates exactly once
    sizes = []
    for train, val in folds:
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))
        assert not set(labels[train].tolist()) & set(labels[val].tolist())
        sizes.append(len(set(labels[val].tolist())))
    assert max(sizes) - min(sizes) <= 1
    again = class_folds(labels, num_folds, seed=5)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, again))
    other = class_folds(labels, num_folds, seed=6)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(folds, other)) or num_folds == num_classes


def test_class_folds_in_order_and_errors():
    labels = torch.tensor([3, 0, 1, 2, 0, 3, 1, 2])
    folds = class_folds(labels, 2, seed=None)
    assert set(labels[folds[0][1]].tolist()) == {0, 1} and set(labels[folds[1][1]].tolist()) == {2, 3}
    with pytest.raises(ValueError, match="num_folds"):
        class_folds(labels, 5)
    with pytest.raises(ValueError, match="num_folds"):
        class_folds(labels, 1)
    with pytest.raises(ValueError, match="1-D"):
        class_folds(labels[None], 2)


def test_subset_relabels_and_takes_a_transform(tmp_path):
    benchmark = load_benchmark("cub", fixtures.write_cub(tmp_path), **SMALL)
    train_idx, val_idx = class_folds(benchmark.train.labels, 3, seed=0)[1]
    val = subset(benchmark.train, val_idx, transform=transforms.test_transform(30, 26))
    fit = subset(benchmark.train, train_idx)
    assert val.paths == [benchmark.train.paths[i] for i in val_idx.tolist()]
    assert val.num_classes == 1 and set(val.labels.tolist()) == {0}
    assert fit.num_classes == 2 and set(fit.labels.tolist()) == {0, 1}
    for part, indices in ((val, val_idx), (fit, train_idx)):
        names = [benchmark.train.class_names[label] for label in benchmark.train.labels[indices].tolist()]
        assert [part.class_names[label] for label in part.labels.tolist()] == names
    assert val[0][0].shape == (3, 26, 26) and fit[0][0].shape == (3, 20, 20)
    sampler = ClassBalancedBatchSampler(fit.labels, batch_size=4, samples_per_class=2)
    assert all(len(set(fit.labels[batch].tolist())) == 2 for batch in sampler)
    with pytest.raises(ValueError, match="indices"):
        subset(benchmark.train, [len(benchmark.train)])
    with pytest.raises(ValueError, match="at least one"):
        subset(benchmark.train, [])


def test_subset_of_the_collage_data():
    collage = CollageDataset("test", 1)
    indices = torch.nonzero(collage.labels >= 3).flatten()
    part = subset(collage, indices, transform=lambda image: image * 2)
    assert isinstance(part, LabelledSubset) and part.num_classes == 2 and part.class_names == ["8", "9"]
    image, label = part[0]
    torch.testing.assert_close(image, collage[int(indices[0])][0] * 2)
    assert label == int(collage.labels[indices[0]]) - 3
