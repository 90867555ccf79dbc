"""An embedding model as a file that runs without this package: ONNX (standard operators only,
for onnxruntime and other runtimes) or pt2 (``torch.export``, loaded by ``torch.export.load``).

Both take ``images`` ``[B, 3, S, S]`` float32 with a dynamic batch axis B and give ``embedding``
``[B, E]`` (the model's ``GSPOutput.embedding``). While exporting, every ``GSP`` layer solves
through the reference with ``solver="unrolled"`` (a Newton layer takes the unrolled solve's
default steps, ``contract.UNROLLED_STEPS``; fixed_point keeps its fixed count): the trace holds
``gsp_kernels::gsp_pool``, which ``run_decompositions`` replaces by the reference's standard
tensor operations, so neither file names an op of this package (docs/export.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from .backends import reference
from .contract import GSPOptions
from .nn import GSP

FORMATS = ("onnx", "pt2")
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
# The ONNX exporter (torch.onnx, dynamo=True) writes opset 18 and converts up from it; it cannot
# write older opsets.
MIN_OPSET = 18
EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1; any other example keeps B dynamic


class EmbeddingOnly(nn.Module):
    """``model(images).embedding`` as the whole output: images ``[B, 3, S, S]`` -> ``[B, E]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).embedding


@contextlib.contextmanager
def unrolled_solve(model: nn.Module):
    """Inside, every ``GSP`` layer of ``model`` runs the reference backend with no data-dependent
    control flow: solver "newton" becomes "unrolled" at its default steps; afterwards each layer
    has its own settings back."""
    layers = [module for module in model.modules() if isinstance(module, GSP)]
    saved = [(layer.backend, layer.solver, layer.max_iter) for layer in layers]
    try:
        for layer in layers:
            layer.backend = "reference"
            if layer.solver == "newton":
                layer.solver, layer.max_iter = "unrolled", None
        yield model
    finally:
        for layer, (backend, solver, max_iter) in zip(layers, saved):
            layer.backend, layer.solver, layer.max_iter = backend, solver, max_iter


def _gsp_pool_decomposed(x, prototypes, transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision, backend):
    """``gsp_kernels::gsp_pool`` as the reference's tensor operations (the op's schema, any backend)."""
    options = GSPOptions(transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision)
    return reference.forward(x, prototypes, options)


def example_images(image_size: int) -> Tensor:
    """The images a trace runs on: ``[EXAMPLE_BATCH, 3, S, S]`` float32 in [0, 1)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    generator = torch.Generator().manual_seed(0)
    return torch.rand(EXAMPLE_BATCH, 3, image_size, image_size, generator=generator)


def check_ready(model: nn.Module) -> None:
    """ValueError for a ``GSP`` layer still in its prototype warm-up: it pools by averaging until a
    training forward fills its memory, a switch on a tensor that a trace cannot hold."""
    for name, layer in model.named_modules():
        if isinstance(layer, GSP) and layer.memory_size and not bool(layer.prototypes_ready):
            raise ValueError(
                f"the GSP layer {name or 'model'} is still in its prototype warm-up ({int(layer.memory_filled)} of "
                f"{layer.memory_size} embeddings stored; it pools by averaging): train it until its prototypes are "
                "picked, or export a GAP model"
            )


def exported_program(model: nn.Module, *, image_size: int) -> torch.export.ExportedProgram:
    """``model`` (images -> ``GSPOutput``) as a ``torch.export`` program of images ``[B, 3, S, S]``
    -> embedding ``[B, E]``, B dynamic, traced in eval mode on the CPU (the model keeps its own mode),
    with no op of this package."""
    images = example_images(image_size)
    check_ready(model)
    wrapped = EmbeddingOnly(model)
    modes = [(module, module.training) for module in model.modules()]
    try:
        with unrolled_solve(model.eval()):
            with torch.no_grad():
                # An eager forward first: it checks the model takes this size, and a GSP layer with
                # a prototype memory reads its ready flag here, which a trace could not.
                wrapped(images)
            batch = torch.export.Dim("batch")
            program = torch.export.export(wrapped, (images,), dynamic_shapes={INPUT_NAME: {0: batch}}, strict=False)
    finally:
        for module, training in modes:
            module.training = training
    # gsp_kernels::gsp_pool, registered by .ops (imported with .nn)
    return program.run_decompositions({torch.ops.gsp_kernels.gsp_pool.default: _gsp_pool_decomposed})


def export_pt2(model: nn.Module, path: str | Path, *, image_size: int) -> Path:
    """Write ``model`` as a pt2 file (``torch.export.save``): ``torch.export.load(path).module()``
    maps images ``[B, 3, S, S]`` to embeddings ``[B, E]`` with only torch installed. Returns the path."""
    path = Path(path)
    program = exported_program(model, image_size=image_size)
    with open(path, "wb") as file:  # a file object: torch.export.save warns of names not ending in .pt2
        torch.export.save(program, file)
    return path


def check_opset(opset: int | None) -> None:
    """ValueError unless ``opset`` is None (the exporter's default) or one the exporter writes and
    the installed onnx knows: ``MIN_OPSET`` up to ``onnx.defs.onnx_opset_version()``."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int from {MIN_OPSET} (the exporter's oldest) to {newest} (onnx "
                         f"{onnx.__version__}'s newest), got {opset!r}")


def _default_domain_opset(model) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int, opset: int | None = None) -> Path:
    """Write ``model`` as an ONNX file of standard operators: input ``images`` ``[batch, 3, S, S]``
    float32, output ``embedding`` ``[batch, E]``, weights inside (one file, so models up to ONNX's 2 GB);
    checked by ``onnx.checker``. ``opset``: None for the exporter's default (20 with torch 2.14).
    Needs onnx and onnxscript (the export extra). Returns the path."""
    import onnx

    check_opset(opset)
    path = Path(path)
    program = exported_program(model, image_size=image_size)
    onnx_program = torch.onnx.export(
        program, (example_images(image_size),), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        opset_version=opset, dynamic_shapes={INPUT_NAME: {0: "batch"}}, verbose=False,
    )
    written = _default_domain_opset(onnx_program.model_proto)
    if opset is not None and written != opset:
        raise ValueError(f"the ONNX exporter could not convert this model to opset {opset} (it wrote {written})")
    onnx_program.save(path, external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path
