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
their schema needs. A call with a mask, or with μ or γ as tensors (docs/math.md, Masks; Learned μ
and γ), passes those to the same forward op as optional tensors (each float then holds a
placeholder) and takes ``gsp_kernels::gsp_pool_backward_full``, which also gives their gradients;
eagerly it runs ``_EagerGspPoolFull``. A call with numbers and no mask passes none of them.
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
    check_mask,
    check_options,
    check_tensor,
    compute_dtype,
    kernel_options,
    runs_eagerly,
)


def _backend_forward(backend: str, x: Tensor, prototypes: Tensor, options: GSPOptions, *mask: Tensor):
    """The backend's forward, with the caller's autocast off (``autocast_off``: the op has its own
    precision policy). ``mask``: the ``[B, N]`` mask of a masked call, passed on (nothing otherwise)."""
    with autocast_off(x.device.type):
        return get_backend(backend).forward(x, prototypes, options, *mask)


def _backend_backward(backend: str, grads: tuple, x: Tensor, prototypes: Tensor, u: Tensor, options: GSPOptions,
                      *extended):
    """The backend's backward, with autocast off as in ``_backend_forward`` (a backward called
    inside an autocast region runs under it). ``extended``: (mask or None, parameter_grads) of the
    extended path, passed on (nothing on the plain path)."""
    with autocast_off(x.device.type):
        return get_backend(backend).backward(*grads, x, prototypes, u, options, *extended)


def _split_tensor_options(options: GSPOptions) -> tuple[GSPOptions, Tensor | None, Tensor | None]:
    """(options with a tensor μ or γ replaced by the placeholder 0.0, the μ tensor or None, the γ
    tensor or None): the schema takes the tensors as separate arguments."""
    mu, gamma = options.transport_ratio, options.gamma
    mu_tensor = mu if isinstance(mu, Tensor) else None
    gamma_tensor = gamma if isinstance(gamma, Tensor) else None
    scalars = options._replace(transport_ratio=0.0 if mu_tensor is not None else mu,
                               gamma=0.0 if gamma_tensor is not None else gamma)
    return scalars, mu_tensor, gamma_tensor


def _join_tensor_options(options: GSPOptions, mu_tensor: Tensor | None, gamma_tensor: Tensor | None) -> GSPOptions:
    """The inverse of ``_split_tensor_options``."""
    return options._replace(transport_ratio=options.transport_ratio if mu_tensor is None else mu_tensor,
                            gamma=options.gamma if gamma_tensor is None else gamma_tensor)


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
    mask: Tensor | None = None,
    transport_ratio_tensor: Tensor | None = None,
    gamma_tensor: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [B, N, D], prototypes [M, D] -> pooled [B, D], attr [B, M], weights [B, N], u [B].

    mask [B, N] bool (True: valid), transport_ratio_tensor and gamma_tensor ([] or [B]) are the
    extended call's (docs/math.md, Masks; Learned μ and γ): a given tensor replaces its float,
    which then holds the placeholder 0.0."""
    options = GSPOptions(transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision)
    options = _join_tensor_options(options, transport_ratio_tensor, gamma_tensor)
    return _backend_forward(backend, x, prototypes, options, *(() if mask is None else (mask,)))


@_gsp_pool_op.register_fake
def _gsp_pool_fake(x, prototypes, transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision, backend,
                   mask=None, transport_ratio_tensor=None, gamma_tensor=None):
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


@torch.library.custom_op("gsp_kernels::gsp_pool_backward_full", mutates_args=())
def _gsp_pool_backward_full_op(
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
    mask: Tensor | None,
    transport_ratio_tensor: Tensor | None,
    gamma_tensor: Tensor | None,
    parameter_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The extended call's backward (a mask, or μ or γ as tensors) -> grad_x, grad_prototypes and,
    with ``parameter_grads``, the per-sample gradients of μ and γ ``[B]`` in u's dtype (else two
    empty ``[0]``; docs/math.md, Learned μ and γ)."""
    options = _join_tensor_options(GSPOptions(transport_ratio, gamma, normalize, cost, precision=precision),
                                   transport_ratio_tensor, gamma_tensor)
    grads = _backend_backward(backend, (grad_pooled, grad_attr, grad_weights), x, prototypes, u, options, mask,
                              parameter_grads)
    if parameter_grads:
        return grads
    return *grads, u.new_empty((0,)), u.new_empty((0,))


@_gsp_pool_backward_full_op.register_fake
def _gsp_pool_backward_full_fake(grad_pooled, grad_attr, grad_weights, x, prototypes, u, transport_ratio, gamma,
                                 normalize, cost, precision, backend, mask, transport_ratio_tensor, gamma_tensor,
                                 parameter_grads):
    size = u.shape[0] if parameter_grads else 0
    return (torch.empty_like(x), torch.empty_like(prototypes, memory_format=torch.contiguous_format),
            u.new_empty((size,)), u.new_empty((size,)))


def _parameter_grad(grad: Tensor | None, parameter: Tensor | None) -> Tensor | None:
    """The gradient of a tensor μ or γ from its per-sample gradients ``[B]``: the batch sum for a 0-d
    tensor, in its dtype; None for a float (or one without grad)."""
    if grad is None or parameter is None or not parameter.requires_grad:
        return None
    return (grad.sum() if parameter.dim() == 0 else grad).to(parameter.dtype)


def _setup_context(ctx, inputs, output):
    x, prototypes, transport_ratio, gamma, normalize, cost, _solver, _max_iter, _tol, precision, backend, *extended = inputs
    u = output[3]
    ctx.backward_params = (transport_ratio, gamma, normalize, cost, precision, backend)
    ctx.extended = any(t is not None for t in extended)
    if not ctx.extended:
        ctx.save_for_backward(x, prototypes, u)
        return
    mask, mu_tensor, gamma_tensor = extended
    ctx.save_for_backward(x, prototypes, u, mask, mu_tensor, gamma_tensor)
    ctx.parameter_grads = any(t is not None and t.requires_grad for t in (mu_tensor, gamma_tensor))


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
    no_grads = (None,) * 9  # the scalar options
    if not ctx.extended:
        x, prototypes, u = ctx.saved_tensors
        grads = _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights)
        grad_x, grad_z = _gsp_pool_backward_op(*grads, x, prototypes, u, *ctx.backward_params)
        return grad_x, grad_z, *no_grads, None, None, None  # no mask, no tensor μ, γ
    x, prototypes, u, mask, mu_tensor, gamma_tensor = ctx.saved_tensors
    grads = _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights)
    grad_x, grad_z, grad_mu, grad_gamma = _gsp_pool_backward_full_op(
        *grads, x, prototypes, u, *ctx.backward_params, mask, mu_tensor, gamma_tensor, ctx.parameter_grads
    )
    return (grad_x, grad_z, *no_grads, None, _parameter_grad(grad_mu, mu_tensor),
            _parameter_grad(grad_gamma, gamma_tensor))


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


class _EagerGspPoolFull(torch.autograd.Function):
    """The eager path of an extended call (a mask, or μ or γ as tensors): the registered op's forward
    and ``gsp_pool_backward_full``, by the same backend functions."""

    @staticmethod
    def forward(ctx, x, prototypes, mask, mu_tensor, gamma_tensor, options, backend):
        call_options = _join_tensor_options(options, mu_tensor, gamma_tensor)
        pooled, attr, weights, u = _backend_forward(backend, x, prototypes, call_options, *(() if mask is None else (mask,)))
        ctx.save_for_backward(x, prototypes, u, mask, mu_tensor, gamma_tensor)
        ctx.options, ctx.backend = backward_options(options), backend
        ctx.mark_non_differentiable(u)
        ctx.set_materialize_grads(False)
        return pooled, attr, weights, u

    @staticmethod
    def backward(ctx, grad_pooled, grad_attr, grad_weights, _grad_u):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad[i] for i in (0, 1, 3, 4)):
            raise RuntimeError("gsp_pool has no double backward: its analytic backward is not differentiable "
                               "(backward or autograd.grad was called with create_graph=True)")
        x, prototypes, u, mask, mu_tensor, gamma_tensor = ctx.saved_tensors
        grads = _output_grads(x, prototypes, grad_pooled, grad_attr, grad_weights)
        parameter_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        options = _join_tensor_options(ctx.options, mu_tensor, gamma_tensor)
        grad_x, grad_z, *parameter = _backend_backward(ctx.backend, grads, x, prototypes, u, options, mask,
                                                       parameter_grads)
        grad_mu, grad_gamma = parameter if parameter_grads else (None, None)
        return (grad_x, grad_z, None, _parameter_grad(grad_mu, mu_tensor), _parameter_grad(grad_gamma, gamma_tensor),
                None, None)


def _run_op(x: Tensor, prototypes: Tensor, options: GSPOptions, backend: str, mask: Tensor | None = None):
    """The registered op while tracing, under functorch transforms (vmap), for tensor subclasses
    (fake tensors) and for meta tensors (its fake kernel gives their outputs), else the eager path.
    A call with a mask or a tensor μ or γ takes the extended form of either."""
    scalars, mu_tensor, gamma_tensor = _split_tensor_options(options)
    extended = mask is not None or mu_tensor is not None or gamma_tensor is not None
    if not extended:
        if not runs_eagerly(x, prototypes):
            return _gsp_pool_op(x, prototypes, *options, backend)
        return _EagerGspPool.apply(x, prototypes, options, backend)
    tensors = [t for t in (x, prototypes, mask, mu_tensor, gamma_tensor) if t is not None]
    if not runs_eagerly(*tensors):
        return _gsp_pool_op(x, prototypes, *scalars, backend, mask, mu_tensor, gamma_tensor)
    return _EagerGspPoolFull.apply(x, prototypes, mask, mu_tensor, gamma_tensor, scalars, backend)


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
    mask: Tensor | None = None,
    transport_ratio: float | Tensor = DEFAULT_TRANSPORT_RATIO,
    gamma: float | Tensor = DEFAULT_GAMMA,
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
        mask: bool ``[B, N]`` (``[B, H, W]`` for a map), True at valid positions, or None. A
            masked sample gives what the same sample without its padding gives (docs/math.md,
            Masks): its constraint counts its valid positions, its padding gets weight 0 and
            gradient 0. The padding's features are read (no copy of x), so they must be finite;
            their values do not matter. A sample with no valid position gives pooled, attr and
            weights 0 and gradients 0. The kernel backends do not take masks yet: ``auto``
            then runs the reference, ``triton``/``cuda`` by name are a ValueError.
        transport_ratio: mu in (0, 1], the share of feature mass transported; 1 is GAP. A
            float, or a 0-d or per-sample ``[B]`` floating tensor on x's device, which gets an
            exact gradient when it requires grad (docs/math.md, Learned μ and γ; at mu = 1 the
            left derivative). A tensor's values are checked at the call in eager mode (one
            device sync), not while tracing (torch.compile, export, vmap). Tensors run on the
            reference backend, as masks do.
        gamma: inverse temperature (> 0) of the plan exp(-gamma * cost), a float or a tensor
            as transport_ratio; gamma × the largest
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
        float32 (float64 if x or prototypes is float64; a tensor mu or gamma is cast to it).
        Gradients flow to x, prototypes and tensor mu, gamma through the analytic backward,
        each in its own tensor's dtype.

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
    tensor_options = [t for t in (transport_ratio, gamma) if isinstance(t, Tensor)]
    options = check_options(transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision,
                            n=features.shape[1], dtype=compute_dtype(x, prototypes), batch=features.shape[0],
                            device=x.device, check_values=bool(tensor_options) and runs_eagerly(x, prototypes, *tensor_options))
    if mask is not None:
        mask = check_mask(mask, x)  # [B, N]
    # The kernels solve by their own Newton, which is what solver="unrolled" asks of them.
    name = resolve_backend(backend, features, prototypes, kernel_options(options), mask)
    if name != "reference":
        options = kernel_options(options)
    pooled, attr, weights, _u = _run_op(features, prototypes, options, name, mask)
    if not return_weights:
        return pooled, attr
    if x.dim() == 4:
        weights = weights.view(x.shape[0], x.shape[2], x.shape[3])
    return pooled, attr, weights
