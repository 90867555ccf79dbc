"""Masks (variable-size sets) and μ, γ as tensors: against the same samples run one by one without
padding, gradcheck, central finite differences of the float64 solve, the registered op, errors."""

from __future__ import annotations

import pytest
import torch

import gsp_kernels
from gsp_kernels import gsp_pool
from gsp_kernels.contract import GSPOptions
from gsp_kernels.ops import _gsp_pool_backward_full_op, _gsp_pool_op
from gsp_kernels.testing import random_inputs

F64 = torch.float64
GARBAGE = 1e30  # finite padding values: they must not matter


def padded_batch(lengths, n, d=5, m=6, seed=0, garbage=GARBAGE):
    """(x [B, N, D] with finite garbage at padding, mask [B, N], prototypes [M, D]), float64."""
    x, prototypes = random_inputs(len(lengths), n, m, d, seed=seed)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # [B, N]
    x = torch.where(mask[..., None], x, garbage)
    return x, mask, prototypes


def cotangents(batch, n, d, m, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=F64) for shape in ((batch, d), (batch, m), (batch, n))]


def loss_of(outputs, cots):
    return sum((out.reshape(cot.shape) * cot).sum() for out, cot in zip(outputs, cots))


# (lengths, N): N = 1, primes, one sample fully valid, one with a single valid position
LENGTHS = [((1,), 1), ((7, 1, 4), 7), ((13, 5, 1, 11), 13), ((2, 3), 5)]


@pytest.mark.parametrize("solver", ["newton", "unrolled", "fixed_point"])
@pytest.mark.parametrize(("lengths", "n"), LENGTHS)
def test_masked_batch_matches_samples_run_alone(lengths, n, solver):
    """Forward, weights, attr and the gradients of x, prototypes and per-sample μ, γ: each sample
    of the masked batch equals that sample run alone on its valid positions; the padding gets
    weight 0 and gradient 0 exactly."""
    x, mask, prototypes = padded_batch(lengths, n, seed=len(lengths) + n)
    batch, _, d = x.shape
    m = prototypes.shape[0]
    mu = torch.linspace(0.2, 0.9, batch, dtype=F64)
    gamma = torch.linspace(2.0, 9.0, batch, dtype=F64)
    options = {"solver": solver, "max_iter": 300 if solver == "fixed_point" else 64, "return_weights": True}
    cots = cotangents(batch, n, d, m)
    leaves = [t.clone().requires_grad_() for t in (x, prototypes, mu, gamma)]
    outputs = gsp_pool(leaves[0], leaves[1], mask=mask, transport_ratio=leaves[2], gamma=leaves[3], **options)
    grads = torch.autograd.grad(loss_of(outputs, cots), leaves)
    assert torch.equal(outputs[2][~mask], torch.zeros_like(outputs[2][~mask]))
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    grad_z_sum = torch.zeros_like(prototypes)
    for b, length in enumerate(lengths):
        alone = [t.clone().requires_grad_() for t in (x[b : b + 1, :length], prototypes, mu[b], gamma[b])]
        want = gsp_pool(alone[0], alone[1], transport_ratio=alone[2], gamma=alone[3], **options)
        cots_b = [cots[0][b : b + 1], cots[1][b : b + 1], cots[2][b : b + 1, :length]]
        want_grads = torch.autograd.grad(loss_of(want, cots_b), alone)
        got = [outputs[0][b : b + 1], outputs[1][b : b + 1], outputs[2][b : b + 1, :length]]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(grads[0][b : b + 1, :length], want_grads[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grads[2][b], want_grads[2], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grads[3][b], want_grads[3], rtol=1e-9, atol=1e-11)
        grad_z_sum += want_grads[1]
    torch.testing.assert_close(grads[1], grad_z_sum, rtol=1e-9, atol=1e-11)


def test_padding_values_do_not_matter():
    """Two batches that differ only in their (finite) padding give the same bits, gradients included."""
    results = []
    for garbage in (0.0, -3.5e20):
        x, mask, prototypes = padded_batch((6, 2, 4), 6, seed=3, garbage=garbage)
        x, prototypes = x.float().requires_grad_(), prototypes.float().requires_grad_()
        for normalize in ("lipschitz", "none"):
            outputs = gsp_pool(x, prototypes, mask=mask, normalize=normalize, return_weights=True)
            loss = loss_of(outputs, [c.float() for c in cotangents(3, 6, 5, 6)])
            results.append([*(o.detach() for o in outputs), *torch.autograd.grad(loss, (prototypes,))])
    for a, b in zip(results[:2], results[2:]):
        for got, want in zip(a, b):
            assert torch.equal(got, want)


def test_map_input_takes_a_map_mask():
    """x [B, D, H, W] with mask [B, H, W]: weights [B, H, W], equal to the [B, N, D] call."""
    x, mask, prototypes = padded_batch((12, 5), 12, seed=4)
    x_map = x.transpose(1, 2).reshape(2, 5, 3, 4)
    pooled, attr, weights = gsp_pool(x_map, prototypes, mask=mask.view(2, 3, 4), return_weights=True)
    want = gsp_pool(x, prototypes, mask=mask, return_weights=True)
    assert weights.shape == (2, 3, 4)
    for got, expected in zip((pooled, attr, weights.flatten(1)), want):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


def test_a_sample_with_no_valid_position_gives_zeros():
    """The documented result: pooled, attr, weights 0 and every gradient 0 for that sample; the
    other samples unaffected."""
    x, mask, prototypes = padded_batch((4, 0, 3), 4, seed=5)
    leaves = [t.clone().requires_grad_() for t in (x, prototypes, torch.tensor([0.3, 0.5, 0.7], dtype=F64))]
    outputs = gsp_pool(leaves[0], leaves[1], mask=mask, transport_ratio=leaves[2], return_weights=True)
    for out in outputs:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()
    grad_x, _, grad_mu = torch.autograd.grad(loss_of(outputs, cotangents(3, 4, 5, 6)), leaves)
    assert torch.equal(grad_x[1], torch.zeros_like(grad_x[1])) and grad_mu[1] == 0
    alone = gsp_pool(x[2:, :3], prototypes, transport_ratio=0.7, return_weights=True)
    torch.testing.assert_close(outputs[0][2:], alone[0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- gradients of μ and γ


@pytest.mark.parametrize("shape", ["0-d", "per-sample"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(shape, masked):
    """gradcheck in float64 of every output w.r.t. x, prototypes, μ and γ."""
    x, mask, prototypes = padded_batch((5, 2, 4), 5, d=3, m=4, seed=6, garbage=0.7)
    mu = torch.tensor(0.4, dtype=F64) if shape == "0-d" else torch.tensor([0.3, 0.6, 0.45], dtype=F64)
    gamma = torch.tensor(3.0, dtype=F64) if shape == "0-d" else torch.tensor([2.0, 4.0, 6.0], dtype=F64)

    def run(x, prototypes, mu, gamma):
        return gsp_pool(x, prototypes, mask=mask if masked else None, transport_ratio=mu, gamma=gamma,
                        return_weights=True)

    inputs = [t.clone().requires_grad_() for t in (x, prototypes, mu, gamma)]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _solve_loss(x, prototypes, mask, mu, gamma, cots, normalize="lipschitz"):
    """The loss of a float64 Newton solve converged to 1e-13, without autograd."""
    with torch.no_grad():
        outputs = gsp_pool(x, prototypes, mask=mask, transport_ratio=mu, gamma=gamma, normalize=normalize,
                           return_weights=True)
        return loss_of(outputs, cots)


@pytest.mark.parametrize("normalize", ["lipschitz", "none"])
def test_mu_and_gamma_gradients_match_central_differences(normalize):
    x, mask, prototypes = padded_batch((9, 4, 1, 7), 9, seed=7)
    mu = torch.tensor([0.05, 0.5, 0.3, 0.95], dtype=F64)
    gamma = torch.tensor([1.0, 5.0, 20.0, 60.0], dtype=F64)
    cots = cotangents(4, 9, 5, 6)
    leaves = [mu.clone().requires_grad_(), gamma.clone().requires_grad_()]
    outputs = gsp_pool(x, prototypes, mask=mask, transport_ratio=leaves[0], gamma=leaves[1], normalize=normalize,
                       return_weights=True)
    grad_mu, grad_gamma = torch.autograd.grad(loss_of(outputs, cots), leaves)
    for b in range(4):
        step = torch.zeros(4, dtype=F64)
        step[b] = 1e-6 * mu[b]
        fd_mu = (_solve_loss(x, prototypes, mask, mu + step, gamma, cots, normalize)
                 - _solve_loss(x, prototypes, mask, mu - step, gamma, cots, normalize)) / (2 * step[b])
        step = torch.zeros(4, dtype=F64)
        step[b] = 1e-6 * gamma[b]
        fd_gamma = (_solve_loss(x, prototypes, mask, mu, gamma + step, cots, normalize)
                    - _solve_loss(x, prototypes, mask, mu, gamma - step, cots, normalize)) / (2 * step[b])
        torch.testing.assert_close(grad_mu[b], fd_mu, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(grad_gamma[b], fd_gamma, rtol=1e-6, atol=1e-8)
    assert grad_mu[2] == 0  # one valid position: its weight is 1 whatever μ


def test_mu_one_takes_the_left_derivative():
    """At μ = 1 (GAP, u = +∞) the μ-gradient is the derivative from below: the limit of the
    gradients at μ < 1, and a one-sided difference."""
    x, mask, prototypes = padded_batch((6, 3), 6, seed=8)
    cots = cotangents(2, 6, 5, 6)
    gamma = torch.tensor(4.0, dtype=F64)

    def grad_at(value):
        mu = torch.tensor([value, 0.5], dtype=F64, requires_grad=True)
        outputs = gsp_pool(x, prototypes, mask=mask, transport_ratio=mu, gamma=gamma, return_weights=True)
        return torch.autograd.grad(loss_of(outputs, cots), mu)[0][0]

    at_one = grad_at(1.0)
    assert torch.isfinite(at_one)
    torch.testing.assert_close(at_one, grad_at(1 - 1e-7), rtol=1e-5, atol=1e-9)
    h = 1e-6
    one_sided = (_solve_loss(x, prototypes, mask, torch.tensor([1.0, 0.5], dtype=F64), gamma, cots)
                 - _solve_loss(x, prototypes, mask, torch.tensor([1.0 - h, 0.5], dtype=F64), gamma, cots)) / h
    torch.testing.assert_close(at_one, one_sided, rtol=1e-4, atol=1e-8)


def test_zero_dim_parameters_get_the_batch_sum():
    x, prototypes = random_inputs(3, 6, 4, 5, seed=9)
    cots = cotangents(3, 6, 5, 4)
    scalar = [torch.tensor(0.4, dtype=F64, requires_grad=True), torch.tensor(6.0, dtype=F64, requires_grad=True)]
    per_sample = [torch.full((3,), 0.4, dtype=F64, requires_grad=True), torch.full((3,), 6.0, dtype=F64, requires_grad=True)]
    grads = []
    for mu, gamma in (scalar, per_sample):
        outputs = gsp_pool(x, prototypes, transport_ratio=mu, gamma=gamma, return_weights=True)
        grads.append(torch.autograd.grad(loss_of(outputs, cots), (mu, gamma)))
    assert grads[0][0].shape == () and grads[0][1].shape == ()
    torch.testing.assert_close(grads[0][0], grads[1][0].sum(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grads[0][1], grads[1][1].sum(), rtol=1e-13, atol=1e-15)


def test_float32_tensors_match_floats_and_keep_their_dtype():
    """float32 inputs with a float64 μ tensor compute in float32 (the tensor is cast); the values
    equal those of the same numbers given as floats, and μ's gradient is float64."""
    x, prototypes = random_inputs(2, 7, 4, 5, seed=10)
    x, prototypes = x.float(), prototypes.float()
    mu = torch.tensor(0.3, dtype=F64, requires_grad=True)
    pooled, attr = gsp_pool(x, prototypes, transport_ratio=mu, gamma=torch.tensor(5.0))
    want = gsp_pool(x, prototypes, transport_ratio=0.3, gamma=5.0)
    torch.testing.assert_close(pooled, want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(attr, want[1], rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(pooled.sum(), mu)
    assert grad.dtype == F64 and torch.isfinite(grad)


# ---------------------------------------------------------------- paths: plain, registered op, tracing


def test_plain_float_calls_take_the_plain_path(monkeypatch):
    """No mask and float μ, γ: the backend forward gets (x, prototypes, options) only, and the
    eager Function is the plain one."""
    reference = gsp_kernels.backends.get_backend("reference")
    seen = []
    original = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *args: seen.append(len(args)) or original(*args))
    x, prototypes = random_inputs(2, 5, 3, 4, seed=11)
    pooled, _ = gsp_pool(x.requires_grad_(), prototypes)
    assert seen == [3] and type(pooled.grad_fn).__name__ == "_EagerGspPoolBackward"
    pooled, _ = gsp_pool(x, prototypes, mask=torch.ones(2, 5, dtype=torch.bool))
    assert seen == [3, 4] and type(pooled.grad_fn).__name__ == "_EagerGspPoolFullBackward"


def _extended_op_args(x, prototypes, mask, mu, gamma):
    return (x, prototypes, 0.0, 0.0, "lipschitz", "euclidean", "newton", 64, 1e-13, "auto", "reference", mask, mu, gamma)


@pytest.mark.parametrize("case", ["mask", "tensors", "both"])
def test_opcheck_extended(case):
    x, mask, prototypes = padded_batch((5, 3), 5, seed=12, garbage=0.5)
    mu = torch.tensor([0.3, 0.7], dtype=F64, requires_grad=True) if case != "mask" else None
    gamma = torch.tensor(4.0, dtype=F64, requires_grad=True) if case != "mask" else None
    scalars = (0.3, 5.0) if case == "mask" else (0.0, 0.0)
    mask = None if case == "tensors" else mask
    x, prototypes = x.requires_grad_(), prototypes.requires_grad_()
    args = list(_extended_op_args(x, prototypes, mask, mu, gamma))
    args[2:4] = scalars
    torch.library.opcheck(_gsp_pool_op, tuple(args))
    with torch.no_grad():
        *_, u = _gsp_pool_op(*args)
    grads = cotangents(2, 5, 5, 6)
    for parameter_grads in (False, True):
        backward_args = (*grads, x.detach(), prototypes.detach(), u, *scalars, "lipschitz", "euclidean", "auto",
                         "reference", mask, None if mu is None else mu.detach(), None if gamma is None else gamma.detach(),
                         parameter_grads)
        torch.library.opcheck(_gsp_pool_backward_full_op, backward_args)


@pytest.mark.parametrize("used", [(0, 1, 2), (0,), (2,)])
def test_eager_extended_path_matches_registered_op(used):
    x, mask, prototypes = padded_batch((6, 2, 5), 6, seed=13)
    mu, gamma = torch.tensor([0.3, 0.6, 1.0], dtype=F64), torch.tensor(4.0, dtype=F64)
    results = []
    for run in ("eager", "registered"):
        leaves = [t.clone().requires_grad_() for t in (x, prototypes, mu, gamma)]
        if run == "eager":
            options = GSPOptions(leaves[2], leaves[3], max_iter=64, tol=1e-13)
            outputs = gsp_kernels.ops._run_op(leaves[0], leaves[1], options, "reference", mask)
        else:
            outputs = _gsp_pool_op(*_extended_op_args(leaves[0], leaves[1], mask, leaves[2], leaves[3]))
        generator = torch.Generator().manual_seed(14)
        loss = sum((outputs[i] * torch.randn(outputs[i].shape, generator=generator, dtype=F64)).sum() for i in used)
        results.append([*(o.detach() for o in outputs), *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_compile_fullgraph_with_mask_and_learned_parameters():
    torch._dynamo.reset()
    x, mask, prototypes = padded_batch((7, 3, 5), 7, seed=15, garbage=0.0)
    x, prototypes = x.float(), prototypes.float()

    def step(x, prototypes, mask, mu, gamma):
        pooled, attr = gsp_pool(x, prototypes, mask=mask, transport_ratio=mu, gamma=gamma)
        return pooled.square().sum() + attr[:, 0].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for run in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, prototypes, torch.tensor([0.3, 0.5, 0.8]), torch.tensor(5.0))]
        loss = run(leaves[0], leaves[1], mask, leaves[2], leaves[3])
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_with_mask_and_tensor_mu_matches_a_loop():
    x, mask, prototypes = padded_batch((5, 2, 4, 3, 1, 5), 5, seed=16)
    mu = torch.linspace(0.2, 0.8, 6, dtype=F64)
    stacked = (x.view(2, 3, 5, 5), mask.view(2, 3, 5), mu.view(2, 3))

    def run(x, mask, mu):
        return gsp_pool(x, prototypes, mask=mask, transport_ratio=mu)

    with pytest.warns(UserWarning, match="batching rule"):
        pooled, attr = torch.func.vmap(run)(*stacked)
    for v in range(2):
        want = run(*(t[v] for t in stacked))
        torch.testing.assert_close(pooled[v], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(attr[v], want[1], rtol=1e-12, atol=1e-14)


def test_no_double_backward_on_the_extended_path():
    x, prototypes = random_inputs(2, 5, 3, 4, seed=18)
    mu = torch.tensor(0.3, dtype=F64, requires_grad=True)
    pooled, _ = gsp_pool(x, prototypes, transport_ratio=mu, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="gsp_pool has no double backward"):
        torch.autograd.grad(pooled.sum(), mu, create_graph=True)


# ---------------------------------------------------------------- errors


def test_check_options_keeps_tensors_for_a_layer():
    """Before any call (no batch, no device) a 0-d or 1-D tensor passes, its values checked."""
    from gsp_kernels.contract import check_options

    mu, gamma = torch.tensor(0.3), torch.tensor([2.0, 3.0])
    options = check_options(mu, gamma)
    assert options.transport_ratio is mu and options.gamma is gamma
    with pytest.raises(ValueError, match=r"got 1.5 \(the value of the transport_ratio tensor\)"):
        check_options(torch.tensor(1.5), 5.0)
    assert check_options(torch.tensor(1.5), 5.0, check_values=False).transport_ratio.item() == 1.5


def _inputs():
    x, prototypes = random_inputs(2, 5, 3, 4, seed=17)
    return x.float(), prototypes.float()


BAD_CALLS = [
    ("mask not bool", {"mask": torch.ones(2, 5)}, TypeError, "mask must be a bool tensor"),
    ("mask a list", {"mask": [[True] * 5] * 2}, TypeError, "mask must be a bool torch.Tensor"),
    ("mask shape", {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"mask must be \[B, N\] = \(2, 5\)"),
    ("mask on meta", {"mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, ValueError, "mask is on meta"),
    ("mu shape", {"transport_ratio": torch.full((3,), 0.3)}, ValueError, r"transport_ratio as a tensor must have shape \[\] or \[2\]"),
    ("gamma 2-D", {"gamma": torch.ones(2, 1)}, ValueError, "gamma as a tensor must have shape"),
    ("mu integer", {"transport_ratio": torch.tensor(1)}, TypeError, "transport_ratio as a tensor must be float"),
    ("mu on meta", {"transport_ratio": torch.tensor(0.3, device="meta")}, ValueError, "transport_ratio is on meta"),
    ("mu above 1", {"transport_ratio": torch.tensor([0.3, 1.5])}, ValueError, "largest value of the transport_ratio tensor"),
    ("mu zero", {"transport_ratio": torch.tensor([0.0, 0.5])}, ValueError, "smallest value of the transport_ratio tensor"),
    ("mu NaN", {"transport_ratio": torch.tensor(float("nan"))}, ValueError, "transport_ratio must be finite"),
    ("mu tiny", {"transport_ratio": torch.tensor(1e-39, dtype=F64)}, ValueError, "is too small"),
    ("gamma negative", {"gamma": torch.tensor([-1.0, 2.0])}, ValueError, "smallest value of the gamma tensor"),
    ("gamma inf", {"gamma": torch.tensor(float("inf"))}, ValueError, "gamma must be finite"),
    ("gamma too large", {"gamma": torch.tensor([1.0, 1e12])}, ValueError, "too large for torch.float32"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_masks_and_tensor_parameters(kwargs, error, message):
    x, prototypes = _inputs()
    with pytest.raises(error, match=message):
        gsp_pool(x, prototypes, **kwargs)


def test_map_mask_must_be_a_map():
    x, prototypes = _inputs()
    x_map = x.transpose(1, 2).reshape(2, 4, 5, 1)
    with pytest.raises(ValueError, match=r"mask must be \[B, H, W\] = \(2, 5, 1\)"):
        gsp_pool(x_map, prototypes, mask=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("extension", ["mask", "tensor"])
def test_kernel_backends_refuse_masks_and_tensors_by_name(backend, extension, monkeypatch):
    """Named explicitly, a kernel backend is a ValueError for a mask or a tensor μ/γ (here even
    where it would run: stand-in modules that accept everything else); ``auto`` takes the reference."""
    from types import SimpleNamespace

    from gsp_kernels import backends

    willing = SimpleNamespace(availability=lambda device: None, unsupported=lambda x, prototypes, options: None)
    monkeypatch.setitem(backends._loaded, backend, willing)
    features = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    prototypes = SimpleNamespace(device=features.device, dtype=torch.float32)
    mask = torch.ones(1, 1, dtype=torch.bool) if extension == "mask" else None
    options = GSPOptions(0.3, torch.tensor(5.0) if extension == "tensor" else 5.0)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run this call: it does not take"):
        backends.resolve_backend(backend, features, prototypes, options, mask)
    monkeypatch.setitem(backends._loaded, "cuda" if backend == "triton" else "triton", willing)
    assert backends.resolve_backend("auto", features, prototypes, options, mask) == "reference"
    assert backends.resolve_backend("auto", features, prototypes, GSPOptions(0.3, 5.0)) != "reference"
