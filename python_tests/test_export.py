"""`gsp-kernels export` and ``gsp_kernels.export``: a trained model as an ONNX file of standard
operators and as a pt2 file, each run in a process that cannot import gsp_kernels (onnxruntime;
``torch.export.load``) on batches of 1 and 3 images (the batch axis is dynamic), matching the eager
model to 1e-4 relative error in float32; the CLI from a trained run's folder to the file; and a bad
--format, --opset or --output as one line with exit status 2."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("pytorch_metric_learning")

from test_train_files import _fails

import gsp_kernels
from gsp_kernels import cli
from gsp_kernels.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    export_pt2,
    exported_program,
)
from gsp_kernels.testing import rel_err
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.loading import EnsembleEmbeddingModel
from gsp_kernels.training.models import build_model, build_model_for
from gsp_kernels.training.run import train

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"width": 4, "embedding_dim": 8, "num_prototypes": 4, "class_embedding_dim": 4}
TOLERANCE = 1e-4
BATCHES = (1, 3)

# Runs a file in a process where `import gsp_kernels` fails, from a folder outside the repository:
# argv = kind (onnx or pt2), model file, images .npz (one array per batch), output .npz.
RUNNER = textwrap.dedent(
    """
    import sys
    sys.modules["gsp_kernels"] = None  # any import of the package now fails
    import numpy as np

    kind, model_path, images_path, output_path = sys.argv[1:]
    images = dict(np.load(images_path))
    if kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"], session.get_inputs()
        assert [o.name for o in session.get_outputs()] == ["embedding"], session.get_outputs()
        outputs = {name: session.run(["embedding"], {"images": batch})[0] for name, batch in images.items()}
    else:
        import torch

        module = torch.export.load(model_path).module()
        with torch.no_grad():
            outputs = {name: module(torch.from_numpy(batch)).numpy() for name, batch in images.items()}
    try:
        import gsp_kernels  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("gsp_kernels was importable")
    np.savez(output_path, **outputs)
    """
)


def run_without_package(kind: str, model_path, images: dict[str, np.ndarray], tmp_path) -> dict[str, np.ndarray]:
    """The file's embeddings of each batch, computed in a fresh process that cannot import gsp_kernels."""
    folder = tmp_path / "elsewhere"
    folder.mkdir(exist_ok=True)
    script, images_path, output_path = folder / "run.py", folder / "images.npz", folder / "outputs.npz"
    script.write_text(RUNNER)
    np.savez(images_path, **images)
    done = subprocess.run([sys.executable, str(script), kind, str(model_path), str(images_path), str(output_path)],
                          check=False, cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return dict(np.load(output_path))


def image_batches(size: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(4)
    return {f"b{batch}": torch.rand(batch, 3, size, size, generator=generator).numpy() for batch in BATCHES}


def assert_matches(model, outputs: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> None:
    """Each batch's embeddings within TOLERANCE (relative) of the eager model's (its own solver)."""
    with torch.no_grad():
        for name, batch in images.items():
            want = model(torch.from_numpy(batch)).embedding
            assert outputs[name].shape == tuple(want.shape)
            assert rel_err(torch.from_numpy(outputs[name]), want) <= TOLERANCE, name


def small_model(pooling: str, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model_for(TrainConfig(pooling=pooling, **SMALL, **settings), load_pretrained=False).eval()
    if pooling == "gsp":  # prototypes among the features, as k-center puts them: a sparse plan
        with torch.no_grad():
            model.head.init_prototypes_kcenter(model.trunk(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))))
    return model


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_onnx_runs_without_the_package_and_matches(pooling, tmp_path):
    model = small_model(pooling)
    path = export_onnx(model, tmp_path / "model.onnx", image_size=32)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    images = image_batches(32)
    assert_matches(model, run_without_package("onnx", path, images, tmp_path), images)


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_pt2_loads_without_the_package_and_matches(pooling, tmp_path):
    model = small_model(pooling)
    path = export_pt2(model, tmp_path / "model.pt2", image_size=32)
    images = image_batches(32)
    assert_matches(model, run_without_package("pt2", path, images, tmp_path), images)


def test_a_fixed_point_layer_keeps_its_solver(tmp_path):
    """fixed_point is already a fixed count: exported as it is, it matches the eager layer."""
    model = small_model("gsp")
    model.head.solver, model.head.max_iter = "fixed_point", 20
    path = export_pt2(model, tmp_path / "model.pt2", image_size=32)
    images = image_batches(32)
    assert_matches(model, run_without_package("pt2", path, images, tmp_path), images)


def test_an_ensemble_exports_its_concatenation(tmp_path):
    members = [small_model("gsp"), small_model("gap")]
    for member in members:
        member.config = TrainConfig(**SMALL)
    ensemble = EnsembleEmbeddingModel(members).eval()
    path = export_pt2(ensemble, tmp_path / "model.pt2", image_size=32)
    images = image_batches(32)
    assert_matches(ensemble, run_without_package("pt2", path, images, tmp_path), images)


def test_the_model_keeps_its_modes_and_settings():
    model = small_model("gsp").train()
    model.trunk[1].eval()  # a frozen BatchNorm inside a training model
    exported_program(model, image_size=32)
    assert model.training and not model.trunk[1].training
    assert (model.head.solver, model.head.max_iter, model.head.backend) == ("newton", None, "auto")


def test_a_layer_still_warming_up_is_refused():
    torch.manual_seed(0)
    model = build_model("smallcnn", "gsp", 8, width=4, num_prototypes=4, memory_size=8).eval()
    with pytest.raises(ValueError, match="still in its prototype warm-up"):
        exported_program(model, image_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("arch, size, backbone", [("resnet18", 64, {}), ("timm:vit_tiny_patch16_224", 32, {"depth": 1})])
def test_real_backbones_export(arch, size, backbone, tmp_path):
    """A torchvision CNN and a timm ViT (one block) with a GSP head, through ONNX."""
    pytest.importorskip("torchvision")
    if arch.startswith("timm"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(arch, "gsp", 16, num_prototypes=8, backbone_kwargs=backbone).eval()
    path = export_onnx(model, tmp_path / "model.onnx", image_size=size)
    images = image_batches(size)
    assert_matches(model, run_without_package("onnx", path, images, tmp_path), images)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny GSP run on the embedded collages: its folder."""
    folder = tmp_path_factory.mktemp("export") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**SMALL, epochs=1, collages_per_digit=1, batch_size=20, steps_per_epoch=2, progress=False,
                          output_dir=str(folder)))
    finally:
        torch.set_num_threads(previous)
    return folder


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_the_cli_exports_a_trained_run(kind, trained_run, tmp_path, capsys):
    output = tmp_path / f"model.{kind}"
    assert cli.main(["export", "--checkpoint", str(trained_run), "--format", kind, "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    assert not list(tmp_path.glob("*.partial"))
    model = gsp_kernels.load_model(trained_run)
    images = image_batches(32)  # the collages' size, the run's
    assert_matches(model, run_without_package(kind, output, images, tmp_path), images)


def test_cli_mistakes_are_one_line(trained_run, tmp_path, capsys):
    flags = ["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / "model.onnx")]
    assert "--format must be one of onnx, pt2, got 'tflite'" in _fails([*flags, "--format", "tflite"], capsys)
    message = _fails([*flags, "--format", "onnx", "--opset", "11"], capsys)
    assert "--opset 11" in message and "from 18" in message
    assert "--opset must be an integer, got 'abc'" in _fails([*flags, "--format", "onnx", "--opset", "abc"], capsys)
    assert "--opset applies to --format onnx" in _fails([*flags, "--format", "pt2", "--opset", "18"], capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = _fails(["export", "--checkpoint", str(trained_run), "--format", "pt2", "--output", str(blocker / "model.pt2")], capsys)
    assert "--output" in message and "cannot write" in message
    assert "is a folder" in _fails(["export", "--checkpoint", str(trained_run), "--format", "pt2", "--output", str(tmp_path)], capsys)
    message = _fails(["export", "--checkpoint", str(tmp_path / "missing"), "--format", "pt2", "--output", str(tmp_path / "m.pt2")], capsys)
    assert "no checkpoint" in message
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt2"))
