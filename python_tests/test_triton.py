"""The `triton` backend against the float64 reference (docs/math.md, Accuracy), on the CPU through
the Triton interpreter and, marked `gpu`, on a CUDA device at training sizes; every test that
takes the `strategy` fixture runs under both strategies (fused, and gemm: its products by torch,
on the CPU in float32), and the two are compared with each other."""

from __future__ import annotations

import re

import pytest
import torch

from gsp_kernels import gsp_pool
from gsp_kernels.backends import reference as _reference
from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import fused as triton_fused
from gsp_kernels.backends.triton import gemm as _triton_gemm
from gsp_kernels.backends.triton import kernels as triton_kernels
from gsp_kernels.backends.triton import launch as triton_launch
from gsp_kernels.contract import NORMALIZE_CODES, GSPOptions
from gsp_kernels.ops import _gsp_pool_op
from gsp_kernels.testing import random_inputs

# ‖out − ref‖ / ‖ref‖ per input dtype (docs/math.md, Accuracy).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
TF32_TOL = 1e-2
# Small tiles so that N, M and D span several tiles at interpreter-friendly sizes.
SMALL_TILES = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16}
OUTPUT_NAMES = ("pooled", "attr", "weights", "grad_x", "grad_prototypes")


@pytest.fixture(params=_triton.STRATEGIES)
def strategy(request):
    """The test under each of the backend's strategies, forced by use_strategy."""
    with _triton.use_strategy(request.param):
        yield request.param


@pytest.fixture
def tiles(monkeypatch):
    """Force a block-size table for one test: tiles(SMALL_TILES)."""

    def apply(override):
        monkeypatch.setattr(triton_launch, "BLOCK_OVERRIDE", override)

    return apply


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 1e-6) -> None:
    """‖out − ref‖ ≤ tol·‖ref‖ + floor (the floor covers references that are exactly zero,
    e.g. the prototype gradient with a single feature)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    err = (out64 - ref64).norm().item()
    scale = ref64.norm().item()
    relative = err / max(scale, 1e-300)
    assert err <= tol * scale + floor, f"{what}: error {err:.3e} vs norm {scale:.3e} (relative {relative:.2e})"


def outputs_and_grads(x, prototypes, backend, cotangent_dtype=None, **options):
    """(pooled, attr, weights, grad_x, grad_prototypes) with random cotangents on all three outputs,
    drawn in `cotangent_dtype` (default x's) so that both sides of a comparison see the same values."""
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    outputs = gsp_pool(x, prototypes, backend=backend, return_weights=True, **options)
    generator = torch.Generator().manual_seed(0)
    cotangent_dtype = cotangent_dtype or x.dtype
    cotangents = [torch.randn(out.shape, generator=generator).to(cotangent_dtype).to(out) for out in outputs]
    grad_x, grad_z = torch.autograd.grad(outputs, (x, prototypes), cotangents)
    return (*outputs, grad_x, grad_z)


def check_against_reference(x, prototypes, tol, **options):
    """Triton on (x, prototypes) vs the float64 reference on the same (rounded) values."""
    got = outputs_and_grads(x, prototypes, "triton", **options)
    options.pop("precision", None)
    want = outputs_and_grads(x.double(), prototypes.double(), "reference", cotangent_dtype=x.dtype, **options)
    for name, out, ref in zip(OUTPUT_NAMES, got, want):
        assert out.dtype == (prototypes.dtype if name == "grad_prototypes" else x.dtype), name
        assert_close(out, ref, tol, name)
    assert got[3].stride() == x.stride(), "grad_x must keep x's layout"
    return got


def inputs(batch, n, m, d, seed=0, dtype=torch.float32, device="cpu", near_fraction=0.3):
    x, prototypes = random_inputs(batch, n, m, d, seed, near_fraction)
    return x.to(device, dtype), prototypes.to(device, dtype)


def channels_first_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Features [B, N = h·w, D] as a contiguous channels-first map [B, D, h, w] (a reshape of the
    transpose alone can stay a view whose flattening is x itself again)."""
    x_map = x.transpose(1, 2).contiguous().view(x.shape[0], x.shape[2], h, w)
    assert x_map.is_contiguous() and x_map.flatten(2).transpose(1, 2).stride(1) == 1
    return x_map


# (shape B, N, M, D; options; small tiles?) on the CPU interpreter, float32 (tolerance TOL,
# except where the float32 reference itself misses the float64 one by more).
CPU_CASES = {
    "small": ((2, 7, 5, 9), {}, False),
    "ones": ((1, 1, 1, 1), {}, False),
    "one_feature": ((2, 1, 7, 3), {"gamma": 3.0}, False),
    # With M = 1 the prototype gradient is a sum of cancelling terms: the float32 reference
    # itself is off by 1.5e-5 here.
    "one_prototype": ((2, 5, 1, 3), {"normalize": "l2"}, False, 1e-4),
    "one_dim": ((2, 6, 4, 1), {"normalize": "none", "cost": "sqeuclidean"}, False),
    "primes_l2_sq": (
        (3, 31, 7, 63),
        {"normalize": "l2", "cost": "sqeuclidean", "transport_ratio": 0.5, "gamma": 10.0},
        False,
    ),
    "tiled_none": ((2, 40, 20, 70), {"normalize": "none", "gamma": 2.0}, True),
    "tiled_large": ((2, 63, 33, 130), {"precision": "ieee"}, True),
    "tiled_tf32x3": ((2, 40, 20, 70), {"precision": "tf32x3", "cost": "sqeuclidean"}, True),
    "gamma_100": ((2, 31, 7, 33), {"gamma": 100.0}, False),
    "gap": ((2, 15, 6, 17), {"transport_ratio": 1.0}, False),
    "gap_tiled": ((2, 40, 20, 33), {"transport_ratio": 1.0, "normalize": "l2"}, True),
    # μN = 0.6: a few features carry the mass, the float32 reference is off by 1.3e-5 too.
    "small_mu": ((2, 31, 7, 33), {"transport_ratio": 0.02, "gamma": 20.0}, False, 3e-5),
    "fixed_point": ((2, 15, 6, 17), {"solver": "fixed_point", "transport_ratio": 0.5}, False),
    "fixed_point_tiled": ((2, 40, 20, 33), {"solver": "fixed_point", "max_iter": 30}, True),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_matches_reference(case, tiles, strategy):
    shape, options, small_tiles, *tol = CPU_CASES[case]
    if small_tiles:
        tiles(SMALL_TILES)
    near = 0.8 if options.get("gamma", 5.0) >= 100 else 0.3
    x, prototypes = inputs(*shape, seed=len(case), near_fraction=near)
    check_against_reference(x, prototypes, tol[0] if tol else TOL[torch.float32], **options)


@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
def test_feature_equal_to_prototype(normalize, cost, strategy):
    """An exact match costs exactly 0 (COST_SNAP) and its euclidean backward coefficient is 0.

    The other features are far from the prototypes: near misses at gamma = 20 amplify the
    float32 cancellation in the cost past 1e-5 in the float32 reference as well."""
    x, prototypes = inputs(2, 9, 5, 11, seed=3, near_fraction=0.0)
    x[0, 3] = prototypes[2]
    x[1, 0] = prototypes[0]
    x[1, 8] = prototypes[0]
    check_against_reference(x, prototypes, TOL[torch.float32], normalize=normalize, cost=cost, gamma=20.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_channels_first_map(dtype, small_tiles, tiles, strategy):
    """A [B, D, H, W] map is read through its strides; grad_x keeps that layout."""
    if small_tiles:
        tiles(SMALL_TILES)
    x, prototypes = inputs(2, 35, 6, 33, seed=5, dtype=dtype)
    x_map = channels_first_map(x, 5, 7)
    got = check_against_reference(x_map, prototypes, TOL[dtype], gamma=8.0)
    assert got[2].shape == (2, 5, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_half_inputs(dtype, small_tiles, tiles, strategy):
    if small_tiles:
        tiles(SMALL_TILES)
    x, prototypes = inputs(2, 31, 7, 63 if not small_tiles else 40, seed=7, dtype=dtype)
    check_against_reference(x, prototypes, TOL[dtype], gamma=10.0)


@pytest.mark.parametrize(
    "x_dtype, prototype_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_mixed_dtypes(x_dtype, prototype_dtype, strategy):
    """Half features with float32 prototypes (autocast) and the reverse: upcast in registers
    (fused) or the prototypes split into half parts (gemm); gradients in each dtype."""
    x, prototypes = inputs(2, 15, 6, 17, seed=8)
    x, prototypes = x.to(x_dtype), prototypes.to(prototype_dtype)
    # Clustered: an exact match and near misses make the costs cancellation-prone.
    x[0, 2] = prototypes[1].to(x_dtype)
    x[1, :3] = (prototypes[:3] + 0.01 * torch.randn(3, 17, generator=torch.Generator().manual_seed(1))).to(x_dtype)
    check_against_reference(x, prototypes, TOL[torch.bfloat16], gamma=20.0)


def test_tf32_precision(strategy):
    """The interpreter computes TF32 exactly, so this checks the tf32 path and its larger snap."""
    x, prototypes = inputs(2, 31, 7, 33, seed=9)
    x[0, 4] = prototypes[1]
    check_against_reference(x, prototypes, TF32_TOL, precision="tf32")


@pytest.mark.parametrize("case", ["tiled_large", "gap_tiled", "fixed_point_tiled", "small"])
def test_one_program_per_sample_matches_split(case, tiles, monkeypatch, strategy):
    """SPLIT_SAMPLES off (a program loops over its sample's feature tiles): the same function,
    to the same tolerance, and the same bits wherever one feature tile covers the sample."""
    shape, options, small_tiles, *_ = CPU_CASES[case]
    if small_tiles:
        tiles(SMALL_TILES)
    x, prototypes = inputs(*shape, seed=len(case))
    split = outputs_and_grads(x, prototypes, "triton", **options)
    monkeypatch.setattr(triton_launch, "SPLIT_SAMPLES", False)
    whole = outputs_and_grads(x, prototypes, "triton", **options)
    assert triton_launch.sample_tiles(shape[1], 16 if small_tiles else 64) == (1, shape[1])
    for name, a, b in zip(OUTPUT_NAMES, whole, split):
        if small_tiles:
            assert_close(a, b, 1e-6, name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype, channels_first", [(torch.float32, False), (torch.bfloat16, True)])
def test_backward_is_deterministic(dtype, channels_first, tiles, strategy):
    tiles(SMALL_TILES)
    x, prototypes = inputs(3, 40, 20, 33, seed=10, dtype=dtype)
    if channels_first:
        x = channels_first_map(x, 5, 8)
    first = outputs_and_grads(x, prototypes, "triton")
    second = outputs_and_grads(x, prototypes, "triton")
    for name, a, b in zip(OUTPUT_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("solver", ["newton", "fixed_point"])
def test_non_finite_feature_poisons_only_its_sample(bad, solver, strategy):
    """The NaN policy of ops.gsp_pool: the bad sample's pooled vector is not finite, the other
    samples' outputs and grad_x are bitwise unchanged (one program per sample; the prototype
    gradient sums over the batch, so it is poisoned as in the reference)."""
    x, prototypes = inputs(3, 7, 5, 4, seed=29)
    clean = outputs_and_grads(x, prototypes, "triton", solver=solver)
    x[1, 2, 0] = bad
    poisoned = outputs_and_grads(x, prototypes, "triton", solver=solver)
    assert not torch.isfinite(poisoned[0][1]).all()
    for name, a, b in zip(OUTPUT_NAMES[:4], clean, poisoned):
        assert torch.equal(a[0::2], b[0::2]), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
def test_nan_prototype_poisons_everything(strategy):
    x, prototypes = inputs(3, 7, 5, 4, seed=30)
    prototypes[3, 1] = float("nan")
    for out in gsp_pool(x, prototypes, backend="triton", return_weights=True):
        assert torch.isnan(out).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
def test_huge_gamma_is_finite(normalize, strategy):
    """gamma = 1000: exp(−γc) underflows float32, the log-domain kernels do not (the Newton
    slope underflows to 0 and the infinite step bisects)."""
    x, prototypes = inputs(2, 11, 6, 5, seed=31)
    outputs = outputs_and_grads(x, prototypes, "triton", gamma=1000.0, normalize=normalize)
    for name, out in zip(OUTPUT_NAMES, outputs):
        assert torch.isfinite(out).all(), name
    torch.testing.assert_close(outputs[2].sum(-1), torch.ones(2), rtol=0, atol=1e-5)


def test_unsupported_and_availability():
    x, prototypes = inputs(1, 4, 3, 5)
    assert _triton.availability(torch.device("cpu")) is None  # conftest sets TRITON_INTERPRET=1
    assert _triton.unsupported(x, prototypes, GSPOptions(0.3, 5.0)) is None
    assert "float64" in _triton.unsupported(x.double(), prototypes, GSPOptions(0.3, 5.0))
    with pytest.raises(ValueError, match="float64"):
        gsp_pool(x.double(), prototypes.double(), backend="triton")


def test_block_sizes_are_bucketed():
    """Constexpr tiles come from a cached table keyed by power-of-two buckets: no recompiles for
    nearby shapes, and every tl.dot dimension is at least 16."""
    assert triton_fused.launch_config(196, 128, 512, False) == triton_fused.launch_config(200, 100, 300, False)
    for n, m, d in [(1, 1, 1), (49, 32, 2048), (196, 128, 512), (1024, 256, 1024)]:
        config = triton_fused.launch_config(n, m, d, True)
        assert min(config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_D"]) >= 16


def test_opcheck(strategy):
    x, prototypes = inputs(2, 5, 3, 4, seed=11)
    x.requires_grad_()
    prototypes.requires_grad_()
    args = (x, prototypes, 0.3, 5.0, "lipschitz", "euclidean", "newton", 64, 1e-6, "auto", "triton")
    torch.library.opcheck(_gsp_pool_op, args)


def test_torch_compile_fullgraph(strategy):
    class Pool(torch.nn.Module):
        def __init__(self, prototypes):
            super().__init__()
            self.prototypes = torch.nn.Parameter(prototypes)

        def forward(self, x):
            pooled, attr = gsp_pool(x, self.prototypes, backend="triton")
            return pooled.square().sum() + attr.square().sum()

    x, prototypes = inputs(2, 6, 4, 5, seed=12)
    module = Pool(prototypes)
    compiled = torch.compile(module, fullgraph=True)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    eager = module(x_eager)
    eager.backward()
    eager_grads = (x_eager.grad, module.prototypes.grad.clone())
    module.prototypes.grad = None
    out = compiled(x_compiled)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x_compiled.grad, eager_grads[0])
    torch.testing.assert_close(module.prototypes.grad, eager_grads[1])


# ----------------------------------------------------------------------------- strategies


def test_use_strategy_forces_and_restores():
    x, prototypes = inputs(1, 4, 3, 5)
    default = _triton.strategy_for(x, prototypes)
    assert default == (_triton.STRATEGY or "fused")
    with _triton.use_strategy("gemm"):
        assert _triton.strategy_for(x, prototypes) == "gemm"
        with _triton.use_strategy("fused"):
            assert _triton.strategy_for(x, prototypes) == "fused"
        assert _triton.strategy_for(x, prototypes) == "gemm"
    assert _triton.strategy_for(x, prototypes) == default
    with pytest.raises(RuntimeError, match="inside"), _triton.use_strategy("gemm"):
        raise RuntimeError("inside")
    assert _triton.strategy_for(x, prototypes) == default
    with pytest.raises(ValueError, match=r"strategy must be one of \('fused', 'gemm'\), got 'cublas'"), \
            _triton.use_strategy("cublas"):
        pass


def test_environment_strategy_is_the_default_and_use_strategy_overrides_it(monkeypatch):
    x, prototypes = inputs(1, 4, 3, 5)
    monkeypatch.setattr(_triton, "STRATEGY", "gemm")
    assert _triton.strategy_for(x, prototypes) == "gemm"
    with _triton.use_strategy("fused"):
        assert _triton.strategy_for(x, prototypes) == "fused"


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("fused", "fused"), ("gemm", "gemm")])
def test_strategy_from_environment(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("GSP_TRITON_STRATEGY", raising=False)
    else:
        monkeypatch.setenv("GSP_TRITON_STRATEGY", value)
    assert _triton._strategy_from_environment() == expected


@pytest.mark.parametrize("value", ["gemm", "GEMM"])
def test_strategy_environment_is_read_at_import(value):
    """GSP_TRITON_STRATEGY=gemm forces it for every call; a value not in STRATEGIES fails the
    import with an error naming the variable and the choices."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GSP_TRITON_STRATEGY": value, "TRITON_INTERPRET": "1"}
    script = "from gsp_kernels.backends import triton; print(triton.STRATEGY)"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    if value == "gemm":
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["gemm"]
    else:
        assert result.returncode != 0
        assert "ValueError: GSP_TRITON_STRATEGY must be one of ('fused', 'gemm') or unset, got 'GEMM'" in result.stderr


@pytest.mark.parametrize("name", _triton.STRATEGIES)
def test_forward_and_backward_take_the_forced_strategy(name, monkeypatch):
    """Both directions dispatch on strategy_for: the gemm strategy's GEMMs run exactly when it is
    forced (once per direction), never under the fused one."""
    products = []
    real = _triton_gemm._products
    monkeypatch.setattr(_triton_gemm, "_products", lambda *args: products.append(args) or real(*args))
    x, prototypes = inputs(2, 7, 5, 9, seed=1)
    with _triton.use_strategy(name):
        outputs_and_grads(x, prototypes, "triton")
    assert len(products) == (2 if name == "gemm" else 0)


# Cases for the two strategies side by side: (shape, dtype, channels-first, options, small tiles).
AGREEMENT_CASES = {
    "tiled": ((2, 40, 20, 70), torch.float32, False, {"normalize": "none", "gamma": 2.0}, True),
    "nchw_bf16": ((2, 35, 6, 33), torch.bfloat16, True, {"gamma": 8.0}, False),
    "gap_l2": ((2, 15, 6, 17), torch.float32, False, {"transport_ratio": 1.0, "normalize": "l2"}, False),
    "fixed_point_nchw": ((2, 20, 7, 9), torch.float32, True, {"solver": "fixed_point", "transport_ratio": 0.5}, False),
}


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_strategies_agree(case, tiles):
    """fused and gemm compute one function: every output and gradient within twice the input
    dtype's tolerance of each other (each is within it of the float64 reference), in the same
    dtype and layout."""
    shape, dtype, channels_first, options, small_tiles = AGREEMENT_CASES[case]
    if small_tiles:
        tiles(SMALL_TILES)
    x, prototypes = inputs(*shape, seed=len(case), dtype=dtype)
    if channels_first:
        x = channels_first_map(x, 1, shape[1])
    results = {}
    for name in _triton.STRATEGIES:
        with _triton.use_strategy(name):
            results[name] = outputs_and_grads(x, prototypes, "triton", **options)
    for what, fused, gemm in zip(OUTPUT_NAMES, results["fused"], results["gemm"]):
        assert gemm.dtype == fused.dtype and gemm.stride() == fused.stride(), what
        assert_close(gemm, fused, 2 * TOL[dtype], what)


# ----------------------------------------------------------------------------- GPU (training sizes)

GPU_SHAPE = (8, 196, 128, 512)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, precision, tol",
    [
        (torch.float32, "ieee", TOL[torch.float32]),
        (torch.float32, "tf32x3", TOL[torch.float32]),
        (torch.float32, "auto", TOL[torch.float32]),
        (torch.float32, "tf32", TF32_TOL),
        (torch.bfloat16, "auto", TOL[torch.bfloat16]),
        (torch.float16, "auto", TOL[torch.float16]),
    ],
)
@pytest.mark.parametrize("options", [{}, {"gamma": 1.0, "normalize": "l2", "cost": "sqeuclidean"}])
def test_gpu_matches_reference(dtype, precision, tol, options, strategy):
    x, prototypes = inputs(*GPU_SHAPE, seed=20, dtype=dtype, device="cuda")
    check_against_reference(x, prototypes, tol, precision=precision, **options)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options, tol",
    [
        # Clustered features at gamma = 100: the float32 reference itself is off by 9e-6.
        ({"gamma": 100.0}, 2e-5),
        ({"transport_ratio": 1.0}, TOL[torch.float32]),
        ({"transport_ratio": 0.9, "solver": "fixed_point", "max_iter": 300}, TOL[torch.float32]),
        ({"normalize": "none", "gamma": 0.5}, TOL[torch.float32]),
    ],
)
def test_gpu_options(options, tol, strategy):
    near = 0.8 if options.get("gamma", 5.0) >= 100 else 0.3
    x, prototypes = inputs(*GPU_SHAPE, seed=21, device="cuda", near_fraction=near)
    x[0, :5] = prototypes[:5]
    check_against_reference(x, prototypes, tol, precision="tf32x3", **options)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 1024, 256, 2048), (32, 49, 32, 2048), (4, 7, 3, 1)])
def test_gpu_extreme_shapes(shape, strategy):
    x, prototypes = inputs(*shape, seed=22, device="cuda")
    check_against_reference(x, prototypes, TOL[torch.float32], precision="tf32x3")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_channels_first_map_and_determinism(dtype, strategy):
    batch, n, m, d = GPU_SHAPE
    x, prototypes = inputs(batch, n, m, d, seed=23, dtype=dtype, device="cuda")
    x_map = channels_first_map(x, 14, 14)
    first = check_against_reference(x_map, prototypes, TOL[dtype])
    second = outputs_and_grads(x_map, prototypes, "triton")
    for name, a, b in zip(OUTPUT_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_mixed_dtypes(strategy):
    """Autocast's case at training size: bfloat16 features, float32 prototypes."""
    x, prototypes = inputs(*GPU_SHAPE, seed=25, device="cuda", near_fraction=0.5)
    check_against_reference(x.bfloat16(), prototypes, TOL[torch.bfloat16], gamma=20.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_graph_replays_eager_bits(dtype, strategy):
    """A forward and backward captured in one CUDA graph (no host sync; the gemm strategy's
    TF32 setting is host state) replay to the eager results, bit for bit."""
    batch, n, m, d = GPU_SHAPE
    x, prototypes = inputs(batch, n, m, d, seed=26, dtype=dtype, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    grads = [
        torch.randn(shape, generator=generator, device="cuda").to(dtype) for shape in ((batch, d), (batch, m), (batch, n))
    ]
    options = (0.3, 5.0, "lipschitz", "euclidean")

    def step():
        pooled, attr, weights, u = _triton.forward(x, prototypes, GSPOptions(*options, "newton", 64, 1e-6, "auto"))
        return (pooled, attr, weights, *_triton.backward(*grads, x, prototypes, u, GSPOptions(*options, precision="auto")))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(OUTPUT_NAMES, eager, captured):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(strategy):
    x, prototypes = inputs(*GPU_SHAPE, seed=24, device="cuda")
    prototypes.requires_grad_()

    def loss(features):
        pooled, attr = gsp_pool(features, prototypes, backend="triton")
        return pooled.square().sum() + attr.square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    loss(x_eager).backward()
    compiled(x_compiled).backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)



@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prototype_gradient_epilogue(normalize, dtype):
    """The epilogue kernel against the same formula in torch (reference helpers), with more
    samples and columns than one block, prototype rows inside and outside the unit ball (and
    one zero row, and one of norm ~1e30), prepared (``launch.row_norms``) from a strided
    prototype view: the kernel reads z′ = z / z_scale and partials of V′ = V·z_scale."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits, batch, m, d = 3, 300, 6, 530  # batch > BLOCK_B (256), d > BLOCK_D (512)
    generator = torch.Generator().manual_seed(7)
    partials = torch.randn(splits, m, d, generator=generator).to(device)
    col_sum = torch.randn(batch, m, generator=generator).to(device)
    storage = torch.randn(d, m, generator=generator) * torch.tensor([2.0, 0.01, 1.0, 0.0, 5.0, 1e29])  # |z| vs 1
    prototypes = storage.to(device=device, dtype=dtype).t()  # [M, D], strides (1, M)
    _, (prepared, z_scale, _) = triton_launch.row_norms(prototypes[None], prototypes, normalize, features=False)
    grad_z = torch.empty(m, d, dtype=dtype, device=device)
    unused = torch.zeros(1, 1, 1, dtype=dtype, device=device)  # grad_x operands: no grad_x programs
    triton_kernels._gsp_backward_finish_kernel[(m,)](
        partials * z_scale[:, None], splits, col_sum, batch, partials, partials, prepared, *prepared.stride(), z_scale,
        grad_z,
        unused, *unused.stride(), unused, unused, *unused.stride(),
        0, 1, m, d, 1,
        BLOCK_ZD=512, BLOCK_B=256, NORMALIZE=NORMALIZE_CODES[normalize],
        BLOCK_R=16, BLOCK_K=16, BLOCK_D=16, SPLIT_BF16=False, NATIVE_HALF_DOT=False, PRECISION="ieee",
    )
    z_hat, z_div = _reference.normalize_rows(prototypes.double(), normalize)
    grad_z_hat = z_hat * col_sum.double().sum(0).unsqueeze(-1) - z_div * partials.double().sum(0)
    expected = _reference.normalize_rows_backward(grad_z_hat, z_hat, z_div, normalize)
    assert_close(grad_z, expected, 1e-5 if dtype == torch.float32 else 1e-2, f"grad_z {normalize} {dtype}", floor=0.0)


# ----------------------------------------------------------------------------- GPU code generation on the CPU

SM90 = (("cuda", 90, 32), "sm_90a")
# A launch at B=256, N=196, D=512, M=128 (contiguous x and prototypes): the integer arguments,
# so that the builds below get the divisibility-by-16 hints a real launch would (pointers are
# 16-byte aligned). Without them Triton emits scalar loads, cannot pipeline, and spills.
TYPICAL_INTS = {
    "stride_xb": 196 * 512, "stride_xn": 512, "stride_zm": 512, "stride_gb": 196 * 512, "stride_gn": 512,
    "N": 196, "M": 128, "D": 512, "total_rows": 256 * 196, "batch": 256, "splits": 3,
    "rows_per_tile": 49, "tiles_per_sample": 4,
    # The products / logits / V [B·N, M] (the gemm strategy's, and the fused scratch), V's
    # hi + lo pair [B·N, 2M], V z [B·N, D]; the norms kernel's feature programs.
    "stride_lb": 196 * 128, "stride_ln": 128, "stride_cb": 196 * 128, "stride_cn": 128,
    "stride_vb": 196 * 256, "stride_vn": 256, "x_programs": 256 * 196 // 32, "col_tiles": 4,
}
INT32_POINTERS = {"arrivals_ptr"}  # the forward's per-sample arrival counters


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG and STACK (bytes of local stack: spills, for these kernels) of a one-kernel cubin."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    assert tool, "cuobjdump not found (Triton's bundled one or the CUDA toolkit's)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", text)}


_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_FLOAT_ARGS = {"gamma", "snap", "inv_total", "target", "logit_mu", "log_mu", "log_target", "tol"}


def _compile_one(kernel, dtype, f32_pointers, constexprs, num_warps, num_stages, maxnreg=None) -> str:
    """One sm_90 build (pointers in `dtype` unless named in f32_pointers; the divisibility hints
    of a typical launch): its line of the register table."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, hints = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            element = "i32" if name in INT32_POINTERS else "fp32" if name in f32_pointers else None
            types[name] = f"*{element}" if element else _POINTER_TYPES[dtype]
            hints[(index,)] = [["tt.divisibility", 16]]
        else:
            types[name] = "fp32" if name in _FLOAT_ARGS else "i32"
            if TYPICAL_INTS.get(name, 1) % 16 == 0:
                hints[(index,)] = [["tt.divisibility", 16]]
    constants = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=hints)
    compiled = triton.compile(
        source, target=GPUTarget(*SM90[0]),
        options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg},
    )
    assert compiled.asm["cubin"], kernel
    usage = _resource_usage(compiled.asm["cubin"])
    blocks = {key: value for key, value in constexprs.items() if key.startswith("BLOCK")}
    return (
        f"{kernel.fn.__name__} {str(dtype).removeprefix('torch.')} "
        f"warps={num_warps} stages={num_stages} maxnreg={maxnreg} "
        f"{blocks} registers={usage['REG']} stack={usage['STACK']} "
        f"smem={compiled.metadata.shared} {sorted((k, v) for k, v in constexprs.items() if k not in blocks)}"
    )


def _compile_kernels_for_sm90() -> list[str]:
    """Compile every kernel variant the glue launches for a typical shape (N=196, M=128,
    D=512) to an sm_90 cubin, without a GPU: catches errors that the interpreter cannot see
    (bfloat16 tensor-core dots, loop-carried types, layouts), and reports each build's
    registers and stack (spills). Returns one line per variant."""
    assert not triton_launch.INTERPRETED
    compile_one = _compile_one
    lines = []
    n, m, d = 196, 128, 512
    # (features, prototypes): one dtype, or bfloat16 features with float32 prototypes (the GSP
    # layer under autocast: float32 products, so the float32 tiles; only the fused kernels differ).
    for dtype, prototype_dtype in DTYPE_PAIRS:
        x = torch.empty(1, n, d, dtype=dtype)
        prototypes = torch.empty(m, d, dtype=prototype_dtype)
        mixed = dtype != prototype_dtype
        f32_pointers = {"z_ptr"} if mixed else set()
        for precision in ("auto", "tf32") if dtype == torch.float32 else ("auto",):
            cast_f32, dot_precision, f32_precision, _ = triton_launch.resolve_precision(x, prototypes, precision)
            half = triton_launch.half_products(x, prototypes)
            config = dict(triton_fused.launch_config(n, m, d, half))
            launch = {key: config.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in config}
            # BLOCK_ALL_N (ℓ of a whole sample in registers): the typical N (196 -> 256), then 1024.
            for newton, gap, all_n in ((True, False, 256), (False, False, 256), (True, True, 256), (True, False, 1024)):
                constexprs = dict(
                    config, BLOCK_ALL_N=all_n, NORMALIZE=0, EUCLIDEAN=True, NEWTON=newton, GAP=gap,
                    CAST_F32=cast_f32, PRECISION=dot_precision, stride_xd=1, stride_zd=1,
                    POOL_PRECISION="ieee" if f32_precision == "ieee" else "tf32x3",
                    SPLIT_HALF=dtype != torch.float32, NATIVE_HALF_DOT=True, PARTS=0, stride_lm=1,
                )
                kernel = triton_kernels._gsp_forward_kernel
                lines.append(compile_one(kernel, dtype, FORWARD_F32_POINTERS | f32_pointers, constexprs, **launch))
            config = dict(triton_fused.launch_config(n, m, d, half, backward=True))
            launch = {key: config.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in config}
            constexprs = dict(
                config, NORMALIZE=1, EUCLIDEAN=True, GAP=False, CAST_F32=cast_f32, PRECISION=dot_precision,
                stride_xd=1, stride_zd=1, PARTS=0, V_PAIR=False, stride_cm=1,
            )
            lines.append(compile_one(triton_kernels._gsp_backward_kernel, dtype, BACKWARD_F32_POINTERS | f32_pointers, constexprs, **launch))
            if mixed:
                continue
            if precision == "auto":  # the gemm strategy's builds do not depend on it
                lines += _compile_gemm_strategy(dtype, precision)
            constexprs = dict(
                BLOCK_R=config["BLOCK_N"], BLOCK_K=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"],
                SPLIT_BF16=dtype == torch.bfloat16, NATIVE_HALF_DOT=True, PRECISION=f32_precision,
                BLOCK_ZD=512, BLOCK_B=256, NORMALIZE=1, stride_xd=1, stride_zd=1, stride_gd=1,
            )
            lines.append(compile_one(
                triton_kernels._gsp_backward_finish_kernel, dtype,
                {"partial_ptr", "col_sum_ptr", "coef_ptr", "row_coefs_ptr", "z_scale_ptr"},
                constexprs, 4, launch["num_stages"],
            ))
            block_k, block_m, block_d, _, _ = triton_fused.split_k_config(256 * n, m, d, 264)
            constexprs = dict(
                BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_D=block_d, SPLIT_BF16=dtype == torch.bfloat16,
                NATIVE_HALF_DOT=True, PRECISION=f32_precision, stride_xd=1,
            )
            lines.append(compile_one(triton_kernels._gsp_coef_x_kernel, dtype, {"coef_ptr", "partial_ptr"}, constexprs, 4, 3))
    return lines


DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32))
FORWARD_F32_POINTERS = {"z_scale_ptr", "u_ptr", "logits_ptr", "ell_ptr", "x_sq_ptr", "x_scale_ptr", "z_sq_ptr"}
BACKWARD_F32_POINTERS = {
    "z_scale_ptr", "u_ptr", "coef_ptr", "row_coefs_ptr", "rows_ptr", "z_sq_ptr", "col_sum_ptr", "tile_sums_ptr",
    "x_sq_ptr", "x_scale_ptr", "x_gy_ptr", "z_sq_in_ptr",
}


def _compile_gemm_strategy(dtype, precision) -> list[str]:
    """The gemm strategy's builds at N=196, M=128, D=512: the per-sample kernels reading the
    products (rows [B·N, M], and a channels-first map's [B, M, N]), the norms kernel and the
    backward's finishing launch."""
    compile_one = _compile_one
    n, m, d = 196, 128, 512
    half = dtype != torch.float32
    x = torch.empty(1, n, d, dtype=dtype)
    _, _, f32_precision, _ = triton_launch.resolve_precision(x, torch.empty(m, d, dtype=dtype), precision)
    lines = []
    # rows: x [B, N, D] and the products [B·N, M]; channels-first: x [B, D, N], products [B, M, N].
    for x_strides, product_stride in (({"stride_xd": 1}, "m"), ({"stride_xn": 1}, "n")):
        config = dict(_triton_gemm.launch_config(n, m, d, half))
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in config}
        constexprs = dict(
            config, **x_strides, BLOCK_ALL_N=256, NORMALIZE=0, EUCLIDEAN=True, NEWTON=True, GAP=False,
            CAST_F32=False, PRECISION="ieee", POOL_PRECISION="ieee" if f32_precision == "ieee" else "tf32x3",
            SPLIT_HALF=half, NATIVE_HALF_DOT=True, PARTS=1, stride_zd=1, **{f"stride_l{product_stride}": 1},
        )
        lines.append(compile_one(triton_kernels._gsp_forward_kernel, dtype, FORWARD_F32_POINTERS, constexprs, **launch))
        config = dict(_triton_gemm.launch_config(n, m, d, half, backward=True, rows_layout=product_stride == "m"))
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in config}
        constexprs = dict(
            config, **x_strides, NORMALIZE=1, EUCLIDEAN=True, GAP=False, CAST_F32=False, PRECISION="ieee",
            PARTS=1, V_PAIR=dtype == torch.bfloat16, stride_zd=1,
            **{f"stride_c{product_stride}": 1, f"stride_v{product_stride}": 1},
        )
        lines.append(compile_one(triton_kernels._gsp_backward_kernel, dtype, BACKWARD_F32_POINTERS, constexprs, **launch))
    for with_gy in (False, True):
        constexprs = {
            "BLOCK_R": triton_launch.ROWS_BLOCK, "BLOCK_D": triton_launch.COLS_BLOCK, "WITH_GY": with_gy,
            "SCALE_ABOVE": triton_launch.SCALE_ABOVE["default"], "stride_xd": 1, "stride_zd": 1,
        }
        f32_pointers = {"x_sq_ptr", "x_scale_ptr", "x_gy_ptr", "z_scale_ptr", "z_sq_ptr"}
        lines.append(compile_one(triton_kernels._gsp_norms_kernel, dtype, f32_pointers, constexprs, 4, 3))
    constexprs = {
        "BLOCK_ZD": 512, "BLOCK_B": 256, "NORMALIZE": 1, "BLOCK_R": triton_launch.ROWS_BLOCK,
        "BLOCK_D": triton_launch.COLS_BLOCK, "stride_xd": 1, "stride_gd": 1, "stride_vd": 1,
    }
    f32_pointers = {"partial_ptr", "col_sum_ptr", "row_coefs_ptr", "z_scale_ptr", "coef_z_ptr"}
    lines.append(compile_one(triton_kernels._gsp_gemm_backward_finish_kernel, dtype, f32_pointers, constexprs, 4, 3))
    return lines


def test_kernels_compile_for_sm90():
    """GPU code generation without a GPU, in a process where triton.jit is not the interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    if torch.cuda.is_available():
        pytest.skip("the gpu tests compile and run the kernels for real")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    script = "import test_triton; print('\\n'.join(test_triton._compile_kernels_for_sm90()))"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout)  # the register / shared-memory table (pytest -s)
    lines = result.stdout.splitlines()
    assert len(lines) >= 20, result.stdout
    spilling = [line for line in lines if " stack=0 " not in line]
    assert not spilling, "Triton kernels that spill in an sm_90 build:\n" + "\n".join(spilling)
    # The half-precision per-sample kernels are sized for two programs per SM (64K registers); the
    # mixed-dtype ones (float32 products, CAST_F32) for one, as the float32 kernels.
    crowded = [
        line for line in lines
        if line.startswith(("_gsp_forward_kernel", "_gsp_backward_kernel")) and "float16" in line.split()[1]
        and "('CAST_F32', False)" in line
        and 2 * 32 * int(re.search(r"warps=(\d+)", line)[1]) * int(re.search(r"registers=(\d+)", line)[1]) > 65536
    ]
    assert not crowded, "half-precision kernels that no longer fit two programs per SM:\n" + "\n".join(crowded)
