"""The public op: dispatcher registration, torch.compile, dtypes, autocast, validation, NaN policy."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import paper_gsp

import gsp_kernels
from gsp_kernels import backend_status, gsp_pool
from gsp_kernels.contract import GSPOptions
from gsp_kernels.ops import _gsp_pool_backward_op, _gsp_pool_op
from gsp_kernels.testing import random_inputs
from gsp_kernels.testing import rel_err as rel_error

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
# Op arguments after (x, prototypes): mu, gamma, normalize, cost, solver, max_iter, tol, precision, backend
OP_PARAMS = (0.3, 5.0, "lipschitz", "euclidean", "newton", 64, 1e-6, "auto", "reference")


def channels_first(features: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, N, D] -> a contiguous [B, D, H, W] map with N = H*W."""
    batch, _, d = features.shape
    return features.transpose(1, 2).reshape(batch, d, h, w).contiguous()


def op_inputs(layout: str, dtype: torch.dtype, requires_grad: bool):
    """(features [B, N, D], prototypes [M, D]) for the raw op; `nchw` is a strided view of a map."""
    features, prototypes = random_inputs(2, 12, 5, 7, seed=20)
    if layout == "nchw":
        features = channels_first(features, 3, 4).flatten(2).transpose(1, 2)  # strided view of a map
        assert not features.is_contiguous()
    features = features.to(dtype).detach().requires_grad_(requires_grad)  # .to keeps the strides
    return features, prototypes.to(dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------- dispatcher registration


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "nchw"])
def test_opcheck_forward(layout, dtype):
    features, prototypes = op_inputs(layout, dtype, requires_grad=True)
    torch.library.opcheck(_gsp_pool_op, (features, prototypes, *OP_PARAMS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "nchw"])
def test_opcheck_backward(layout, dtype):
    features, prototypes = op_inputs(layout, dtype, requires_grad=False)
    pooled, attr, weights, u = _gsp_pool_op(features, prototypes, *OP_PARAMS)
    generator = torch.Generator().manual_seed(21)
    grads = [torch.randn(t.shape, generator=generator, dtype=dtype) for t in (pooled, attr, weights)]
    mu, gamma, normalize, cost, _solver, _max_iter, _tol, precision, backend = OP_PARAMS
    args = (*grads, features, prototypes, u, mu, gamma, normalize, cost, precision, backend)
    torch.library.opcheck(_gsp_pool_backward_op, args)
    grad_x, _ = _gsp_pool_backward_op(*args)
    assert grad_x.stride() == features.stride()


def test_channels_first_map_is_read_without_copy(monkeypatch):
    """The backend receives the [B, H*W, D] view of the map's own storage."""
    features, prototypes = random_inputs(2, 12, 5, 7, seed=22)
    x = channels_first(features, 3, 4)  # [B, D, H, W]
    seen = {}
    reference = gsp_kernels.backends.get_backend("reference")
    original_forward = reference.forward

    def spying_forward(features_view, *args):
        seen["ptr"], seen["stride"] = features_view.data_ptr(), features_view.stride()
        return original_forward(features_view, *args)

    monkeypatch.setattr(reference, "forward", spying_forward)
    _, _, weights = gsp_pool(x, prototypes, backend="reference", return_weights=True)
    assert seen["ptr"] == x.data_ptr()
    assert seen["stride"] == (7 * 12, 1, 12)
    assert weights.shape == (2, 3, 4)


def _op_outputs_and_grads(run, features, prototypes, used):
    """Outputs of `run(x, z)` -> (pooled, attr, weights, u) and the gradients of a random
    weighted sum of the outputs named in `used` (the others get no gradient: None in backward)."""
    x = features.detach().clone().requires_grad_()
    z = prototypes.detach().clone().requires_grad_()
    outputs = run(x, z)
    generator = torch.Generator().manual_seed(25)
    loss = sum((outputs[i] * torch.randn(outputs[i].shape, generator=generator, dtype=x.dtype)).sum() for i in used)
    loss.backward()
    return [t.detach() for t in outputs], x.grad, z.grad


@pytest.mark.parametrize("used", [(0, 1, 2), (0,), (1,), (2,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_path_matches_registered_op(dtype, used):
    """Eager calls run ``_EagerGspPool``; it must equal the registered op with its autograd
    formula bit for bit, whichever outputs carry a gradient."""
    features, prototypes = op_inputs("nchw", dtype, requires_grad=False)
    params = OP_PARAMS

    def eager(x, z):
        *options, backend = params
        return gsp_kernels.ops._run_op(x, z, GSPOptions(*options), backend)

    def registered(x, z):
        return _gsp_pool_op(x, z, *params)

    eager_out, eager_gx, eager_gz = _op_outputs_and_grads(eager, features, prototypes, used)
    op_out, op_gx, op_gz = _op_outputs_and_grads(registered, features, prototypes, used)
    for got, expected in zip([*eager_out, eager_gx, eager_gz], [*op_out, op_gx, op_gz]):
        assert torch.equal(got, expected)
    assert eager_gx.stride() == features.stride()


def test_eager_path_and_tracing_path_are_chosen_by_input():
    """Plain tensors take the autograd.Function; fake tensors (as while tracing) the registered
    op, whose fake implementation gives the shapes without running a backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    features, prototypes = op_inputs("contiguous", torch.float32, requires_grad=True)
    pooled, _ = gsp_pool(features, prototypes, backend="reference")
    assert type(pooled.grad_fn).__name__ == "_EagerGspPoolBackward"
    pooled, _ = gsp_pool(features, torch.nn.Parameter(prototypes.detach()), backend="reference")  # as in nn.GSP
    assert type(pooled.grad_fn).__name__ == "_EagerGspPoolBackward"
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(features)
        fake_z = mode.from_tensor(prototypes)
        pooled, attr, weights = gsp_pool(fake_x, fake_z, backend="reference", return_weights=True)
    assert (pooled.shape, attr.shape, weights.shape) == ((2, 7), (2, 5), (2, 12))
    assert "gsp_pool" in type(pooled.grad_fn).__name__.lower() and "Eager" not in type(pooled.grad_fn).__name__


def test_no_double_backward_says_so():
    """create_graph=True through gsp_pool is refused with a clear error on the eager path, also
    when another term would give the gradient a graph (GSP's second-order terms would otherwise
    be dropped silently)."""
    features, prototypes = random_inputs(2, 5, 3, 4, seed=30)
    x, z = features.requires_grad_(), prototypes.requires_grad_()
    pooled, _ = gsp_pool(x, z)
    for loss in (pooled.sum(), pooled.sum() + x.square().sum()):
        with pytest.raises(RuntimeError, match="gsp_pool has no double backward"):
            torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
    # First-order gradients are unaffected, also of the prototypes alone.
    (grad_z,) = torch.autograd.grad(pooled.sum(), z)
    assert torch.isfinite(grad_z).all()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """torch.utils.checkpoint recomputes the forward in backward (with grad enabled there): the
    gradients must equal a plain backward's."""
    features, prototypes = random_inputs(2, 7, 3, 5, seed=32)
    project = torch.nn.Linear(5, 5, dtype=torch.float64)

    def loss(x, z):
        pooled, attr = gsp_pool(project(x), z)
        return pooled.square().sum() + attr[:, 0].sum()

    grads = []
    for wrap in (loss, lambda x, z: torch.utils.checkpoint.checkpoint(loss, x, z, use_reentrant=use_reentrant)):
        x, z = features.clone().requires_grad_(), prototypes.clone().requires_grad_()
        wrap(x, z).backward()
        grads.append((x.grad, z.grad, project.weight.grad.clone()))
        project.zero_grad()
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_vmap_matches_a_loop():
    """Under torch.func.vmap (an extra leading dimension) the registered op runs: the same values
    as one call per slice."""
    features, prototypes = random_inputs(6, 5, 3, 4, seed=31)
    stacked = features.view(2, 3, 5, 4)  # [V, B, N, D]
    pooled, attr = torch.func.vmap(lambda x: gsp_pool(x, prototypes))(stacked)
    for v in range(2):
        want = gsp_pool(stacked[v], prototypes)
        torch.testing.assert_close(pooled[v], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(attr[v], want[1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- torch.compile


class GSPHead(torch.nn.Module):
    """A small model: projection, GSP over the map's positions, a linear read-out."""

    def __init__(self, channels: int, prototypes: int):
        super().__init__()
        generator = torch.Generator().manual_seed(23)
        self.project = torch.nn.Conv2d(3, channels, kernel_size=1)
        self.prototypes = torch.nn.Parameter(torch.randn(prototypes, channels, generator=generator))
        self.readout = torch.nn.Linear(channels + prototypes, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.project(images)  # [B, C, H, W]
        pooled, attr = gsp_pool(features, self.prototypes, transport_ratio=0.4, gamma=5.0)
        return self.readout(torch.cat([pooled, attr], dim=1))  # [B, 4]


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = GSPHead(channels=6, prototypes=5)
    images = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(24))
    compiled = torch.compile(model, fullgraph=True)

    def run(module):
        module.zero_grad()
        images_leaf = images.clone().requires_grad_()
        out = module(images_leaf)
        out.square().sum().backward()
        return out, images_leaf.grad, [p.grad.clone() for p in module.parameters()]

    eager_out, eager_gx, eager_gp = run(model)
    compiled_out, compiled_gx, compiled_gp = run(compiled)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_gx, eager_gx, rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(compiled_gp, eager_gp):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)
    assert model.prototypes.grad.abs().sum() > 0


@pytest.mark.parametrize("dynamic", [None, True])  # None: the default, automatic dynamic
def test_compile_with_changing_sizes_and_parameters(dynamic):
    """A compiled step whose N, γ and μ change between calls (automatic dynamic shapes, or
    dynamic=True, turn them symbolic): no graph break, and eager's values and gradients."""
    torch._dynamo.reset()

    def step(x, prototypes, mu, gamma):
        pooled, attr = gsp_pool(x, prototypes, transport_ratio=mu, gamma=gamma)
        return pooled.square().sum() + attr[:, 0].sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, mu, gamma in ((7, 0.3, 5.0), (9, 0.3, 6.0), (13, 0.7, 20.0)):
        features, prototypes = random_inputs(2, n, 5, 8, seed=n)
        results = []
        for run in (step, compiled):
            x, z = features.float().requires_grad_(), prototypes.float().requires_grad_()
            loss = run(x, z, mu, gamma)
            results.append((loss.detach(), *torch.autograd.grad(loss, (x, z))))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dtypes and autocast

# (x dtype, prototype dtype, tolerance on outputs and gradients vs float64)
DTYPE_CASES = [
    (torch.float64, torch.float64, 1e-9),
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2),
    (torch.float16, torch.float16, 2e-2),
    (torch.bfloat16, torch.float32, 2e-2),  # as under autocast: a bf16 map, fp32 prototypes
]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(("x_dtype", "z_dtype", "tol"), DTYPE_CASES)
def test_dtypes(x_dtype, z_dtype, tol, device):
    """Outputs in x's dtype, each gradient in its input's dtype, close to the float64 oracle."""
    features, prototypes = random_inputs(2, 9, 6, 10, seed=25)
    x = features.to(x_dtype).to(device).requires_grad_()
    z = prototypes.to(z_dtype).to(device).requires_grad_()
    outputs = gsp_pool(x, z, transport_ratio=0.3, gamma=5.0, backend="reference", return_weights=True)
    assert all(out.dtype == x_dtype for out in outputs)
    generator = torch.Generator().manual_seed(26)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=torch.float64) for out in outputs]
    loss = sum((out.double() * cot.to(device)).sum() for out, cot in zip(outputs, cotangents))
    grad_x, grad_z = torch.autograd.grad(loss, (x, z))
    assert grad_x.dtype == x_dtype and grad_z.dtype == z_dtype

    # The oracle sees the same (rounded) input values in float64.
    x64 = x.detach().cpu().double().requires_grad_()
    z64 = z.detach().cpu().double().requires_grad_()
    oracle = paper_gsp(x64, z64, 0.3, 5.0)
    oracle_outputs = (oracle.pooled, oracle.attr, oracle.weights)
    oracle_loss = sum((out * cot).sum() for out, cot in zip(oracle_outputs, cotangents))
    oracle_gx, oracle_gz = torch.autograd.grad(oracle_loss, (x64, z64))
    for name, out, ref in [
        *zip(("pooled", "attr", "weights"), outputs, oracle_outputs),
        ("grad x", grad_x, oracle_gx),
        ("grad prototypes", grad_z, oracle_gz),
    ]:
        assert rel_error(out, ref) <= tol, f"{name}: {rel_error(out, ref):.2e} > {tol}"


def test_autocast_bfloat16():
    """Under CPU autocast a bf16 feature map meets fp32 prototypes; outputs bf16, fp32 prototype grads."""
    model = GSPHead(channels=8, prototypes=5)
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(27))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.project(images)  # [B, C, H, W] in bf16
        assert features.dtype == torch.bfloat16
        pooled, attr = gsp_pool(features, model.prototypes, transport_ratio=0.4, gamma=5.0)
    assert pooled.dtype == attr.dtype == torch.bfloat16
    (pooled.float().square().sum() + attr.float()[:, 0].sum()).backward()
    assert model.prototypes.grad.dtype == torch.float32
    assert torch.isfinite(model.prototypes.grad).all() and torch.isfinite(model.project.weight.grad).all()

    feature_rows = features.detach().double().flatten(2).transpose(1, 2)  # [B, H*W, C]
    z64 = model.prototypes.detach().double().requires_grad_()
    oracle = paper_gsp(feature_rows, z64, 0.4, 5.0)
    assert rel_error(pooled, oracle.pooled) <= 2e-2
    assert rel_error(attr, oracle.attr) <= 2e-2
    (oracle.pooled.square().sum() + oracle.attr[:, 0].sum()).backward()
    assert rel_error(model.prototypes.grad, z64.grad) <= 2e-2


def _cpu_backends():
    return [name for name, status in backend_status("cpu").items() if status.available]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("eager", [True, False])
def test_callers_autocast_does_not_reach_the_backend(backend, eager):
    """float32 features inside an autocast region (forward and backward): the same bits as outside
    it. The op computes in float32 by its own policy; autocast would run the matmuls inside the
    backend in bfloat16. ``eager=False`` goes through the registered op (as torch.compile does)."""
    features, prototypes = random_inputs(3, 7, 12, 5, seed=31)

    def run(autocast):
        x = features.float().requires_grad_()
        z = prototypes.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if eager:
                pooled, attr = gsp_pool(x, z, backend=backend)
            else:
                pooled, attr, _, _ = _gsp_pool_op(x, z, 0.3, 5.0, "lipschitz", "euclidean", "newton", 64, 1e-6, "auto", backend)
            (pooled.square().sum() + attr[:, 0].sum()).backward()
        return pooled, attr, x.grad, z.grad

    for plain, under_autocast in zip(run(False), run(True)):
        assert under_autocast.dtype == torch.float32
        assert torch.equal(plain, under_autocast)


# ---------------------------------------------------------------- input validation


def _valid_inputs():
    features, prototypes = random_inputs(2, 5, 3, 4, seed=28)
    return features.float(), prototypes.float()


BAD_TENSORS = [
    ("x 2-D", lambda x, z: (x[0], z), ValueError, "x must be"),
    ("x 5-D", lambda x, z: (x[..., None, None], z), ValueError, "x must be"),
    ("prototypes 3-D", lambda x, z: (x, z[None]), ValueError, "prototypes must be"),
    ("mismatched D", lambda x, z: (x, z[:, :3]), ValueError, "prototypes has D=3 but x has D=4"),
    ("empty N", lambda x, z: (x[:, :0], z), ValueError, "x must not be empty"),
    ("empty B", lambda x, z: (x[:0], z), ValueError, "x must not be empty"),
    ("empty M", lambda x, z: (x, z[:0]), ValueError, "prototypes must not be empty"),
    ("integer x", lambda x, z: (x.long(), z), TypeError, "x must be float"),
    ("integer prototypes", lambda x, z: (x, z.int()), TypeError, "prototypes must be float"),
    ("bool x", lambda x, z: (x > 0, z), TypeError, "x must be float"),
    ("x a list", lambda x, z: (x.tolist(), z), TypeError, "x must be a torch.Tensor"),
    ("prototypes None", lambda x, z: (x, None), TypeError, "prototypes must be a torch.Tensor"),
    ("prototypes on meta", lambda x, z: (x, z.to("meta")), ValueError, "prototypes is on meta"),
]


@pytest.mark.parametrize(("make", "error", "message"), [case[1:] for case in BAD_TENSORS], ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensors(make, error, message):
    x, z = make(*_valid_inputs())
    with pytest.raises(error, match=message):
        gsp_pool(x, z)


BAD_OPTIONS = [
    ("transport_ratio", 0.0, ValueError),
    ("transport_ratio", 1.5, ValueError),
    ("transport_ratio", -0.2, ValueError),
    ("transport_ratio", math.nan, ValueError),
    ("transport_ratio", "0.3", TypeError),
    ("gamma", 0.0, ValueError),
    ("gamma", -1.0, ValueError),
    ("gamma", math.inf, ValueError),
    ("gamma", math.nan, ValueError),
    ("gamma", True, TypeError),
    ("normalize", "L2", ValueError),
    ("normalize", None, ValueError),
    ("cost", "cosine", ValueError),
    ("solver", "sinkhorn", ValueError),
    ("precision", "fp8", ValueError),
    ("backend", "tpu", ValueError),
    ("backend", 3, TypeError),
    ("max_iter", 0, ValueError),
    ("max_iter", 2.5, ValueError),
    ("tol", -1.0, ValueError),
    ("tol", 0.0, ValueError),
    ("tol", math.nan, ValueError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v, _ in BAD_OPTIONS])
def test_bad_options(name, value, error):
    x, z = _valid_inputs()
    with pytest.raises(error, match=name):
        gsp_pool(x, z, **{name: value})


@pytest.mark.parametrize(
    ("dtype", "options", "message"),
    [
        (torch.float32, {"gamma": 1e39}, "gamma=1e\\+39 overflows torch.float32"),
        (torch.bfloat16, {"gamma": 1e39}, "gamma=1e\\+39 overflows torch.float32"),
        (torch.float32, {"transport_ratio": 1e-39}, "transport_ratio=1e-39 is too small"),
        (torch.float64, {"transport_ratio": 1e-310}, "transport_ratio=1e-310 is too small"),
    ],
)
def test_parameters_must_be_representable_in_the_compute_dtype(dtype, options, message):
    """The bounds are the compute dtype's: float32 for float32 and half inputs."""
    x, z = _valid_inputs()
    with pytest.raises(ValueError, match=message):
        gsp_pool(x.to(dtype), z.to(dtype), **options)


def test_float64_takes_what_float32_cannot():
    x, z = _valid_inputs()
    _, _, weights = gsp_pool(x.double(), z.double(), transport_ratio=1e-39, return_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9)
    # gamma = 1e12: float32 cannot resolve the plan (its logits round to ~2e5) and refuses it;
    # float64's round to ~4e-4.
    with pytest.raises(ValueError, match="too large for torch.float32 to resolve the plan"):
        gsp_pool(x, z, gamma=1e12)
    _, _, weights = gsp_pool(x.double(), z.double(), gamma=1e12, return_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_by_name_says_why(backend):
    x, z = _valid_inputs()
    status = backend_status(x.device)[backend]
    if status.available:
        pytest.skip(f"{backend} runs on this machine")
    with pytest.raises(ValueError, match=backend) as info:
        gsp_pool(x, z, backend=backend)
    assert status.reason in str(info.value)


@pytest.mark.gpu
def test_tensors_on_different_devices():
    x, z = _valid_inputs()
    with pytest.raises(ValueError, match="x is on cuda"):
        gsp_pool(x.cuda(), z)
    with pytest.raises(ValueError, match="prototypes is on cuda"):
        gsp_pool(x, z.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_run_on_the_inputs_device(backend):
    """Inputs on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and agree with
    the same call made with cuda:1 current."""
    if backend not in gsp_kernels.available_backends("cuda:1"):
        pytest.skip(f"{backend} is not available")
    features, prototypes = random_inputs(3, 11, 5, 7, seed=29)

    def outputs_and_grads():
        x = features.float().to("cuda:1").requires_grad_()
        z = prototypes.float().to("cuda:1").requires_grad_()
        outputs = gsp_pool(x, z, backend=backend, return_weights=True)
        loss = sum((out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum() for out in outputs)
        return [*outputs, *torch.autograd.grad(loss, (x, z))]

    with torch.cuda.device(1):
        want = outputs_and_grads()
    with torch.cuda.device(0):
        got = outputs_and_grads()
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


# ---------------------------------------------------------------- NaN / inf policy and extremes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("normalize", ["lipschitz", "none"])
@pytest.mark.parametrize("solver", ["newton", "fixed_point"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_feature_poisons_only_its_sample(bad, solver, normalize, device):
    features, prototypes = random_inputs(3, 7, 5, 4, seed=29)
    x, z = features.float().to(device), prototypes.float().to(device)
    options = dict(normalize=normalize, solver=solver, backend="reference", return_weights=True)
    clean = gsp_pool(x, z, **options)
    x_bad = x.clone()
    x_bad[1, 2, 0] = bad
    poisoned = gsp_pool(x_bad, z, **options)
    assert not torch.isfinite(poisoned[0][1]).all(), "pooled of the bad sample must not be finite"
    # Each sample is frozen once it converges, so the other samples are bitwise unchanged.
    for out_bad, out_clean in zip(poisoned, clean):
        torch.testing.assert_close(out_bad[[0, 2]], out_clean[[0, 2]], rtol=0, atol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("solver", ["newton", "fixed_point"])
def test_nan_prototype_poisons_everything(solver, device):
    features, prototypes = random_inputs(3, 7, 5, 4, seed=30)
    z = prototypes.float().to(device)
    z[3, 1] = math.nan
    outputs = gsp_pool(features.float().to(device), z, solver=solver, backend="reference", return_weights=True)
    for out in outputs:
        assert torch.isnan(out).all()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
def test_huge_gamma_float32_is_finite(normalize, device):
    """gamma=1000: exp(-gamma c) underflows float32, the log-domain solve does not."""
    features, prototypes = random_inputs(2, 11, 6, 5, seed=31)
    x = features.float().to(device).requires_grad_()
    z = prototypes.float().to(device).requires_grad_()
    pooled, attr, weights = gsp_pool(
        x, z, transport_ratio=0.3, gamma=1000.0, normalize=normalize, backend="reference", return_weights=True
    )
    for out in (pooled, attr, weights):
        assert torch.isfinite(out).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, device=device), rtol=0, atol=1e-5)
    (pooled.square().sum() + attr[:, 0].sum() + weights[:, -1].sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["newton", "fixed_point"])
def test_transport_ratio_one_is_mean_pooling(dtype, solver, device):
    features, prototypes = random_inputs(2, 9, 4, 6, seed=32)
    x = features.to(dtype).to(device).requires_grad_()
    z = prototypes.to(dtype).to(device).requires_grad_()
    pooled, attr, weights = gsp_pool(
        x, z, transport_ratio=1.0, gamma=5.0, solver=solver, backend="reference", return_weights=True
    )
    assert torch.equal(weights, torch.full_like(weights, 1.0 / 9))
    tight = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(pooled, x.detach().mean(1), rtol=tight, atol=tight)
    generator = torch.Generator().manual_seed(33)
    grad_pooled = torch.randn(2, 6, generator=generator, dtype=dtype).to(device)
    grad_attr = torch.randn(2, 4, generator=generator, dtype=dtype).to(device)
    grad_x, grad_z = torch.autograd.grad((pooled * grad_pooled).sum() + (attr * grad_attr).sum(), (x, z))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_z).all()

    x64 = x.detach().cpu().double().requires_grad_()
    z64 = z.detach().cpu().double().requires_grad_()
    oracle = paper_gsp(x64, z64, 1.0, 5.0)  # closed-form mean pooling
    loss = (oracle.pooled * grad_pooled.cpu().double()).sum() + (oracle.attr * grad_attr.cpu().double()).sum()
    oracle_gx, oracle_gz = torch.autograd.grad(loss, (x64, z64))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_error(attr, oracle.attr) <= tol
    assert rel_error(grad_x, oracle_gx) <= tol
    assert rel_error(grad_z, oracle_gz) <= tol
