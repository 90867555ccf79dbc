"""`gsp_pool`: the public op (docs/math.md), its validation, and its registration with the PyTorch
dispatcher.

The dispatcher sees two custom ops, ``gsp_kernels::gsp_pool`` and
``gsp_kernels::gsp_pool_backward``, each with a fake (meta) implementation, tied together by
``register_autograd``: ``torch.compile(fullgraph=True)`` traces through them, and
``torch.library.opcheck`` checks them. The backend is resolved in Python before the op runs
and passed to it by name.

Eager calls on plain tensors take ``_EagerGspPool`` instead, an ``autograd.Function`` around the
same backend functions: the custom-op wrapper costs ~50 µs of CPU per forward+backward
(argument filling, pytree handling, its own autograd node), which a GPU step of a few hundred
µs cannot hide. Under ``torch.compile``/``torch.export``, functorch transforms (``vmap``) and
for tensor subclasses (fake tensors) the registered ops are used, so tracing sees one op per
direction. Neither path has a double backward: the eager one refuses ``create_graph=True``, the
registered one fails when its backward op is differentiated.

The options travel as one ``contract.GSPOptions``; the registered ops take them as scalars, as
their schema needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import get_backend, resolve_backend
from .contract import (
    DEFAULT_GAMMA,
    DEFAULT_TRANSPORT_RATIO,
    GSPOptions,
    autocast_off,
    backward_options,
    check_options,
    check_tensor,
    compute_dtype,
    kernel_options,
)


def _backend_forward(backend: str, x: Tensor, prototypes: Tensor, options: GSPOptions):
    """The backend's forward, with the caller's autocast off (``autocast_off``: the op has its own
    precision policy)."""
    with autocast_off(x.device.type):
        return get_backend(backend).forward(x, prototypes, options)


def _backend_backward(backend: str, grads: tuple, x: Tensor, prototypes: Tensor, u: Tensor, options: GSPOptions):
    """The backend's backward, with autocast off as in ``_backend_forward`` (a backward called
    inside an autocast region runs under it)."""
    with autocast_off(x.device.type):
        return get_backend(backend).backward(*grads, x, prototypes, u, options)


@torch.library.custom_op("gsp_kernels::gsp_pool", mutates_args=())
def _gsp_pool_op(
    x: Tensor,
    prototypes: Tensor,
    transport_ratio: float,
    gamma: float,
    normalize: str,
    cost: str,
    solver: str,
    max_iter: int,
    tol: float,
    precision: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [B, N, D], prototypes [M, D] -> pooled [B, D], attr [B, M], weights [B, N], u [B]."""
    options = GSPOptions(transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision)
    return _backend_forward(backend, x, prototypes, options)


@_gsp_pool_op.register_fake
def _gsp_pool_fake(x, prototypes, transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision, backend):
    batch, n, d = x.shape
    m = prototypes.shape[0]
    pooled = x.new_empty((batch, d))
    attr = x.new_empty((batch, m))
    weights = x.new_empty((batch, n))
    u = x.new_empty((batch,), dtype=compute_dtype(x, prototypes))
    return pooled, attr, weights, u


@torch.library.custom_op("gsp_kernels::gsp_pool_backward", mutates_args=())
def _gsp_pool_backward_op(
    grad_pooled: Tensor,
    grad_attr: Tensor,
    grad_weights: Tensor,
    x: Tensor,
    prototypes: Tensor,
    u: Tensor,
    transport_ratio: float,
    gamma: float,
    normalize: str,
    cost: str,
    precision: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Analytic backward (docs/math.md, Backward) -> grad_x (x's layout and dtype), grad_prototypes."""
    options = GSPOptions(transport_ratio, gamma, normalize, cost, precision=precision)  # backward_options' fields
    return _backend_backward(backend, (grad_pooled, grad_attr, grad_weights), x, prototypes, u, options)


@_gsp_pool_backward_op.register_fake
def _gsp_pool_backward_fake(
    grad_pooled, grad_attr, grad_weights, x, prototypes, u, transport_ratio, gamma, normalize, cost, precision, backend
):
    return torch.empty_like(x), torch.empty_like(prototypes, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, prototypes, transport_ratio, gamma, normalize, cost, _solver, _max_iter, _tol, precision, backend = inputs
    u = output[3]
    ctx.save_for_backward(x, prototypes, u)
    ctx.backward_params = (transport_ratio, gamma, normalize, cost, precision, backend)


def _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights):
    """The three output gradients, zeros for those autograd left as None."""
    batch, n, d = x.shape
    if grad_pooled is None:
        grad_pooled = x.new_zeros((batch, d))
    if grad_attr is None:
        grad_attr = x.new_zeros((batch, prototypes.shape[0]))
    if grad_weights is None:
        grad_weights = x.new_zeros((batch, n))
    return grad_pooled, grad_attr, grad_weights


def _backward(ctx, grad_pooled, grad_attr, grad_weights, _grad_u):
    x, prototypes, u = ctx.saved_tensors
    grads = _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights)
    grad_x, grad_z = _gsp_pool_backward_op(*grads, x, prototypes, u, *ctx.backward_params)
    return grad_x, grad_z, None, None, None, None, None, None, None, None, None


_gsp_pool_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGspPool(torch.autograd.Function):
    """The eager path: the registered op's forward and backward, by the same backend functions,
    without the custom-op wrapper (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, prototypes, options, backend):
        pooled, attr, weights, u = _backend_forward(backend, x, prototypes, options)
        ctx.save_for_backward(x, prototypes, u)
        ctx.options, ctx.backend = backward_options(options), backend
        ctx.mark_non_differentiable(u)
        ctx.set_materialize_grads(False)
        return pooled, attr, weights, u

    @staticmethod
    def backward(ctx, grad_pooled, grad_attr, grad_weights, _grad_u):
        if torch.is_grad_enabled() and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # create_graph=True: gradients computed without a graph would drop GSP's second-order
            # terms from anything differentiated later, silently.
            raise RuntimeError("gsp_pool has no double backward: its analytic backward is not differentiable "
                               "(backward or autograd.grad was called with create_graph=True)")
        x, prototypes, u = ctx.saved_tensors
        grads = _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights)
        grad_x, grad_z = _backend_backward(ctx.backend, grads, x, prototypes, u, ctx.options)
        return grad_x, grad_z, None, None


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)  # nn.Parameter: learnable prototypes


def _run_op(x: Tensor, prototypes: Tensor, options: GSPOptions, backend: str):
    """The registered op while tracing, under functorch transforms (vmap), for tensor subclasses
    (fake tensors) and for meta tensors (its fake kernel gives their outputs), else the eager path."""
    if (
        torch.compiler.is_compiling()
        or x.device.type == "meta"
        or type(x) not in _PLAIN_TENSOR_TYPES
        or type(prototypes) not in _PLAIN_TENSOR_TYPES
        or torch._C._are_functorch_transforms_active()
    ):
        return _gsp_pool_op(x, prototypes, *options, backend)
    return _EagerGspPool.apply(x, prototypes, options, backend)


def _as_features(x: Tensor) -> Tensor:
    """[B, N, D] as is, or a channels-first map [B, D, H, W] as a [B, H*W, D] view (no copy)."""
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"x must be [B, N, D] or [B, D, H, W], got shape {tuple(x.shape)}")


def gsp_pool(
    x: Tensor,
    prototypes: Tensor,
    *,
    transport_ratio: float = DEFAULT_TRANSPORT_RATIO,
    gamma: float = DEFAULT_GAMMA,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
    solver: str = "newton",
    max_iter: int | None = None,
    tol: float | None = None,
    precision: str = "auto",
    backend: str = "auto",
    return_weights: bool = False,
):
    """Generalized Sum Pooling (docs/math.md): pool the features of each sample with OT weights.

    Args:
        x: features ``[B, N, D]``, or a channels-first map ``[B, D, H, W]`` (N = H*W, read
            through its strides without a copy).
        prototypes: ``[M, D]``.
        transport_ratio: mu in (0, 1], the share of feature mass transported; 1 is GAP.
        gamma: inverse temperature (> 0) of the plan exp(-gamma * cost); gamma × the largest
            cost × N must stay below half the compute dtype's range (a ValueError says so).
            The logits carry an error of about eps·gamma·cost, so the weights sum to 1 within
            about eps·gamma·(largest cost)·N: in float32 ~1e-5 at gamma = 1e3 with normalized
            features, several features' shares beyond ~1e6 (docs/math.md, Dtypes and their
            limits).
        normalize: "lipschitz" (x / max(1, |x|)), "l2" or "none", applied for the cost only.
        cost: "euclidean" (|ẑ - x̂|) or "sqeuclidean" (its square).
        solver: "newton" (exact root, stops on ``tol``), "unrolled" (the same Newton steps,
            exactly ``max_iter`` of them with converged samples frozen by ``torch.where``:
            no data-dependent control flow, for ``torch.export`` and ONNX; the kernel
            backends run their Newton for it) or "fixed_point" (the paper's iteration,
            exactly ``max_iter`` steps, default 100).
        max_iter: iteration cap (newton, default 64) or count (unrolled, default
            ``contract.UNROLLED_STEPS``; fixed_point, default 100).
        tol: Newton tolerance, relative; default 1e-6 (float32 compute) or 1e-13 (float64).
        precision: arithmetic of the kernel backends' cost products: "auto" (the backend's
            most accurate fast choice), "ieee", "tf32" or "tf32x3". The reference always
            computes in exact float32/float64 and ignores it.
        backend: "auto", "reference", "triton" or "cuda"; see ``backend_status()``.
        return_weights: also return the pooling weights.

    Returns:
        ``(pooled [B, D], attr [B, M])``, plus ``weights`` (``[B, N]``, or ``[B, H, W]`` for a
        4-D x) when ``return_weights``. Outputs have x's dtype; the computation runs in
        float32 (float64 if an input is float64). Gradients flow to x and prototypes through
        the analytic backward, each in its own tensor's dtype.

    Non-finite inputs are not checked (that would cost a device sync): NaN or inf in a
    sample's features gives NaN in that sample's outputs, and in prototypes, NaN everywhere;
    the solve is bounded by ``max_iter``, so it never hangs.
    """
    check_tensor("x", x)
    check_tensor("prototypes", prototypes)
    features = _as_features(x)
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be [M, D], got shape {tuple(prototypes.shape)}")
    if prototypes.shape[1] != features.shape[2]:
        raise ValueError(
            f"prototypes has D={prototypes.shape[1]} but x has D={features.shape[2]} "
            f"(x shape {tuple(x.shape)}, prototypes shape {tuple(prototypes.shape)})"
        )
    if x.device != prototypes.device:
        raise ValueError(f"x is on {x.device} but prototypes is on {prototypes.device}")
    options = check_options(transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision,
                            n=features.shape[1], dtype=compute_dtype(x, prototypes))
    # The kernels solve by their own Newton, which is what solver="unrolled" asks of them.
    name = resolve_backend(backend, features, prototypes, kernel_options(options))
    if name != "reference":
        options = kernel_options(options)
    pooled, attr, weights, _u = _run_op(features, prototypes, options, name)
    if not return_weights:
        return pooled, attr
    if x.dim() == 4:
        weights = weights.view(x.shape[0], x.shape[2], x.shape[3])
    return pooled, attr, weights
