"""The `triton` backend's gemm strategy's host glue (``_triton_gemm``): the products' layouts and
dtypes, torch's global float32 GEMM setting, the caller's autocast, deterministic algorithms, and
the out_dtype detection; on the CPU (products by torch) and, marked `gpu`, on CUDA (cuBLAS). The
strategy's results against the reference run in test_triton.py under both strategies."""

from __future__ import annotations

import re

import pytest
import torch
from test_triton import OUTPUT_NAMES, assert_close, channels_first_map, inputs

from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import gemm as _triton_gemm
from gsp_kernels.contract import GSPOptions


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize(
    "x_dtype, prototype_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_gemm_products(channels_first, x_dtype, prototype_dtype):
    """The gemm strategy's products: x·z of every feature at the (b, i, k) strides it reports,
    float32, for both layouts; prototypes of another dtype than half x as parts in x's dtype
    whose sum is z to float32 accuracy."""
    batch, n, m, d = 3, 10, 6, 7
    x, prototypes = inputs(batch, n, m, d, seed=2)
    x, prototypes = x.to(x_dtype), prototypes.to(prototype_dtype)
    if channels_first:  # the op's view of a [B, D, H, W] map
        x = channels_first_map(x, 2, 5).flatten(2).transpose(1, 2)
    assert _triton_gemm._folds(x) is not channels_first
    columns, parts = _triton_gemm._prototype_columns(x, prototypes)
    assert columns.dtype == x.dtype and columns.shape == (parts * m, d)
    assert parts == (1 if x_dtype in (torch.float32, prototype_dtype) else 3 if x_dtype == torch.bfloat16 else 2)
    summed = columns.double().view(parts, m, d).sum(0)
    # Relative to z, plus float16's subnormal spacing 2⁻²⁴ (the lo part of small values).
    assert ((summed - prototypes.double()).abs() <= 2.0**-21 * prototypes.double().abs() + 2.0**-24).all()
    products, strides = _triton_gemm._products(x, columns, "ieee")
    assert products.dtype == torch.float32
    got = products.as_strided((batch, n, parts * m), strides)
    want = torch.einsum("bnd,kd->bnk", x.double(), columns.double())
    assert_close(got, want, 1e-6, "products", floor=0.0)


@pytest.fixture
def float32_matmul_settings():
    """torch's float32 GEMM settings (the legacy and the torch >= 2.9 API) restored after the test."""
    matmul = torch.backends.cuda.matmul
    legacy = torch.get_float32_matmul_precision()
    new = getattr(matmul, "fp32_precision", None)
    yield matmul
    torch.set_float32_matmul_precision(legacy)
    if new is not None:
        matmul.fp32_precision = new


def _tf32_in_effect(matmul) -> bool:
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


@pytest.mark.parametrize("caller", ["default", "legacy_high", "new_tf32"])
@pytest.mark.parametrize("precision, tf32", [("tf32", True), ("tf32x3", False), ("ieee", False), ("auto", False)])
def test_float32_gemm_setting_is_set_and_restored(precision, tf32, caller, float32_matmul_settings):
    """TF32 is torch's global cuBLAS setting: on inside for precision="tf32" only, whatever the
    caller set (torch's default, the legacy torch.set_float32_matmul_precision("high"), the new
    fp32_precision API); left alone where already right; as before afterwards, also after an
    error, with the legacy and new APIs still agreeing where they did (the legacy getter
    raises once they disagree)."""
    matmul = float32_matmul_settings
    if caller == "legacy_high":
        torch.set_float32_matmul_precision("high")
    elif caller == "new_tf32":
        if not hasattr(matmul, "fp32_precision"):
            pytest.skip("torch < 2.9 has no fp32_precision")
        matmul.fp32_precision = "tf32"
    before = _tf32_in_effect(matmul)
    legacy_before = torch.get_float32_matmul_precision() if caller != "new_tf32" else None
    with pytest.raises(KeyError, match="inside"), _triton_gemm._float32_gemms(precision):
        assert _tf32_in_effect(matmul) is tf32
        raise KeyError("inside")
    assert _tf32_in_effect(matmul) is before
    if legacy_before is not None:
        assert torch.get_float32_matmul_precision() == legacy_before  # raises if the APIs disagree


def test_float32_gemm_setting_untouched_where_already_in_effect(float32_matmul_settings, monkeypatch):
    """No write to torch's global setting when the wanted one is in force already (the default
    case: no TF32 and a float32-accurate precision), so no process-wide state changes per call."""
    writes = []
    real_setattr = type(float32_matmul_settings).__setattr__

    def recording_setattr(module, name, value):
        writes.append((name, value))
        real_setattr(module, name, value)

    monkeypatch.setattr(type(float32_matmul_settings), "__setattr__", recording_setattr)
    with _triton_gemm._float32_gemms("auto"):
        pass
    assert writes == []
    with _triton_gemm._float32_gemms("tf32"):
        pass
    assert len(writes) == 2  # set, restore


def test_half_gemm_detection_asks_for_the_cuda_kernels():
    """out_dtype support is read from the dispatcher's CUDA kernels of mm.dtype and bmm.dtype,
    not from meta tensors: found on the torch versions this project runs (2.11 on the GPU
    machine, 2.14 here; the overloads came with 2.8), and consistent with the dispatcher."""
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    registered = all(
        torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ("aten::mm.dtype", "aten::bmm.dtype")
    ) if version >= (2, 8) else False
    assert _triton_gemm._HALF_OUT_DTYPE is registered
    if version >= (2, 11) and torch.version.cuda is not None:
        assert _triton_gemm._HALF_OUT_DTYPE


@pytest.mark.parametrize("x_dtype, prototype_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("channels_first", [False, True])
def test_gemm_strategy_ignores_the_callers_autocast(x_dtype, prototype_dtype, channels_first):
    """The op runs under its caller's autocast (a custom op falls through it): the gemm
    strategy's products must stay float32 GEMMs. Under CPU autocast (which, like CUDA's, casts
    torch.mm to bfloat16) forward and backward give the same bits as without it."""
    batch, n, m, d = 2, 10, 6, 9
    x, prototypes = inputs(batch, n, m, d, seed=4)
    x, prototypes = x.to(x_dtype), prototypes.to(prototype_dtype)
    if channels_first:
        x = channels_first_map(x, 2, 5).flatten(2).transpose(1, 2)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=generator).to(x_dtype) for shape in ((batch, d), (batch, m), (batch, n))]
    options = (0.3, 5.0, "lipschitz", "euclidean")

    def step():
        pooled, attr, weights, u = _triton.forward(x, prototypes, GSPOptions(*options, "newton", 64, 1e-6, "auto"))
        return (pooled, attr, weights, *_triton.backward(*grads, x, prototypes, u, GSPOptions(*options, precision="auto")))

    columns, _ = _triton_gemm._prototype_columns(x, prototypes)
    with _triton.use_strategy("gemm"):
        plain = step()
        plain_products, _ = _triton_gemm._products(x, columns, "auto")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = step()
            products, _ = _triton_gemm._products(x, columns, "auto")
    assert products.dtype == torch.float32 and torch.equal(products, plain_products)
    for name, a, b in zip(OUTPUT_NAMES, plain, under_autocast):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_gemm_strategy_steps_aside_for_deterministic_algorithms(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) torch refuses cuBLAS on CUDA without
    CUBLAS_WORKSPACE_CONFIG: a tuned entry's gemm then yields to the fused kernels (the CPU's
    GEMMs are not refused)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert _triton_gemm.runs_on(cuda) and _triton_gemm.runs_on(torch.device("cpu"))
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not _triton_gemm.runs_on(cuda)
        assert _triton_gemm.runs_on(torch.device("cpu"))
        x, prototypes = inputs(1, 3, 2, 4)
        monkeypatch.setattr(_triton, "tuned_entry", lambda *args: {"strategy": "gemm"})
        assert _triton.strategy_for(x, prototypes) == "gemm"  # the CPU
        for value in _triton_gemm._DETERMINISTIC_CUBLAS:
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
            assert _triton_gemm.runs_on(cuda)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        assert not _triton_gemm.runs_on(cuda)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# ----------------------------------------------------------------------------- GPU (cuBLAS)


@pytest.mark.gpu
@pytest.mark.parametrize("caller", ["default", "legacy_high"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_products_are_float32_accurate(x_dtype, caller, float32_matmul_settings):
    """cuBLAS's products at a D where one TF32 product would miss by ~5e-4: float32 "auto" turns
    TF32 off through the API cuBLAS reads, also when the caller turned it on the legacy way
    (torch.set_float32_matmul_precision("high")); half operands run natively with a float32
    result (out_dtype), exact up to float32 accumulation; both layouts."""
    assert _triton_gemm._HALF_OUT_DTYPE, "torch.mm/bmm without out_dtype on CUDA: half x would be upcast"
    if caller == "legacy_high":
        torch.set_float32_matmul_precision("high")
    batch, n, m, d = 4, 49, 32, 2048
    x, prototypes = inputs(batch, n, m, d, seed=5, dtype=x_dtype, device="cuda")
    for features in (x, channels_first_map(x, 7, 7).flatten(2).transpose(1, 2)):
        columns, parts = _triton_gemm._prototype_columns(features, prototypes)
        products, strides = _triton_gemm._products(features, columns, "auto")
        assert products.dtype == torch.float32 and products.device == x.device
        got = products.as_strided((batch, n, parts * m), strides)
        want = torch.einsum("bnd,kd->bnk", features.double(), columns.double())
        # float32 accumulation over D = 2048 stays well under 2e-5; one TF32 product is ~5e-4 off.
        assert_close(got, want, 2e-5, "products", floor=0.0)
    assert (torch.get_float32_matmul_precision() == "high") is (caller == "legacy_high")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype, prototype_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_gpu_gemm_strategy_ignores_the_callers_autocast(x_dtype, prototype_dtype):
    """Under CUDA autocast (bfloat16) the gemm strategy gives the bits it gives without it."""
    batch, n, m, d = 8, 196, 128, 512
    x, prototypes = inputs(batch, n, m, d, seed=6, dtype=x_dtype, device="cuda")
    prototypes = prototypes.to(prototype_dtype)
    generator = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(s, generator=generator, device="cuda").to(x_dtype) for s in ((batch, d), (batch, m), (batch, n))]
    options = (0.3, 5.0, "lipschitz", "euclidean")

    def step():
        pooled, attr, weights, u = _triton.forward(x, prototypes, GSPOptions(*options, "newton", 64, 1e-6, "auto"))
        return (pooled, attr, weights, *_triton.backward(*grads, x, prototypes, u, GSPOptions(*options, precision="auto")))

    with _triton.use_strategy("gemm"):
        plain = step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            under_autocast = step()
    for name, a, b in zip(OUTPUT_NAMES, plain, under_autocast):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_deterministic_algorithms(monkeypatch):
    """torch refuses cuBLAS under deterministic algorithms without CUBLAS_WORKSPACE_CONFIG (what
    ``runs_on`` predicts); a tuned gemm entry then runs the fused kernels, which it accepts."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    x, prototypes = inputs(2, 9, 5, 16, seed=7, device="cuda")
    monkeypatch.setattr(_triton, "tuned_entry", lambda *args: {"strategy": "gemm"})
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not _triton_gemm.runs_on(x.device)
        with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
            torch.mm(x[0], prototypes.t())
        assert _triton.strategy_for(x, prototypes) == "fused"
        _triton.forward(x, prototypes, GSPOptions(0.3, 5.0, "lipschitz", "euclidean", "newton", 64, 1e-6, "auto"))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
