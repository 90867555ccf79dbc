"""`GSP`: Generalized Sum Pooling as an ``nn.Module`` that replaces global average pooling.

The layer takes a backbone's local features, a CNN map ``[B, C, H, W]``, a token sequence
``[B, N, C]`` or ``PatchTokens`` (a vision transformer's patch tokens with their grid),
projects every feature to the embedding space with a ``Linear(C, E)`` (applied as a 1x1
convolution to maps, as in the paper's code), and pools the projected features with
``gsp_pool`` against M learnable prototypes. Transport always happens in the projected space.

Options from the authors' code, all off by default (``pooling_method``, ``augment_max_pool``,
``memory_size``), and the prototype initializations (a batch's local features, a warm-up
memory of pooled embeddings, class proxies) are described in ``GSP``.
``nn.model.replace_global_pool`` swaps the pooling of a timm or torchvision model for the layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.reference import normalize_rows
from ..backends.specs import check_backend_name
from ..contract import (
    DEFAULT_GAMMA,
    DEFAULT_TRANSPORT_RATIO,
    LOGIT_RESOLUTION,
    check_choice,
    check_options,
    check_real,
    largest_cost,
)
from ..ops import gsp_pool
from .backbones import PatchTokens
from .masks import checked_mask, combined_masks, masked_max, masked_mean, valid_counts
from .prototypes import gathered_across_ranks, kcenter_indices

DEFAULT_NUM_PROTOTYPES = 64
POOLING_METHODS = ("sum", "gem", "max")
GEM_CLAMP = 1e-6  # generalized-mean inputs are clamped here (the authors' value)
# Learned mu and gamma never go below this (sigmoid and softplus underflow to 0 in float32).
LEARNED_MINIMUM = 1e-6
# A learned gamma stays within this share of the largest gamma gsp_pool accepts (``gamma_ceiling``).
GAMMA_CEILING_MARGIN = 0.5


def gamma_ceiling(normalize: str, cost: str, n: int = 1) -> float:
    """The largest gamma a learned one takes for N features: ``GAMMA_CEILING_MARGIN`` of the
    largest that float32, the compute dtype of every input but float64 (which accepts more),
    represents (``contract``: eps·γ·c within ``LOGIT_RESOLUTION``, γ·c·N within half the range;
    c the largest cost, 1 without normalization)."""
    limits = torch.finfo(torch.float32)
    cost_bound = largest_cost(normalize, cost) or 1.0
    return GAMMA_CEILING_MARGIN * min(LOGIT_RESOLUTION / (limits.eps * cost_bound), limits.max / 2 / (cost_bound * n))


def _logit(probability: float) -> float:
    return math.log(probability) - math.log1p(-probability)


def _inverse_softplus(value: float) -> float:
    """x with softplus(x) = value > 0 (stable for large and small values)."""
    return value + math.log(-math.expm1(-value))


class GSPOutput(NamedTuple):
    """What ``GSP.forward`` returns.

    embedding: ``[B, E]`` pooled embedding (not normalized; metric losses normalize it).
    attributes: ``[B, M]`` share of the transported mass per prototype (rows sum to 1),
        the input of ``ZeroShotPredictionLoss`` (None from heads without prototypes, such
        as the GAP baseline of ``gsp_kernels.training.models``; zeros while a ``GSP`` with a
        warm-up memory still pools by averaging).
    weights: pooling weights (sum to 1 per sample) when asked for, else None: ``[B, H, W]``
        for a map, ``[B, h, w]`` for tokens with a known grid, else ``[B, N]``.
    """

    embedding: Tensor
    attributes: Tensor | None
    weights: Tensor | None


def local_features(features: Tensor | PatchTokens, grid: tuple[int, int] | None = None) -> tuple[Tensor, tuple[int, int] | None]:
    """``(tokens [B, N, C], grid)`` of a backbone's output: a map ``[B, C, H, W]`` (a view,
    grid ``(H, W)``), tokens ``[B, N, C]`` (grid as given, checked against N, or None) or
    ``PatchTokens`` (its grid, None for the padded tokens of images of several sizes)."""
    if isinstance(features, PatchTokens):
        if grid is not None and features.grid is not None and tuple(grid) != tuple(features.grid):
            raise ValueError(f"grid {tuple(grid)} contradicts the PatchTokens grid {tuple(features.grid)}")
        features, grid = features.tokens, features.grid if features.grid is not None else grid
    if not isinstance(features, Tensor):
        raise TypeError(f"GSP expects a Tensor or PatchTokens, got {type(features).__name__}")
    if features.dim() == 4:
        if grid is not None:
            raise ValueError("grid is for token sequences [B, N, C]; a map [B, C, H, W] has its own")
        return features.flatten(2).transpose(1, 2), (features.shape[2], features.shape[3])
    if features.dim() != 3:
        raise ValueError(
            f"GSP expects a backbone map [B, C, H, W] or tokens [B, N, C] (or PatchTokens), got shape {tuple(features.shape)}"
        )
    if grid is not None:
        if len(grid) != 2 or any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in grid):
            raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}")
        if grid[0] * grid[1] != features.shape[1]:
            raise ValueError(
                f"{features.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]} positions); "
                "drop the prefix (class, distillation, register) tokens first"
            )
        grid = (grid[0], grid[1])
    return features, grid


def uniform_weights(tokens: Tensor, grid: tuple[int, int] | None, mask: Tensor | None = None) -> Tensor:
    """Average-pooling weights of ``tokens`` ``[B, N, C]``: ``1/N``, or with ``mask`` ``[B, N]``
    1/(valid count) at the valid positions and 0 elsewhere; ``[B, h, w]`` on a grid, else ``[B, N]``."""
    batch, count = tokens.shape[:2]
    shape = (batch, *grid) if grid is not None else (batch, count)
    if mask is None:
        return tokens.new_full(shape, 1.0 / count)
    return (mask.to(tokens.dtype) / valid_counts(mask, tokens.dtype)).view(shape)


def features_and_mask(features, grid, mask) -> tuple[Tensor, tuple[int, int] | None, Tensor | None]:
    """``local_features`` of ``features`` and the mask ``[B, N]`` (bool) of their valid positions:
    ``mask`` (``[B, N]``, or ``[B, h, w]`` on the grid) combined with a ``PatchTokens`` mask, or None."""
    tokens, grid = local_features(features, grid)  # [B, N, C]
    own = checked_mask(features.mask, tokens, grid) if isinstance(features, PatchTokens) else None
    return tokens, grid, combined_masks(own, checked_mask(mask, tokens, grid))


class GSP(nn.Module):
    """Generalized Sum Pooling head: local features -> ``GSPOutput``.

    Input: a map ``[B, C, H, W]``, tokens ``[B, N, C]`` (``grid=(h, w)`` to get the weights on
    the grid), or ``PatchTokens``. Every feature is projected by one ``Linear(C, E)``; transport,
    prototypes and the default pooling live in the projected space. ``mask`` (bool, True at valid
    positions: ``[B, N]`` for tokens, ``[B, H, W]`` for a map or a grid; a ``PatchTokens`` mask
    covers its patches, and is combined with it) pools each sample of a padded batch as if it
    were alone: transport, the warm-up average, the max-pool branch, "gem" and "max" read its
    valid positions only, and the weights are 0 at the others.

    Args:
        in_channels: C, channels of the backbone's features.
        embedding_dim: E, size of the embedding (the projection's output).
        num_prototypes: M (the paper uses 64, and 128 above 1000 training classes).
        transport_ratio: mu in (0, 1]: share of the feature mass pooled (1 is GAP); the start
            of a learned mu.
        gamma: inverse temperature of the transport plan; the start of a learned gamma.
        learn_transport_ratio: learn mu = sigmoid(``raw_transport_ratio``), a parameter started
            at logit(``transport_ratio``) (which must be below 1: the logit of 1 is infinite),
            kept at or above ``LEARNED_MINIMUM``: in (0, 1] whatever the optimizer does.
        learn_gamma: learn gamma = softplus(``raw_gamma``), started at ``gamma``, kept within
            [``LEARNED_MINIMUM``, ``gamma_ceiling``] (half the largest gamma ``gsp_pool``
            accepts), so that every forward is accepted. Both off (the default): mu and gamma
            are the plain floats given, the layer has no such parameters (its state dict is that
            of earlier versions), and ``gsp_pool`` gets floats. On, it gets 0-d tensors, whose
            exact gradients reach the raw parameters (the kernel backends do not take them yet:
            ``backend="auto"`` runs the reference). The properties ``transport_ratio`` and
            ``gamma`` are the current values as floats (a learned one is read from the device).
        normalize, cost: as in ``gsp_pool`` (cost-side normalization, distance).
        backend: ``gsp_pool`` backend ("auto", "reference", "triton", "cuda").
        solver, max_iter: as in ``gsp_pool``: "newton" (default, the exact root), "unrolled" (its
            steps, a fixed count with no data-dependent control flow: what ``gsp_kernels.export``
            traces) or, for parity with the authors' layers, "fixed_point" with their
            ``optimization_steps`` (``max_iter``, default 100).
        pooling_method: how the transport weights w (summing to 1) pool, with the authors' mixing
            weights N·w_i: "sum" (default): Σ_i w_i P(x_i), the paper's layer (their 'gap');
            "gem": P(GeM), GeM_c = (mean_i max(N·w_i·x_ic, 1e-6)^p)^(1/p): the mixing weights
            multiply the *backbone* features, then the clamp, one learnable scalar power p for
            all channels, the mean over the N positions, and the projection last (their
            TensorFlow ``use_gemp``, ResNet-50 config; computed in at least float32). GeM
            assumes non-negative features (post-ReLU CNN maps): the negative half of a
            transformer's LayerNorm-ed tokens is clamped away;
            "max": P(max_i N·w_i·x_i) over the backbone features (their PyTorch layer's
            default 'gmp'). P is the projection (with its bias); gradients reach the plan
            through w.
        gem_power: initial p of "gem" (the authors' 3).
        augment_max_pool: add W·max_i x_i, the projected global max pool of the (unweighted)
            backbone features (the projection's weight, no second bias), to the embedding
            before any normalization, also while a memory warms up, as theirs does (their
            ``augment_max_pool``, BN-Inception and large configs).
        memory_size: 0 (default) uses the prototypes from the first forward. K > 0: the
            authors' TensorFlow warm-up: the layer averages (GAP of the projected features,
            zero attributes) and, in training mode after ``warm_up_steps`` forwards, stores the
            pooled embeddings (the average, without ``augment_max_pool``'s term) after the cost
            normalization (all ranks' under torch.distributed) until K are stored (a batch that
            overflows overwrites the memory's tail, as theirs does); then greedy k-center
            seeded with the first M stored embeddings picks M of the other K - M
            (``kcenter_indices(memory[M:], M, covered=memory[:M])``), once, the prototypes
            become those normalized embeddings, and GSP pooling starts. K >= 2M (theirs: 1024).
            Unlike theirs, evaluation forwards store nothing. An explicit ``init_prototypes_*``
            call ends the warm-up too. While warming up, each forward reads a few scalars from
            the device (syncs); afterwards none.
        warm_up_steps: training forwards before the memory starts filling (0 for pair losses,
            about an epoch for proxy losses in the authors' configs).

    Differences from the authors' code: the projection has a bias (their PyTorch ``nn.Linear``;
    their TensorFlow 1x1 convolution has none), so "gem", "max" and the warm-up GAP add it;
    ``augment_max_pool`` adds the weight only. Transport is solved exactly (``gsp_pool``), not
    by their 100 fixed-point steps, unless ``solver="fixed_point"``. Defaults: mu 0.3 and
    gamma 5 (their TensorFlow configurations; their PyTorch layer uses gamma 0.1), pooling
    "sum" (their PyTorch layer defaults to "max"), random prototypes until initialized.
    """

    def __init__(
        self,
        in_channels: int,
        embedding_dim: int,
        num_prototypes: int = DEFAULT_NUM_PROTOTYPES,
        *,
        transport_ratio: float = DEFAULT_TRANSPORT_RATIO,
        gamma: float = DEFAULT_GAMMA,
        learn_transport_ratio: bool = False,
        learn_gamma: bool = False,
        normalize: str = "lipschitz",
        cost: str = "euclidean",
        backend: str = "auto",
        solver: str = "newton",
        max_iter: int | None = None,
        pooling_method: str = "sum",
        gem_power: float = 3.0,
        augment_max_pool: bool = False,
        memory_size: int = 0,
        warm_up_steps: int = 0,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embedding_dim", embedding_dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("memory_size", memory_size), ("warm_up_steps", warm_up_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        # gsp_pool's own checks (contract.check_options): one message for one mistake, here or there.
        options = check_options(transport_ratio, gamma, normalize, cost, solver, max_iter)
        check_backend_name(backend)
        check_choice("pooling_method", pooling_method, POOLING_METHODS)
        gem_power = check_real("gem_power", gem_power, positive=True)
        for name, value in (("augment_max_pool", augment_max_pool), ("learn_transport_ratio", learn_transport_ratio),
                            ("learn_gamma", learn_gamma)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if learn_transport_ratio and options.transport_ratio == 1.0:
            raise ValueError("learn_transport_ratio learns mu = sigmoid(logit), and the logit of transport_ratio=1 is "
                             "infinite: start a learned mu below 1 (e.g. 0.99)")
        if learn_gamma and options.gamma > gamma_ceiling(normalize, cost):
            raise ValueError(f"learn_gamma keeps gamma at or below {gamma_ceiling(normalize, cost):.6g} (half the largest "
                             f"gamma gsp_pool accepts with normalize={normalize!r}, cost={cost!r}); got gamma={options.gamma:g}")
        if 0 < memory_size < 2 * num_prototypes:
            raise ValueError(
                f"memory_size must be 0 or at least 2 * num_prototypes ({2 * num_prototypes}): k-center seeded with the "
                f"first {num_prototypes} stored embeddings picks {num_prototypes} of the others; got {memory_size}"
            )
        self._transport_ratio = options.transport_ratio
        self._gamma = options.gamma
        self.learn_transport_ratio = learn_transport_ratio
        self.learn_gamma = learn_gamma
        self.normalize = normalize
        self.cost = cost
        self.backend = backend
        self.solver = solver
        self.max_iter = max_iter
        self.pooling_method = pooling_method
        self.augment_max_pool = augment_max_pool
        self.memory_size = memory_size
        self.warm_up_steps = warm_up_steps
        self.projection = nn.Linear(in_channels, embedding_dim)
        # Default init: random directions of norm ~1, the scale of lipschitz-normalized features.
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, embedding_dim) / embedding_dim**0.5)
        self.gem_power = nn.Parameter(torch.tensor(float(gem_power))) if pooling_method == "gem" else None
        if learn_transport_ratio:
            self.raw_transport_ratio = nn.Parameter(torch.tensor(_logit(options.transport_ratio)))
        if learn_gamma:
            self.raw_gamma = nn.Parameter(torch.tensor(_inverse_softplus(options.gamma)))
        self._ready_cache = memory_size == 0
        if memory_size:
            self.register_buffer("memory", torch.zeros(memory_size, embedding_dim))  # [K, E] normalized pooled embeddings
            self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))
            self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))
            self.register_buffer("prototypes_ready", torch.zeros((), dtype=torch.bool))
            self.register_load_state_dict_post_hook(_forget_ready_cache)

    @property
    def in_channels(self) -> int:
        return self.projection.in_features

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def transport_ratio(self) -> float:
        """mu now: the float given, or the learned value (read from the device)."""
        return float(self._transport_ratio_argument().detach()) if self.learn_transport_ratio else self._transport_ratio

    @property
    def gamma(self) -> float:
        """gamma now: the float given, or the learned value (read from the device)."""
        return float(self._gamma_argument(1).detach()) if self.learn_gamma else self._gamma

    def pooling_parameters(self) -> list[nn.Parameter]:
        """The raw parameters of a learned mu and gamma (none when neither is learned)."""
        return [getattr(self, name) for name, learned in (("raw_transport_ratio", self.learn_transport_ratio),
                                                          ("raw_gamma", self.learn_gamma)) if learned]

    def _transport_ratio_argument(self) -> float | Tensor:
        """mu for ``gsp_pool``: the float, or the learned 0-d float32 tensor (with its graph)."""
        if not self.learn_transport_ratio:
            return self._transport_ratio
        return torch.sigmoid(self.raw_transport_ratio.float()).clamp_min(LEARNED_MINIMUM)

    def _gamma_argument(self, n: int) -> float | Tensor:
        """gamma for ``gsp_pool`` on N features: the float, or the learned 0-d float32 tensor."""
        if not self.learn_gamma:
            return self._gamma
        return F.softplus(self.raw_gamma.float()).clamp(LEARNED_MINIMUM, gamma_ceiling(self.normalize, self.cost, n))

    def extra_repr(self) -> str:
        text = (
            f"in_channels={self.in_channels}, embedding_dim={self.embedding_dim}, "
            f"num_prototypes={self.num_prototypes}, transport_ratio={self.transport_ratio}, "
            f"gamma={self.gamma}, normalize={self.normalize!r}, cost={self.cost!r}, backend={self.backend!r}, "
            f"pooling_method={self.pooling_method!r}"
        )
        if self.learn_transport_ratio or self.learn_gamma:
            text += f", learn_transport_ratio={self.learn_transport_ratio}, learn_gamma={self.learn_gamma}"
        if self.solver != "newton":
            text += f", solver={self.solver!r}, max_iter={self.max_iter}"
        if self.augment_max_pool:
            text += ", augment_max_pool=True"
        if self.memory_size:
            text += f", memory_size={self.memory_size}, warm_up_steps={self.warm_up_steps}"
        return text

    def _projected(self, features: Tensor) -> Tensor:
        """A map ``[B, C, H, W]`` -> ``[B, E, H, W]`` (1x1 convolution), tokens ``[B, N, C]`` -> ``[B, N, E]``."""
        if features.shape[-1 if features.dim() == 3 else 1] != self.in_channels:
            raise ValueError(f"GSP was built for {self.in_channels} channels, got features of shape {tuple(features.shape)}")
        if features.dim() == 4:
            return F.conv2d(features, self.projection.weight[:, :, None, None], self.projection.bias)
        return self.projection(features)

    def project(self, features: Tensor | PatchTokens) -> Tensor:
        """The projection of every local feature: a map ``[B, C, H, W]`` -> ``[B, E, H, W]``,
        tokens ``[B, N, C]`` (or ``PatchTokens``) -> ``[B, N, E]``."""
        if isinstance(features, PatchTokens):
            features = features.tokens
        local_features(features)  # validates the shape
        return self._projected(features)

    def forward(self, features: Tensor | PatchTokens, return_weights: bool = False, grid: tuple[int, int] | None = None,
                mask: Tensor | None = None) -> GSPOutput:
        """Pool local features; returns ``GSPOutput(embedding [B, E], attributes [B, M], weights)``
        with weights ``[B, H, W]`` / ``[B, h, w]`` / ``[B, N]`` (see ``GSPOutput``) or None.
        ``mask``: bool, True at the valid positions (see ``GSP``)."""
        tokens, grid, mask = features_and_mask(features, grid, mask)  # [B, N, C], [B, N] or None
        if isinstance(features, PatchTokens):
            features = features.tokens
        projected = self._projected(features)  # [B, E, H, W] or [B, N, E]
        if not self._prototypes_ready():
            return self._warm_up_forward(tokens, projected, grid, return_weights, mask)
        pools_backbone = self.pooling_method != "sum"
        # Under autocast the features are bf16/fp16 and the prototypes stay float32: gsp_pool
        # computes in float32 either way and returns each gradient in its input's dtype.
        options = {}
        if mask is not None:  # in the layout of the projected features: [B, H, W] for a map
            options["mask"] = mask.view(projected.shape[0], *projected.shape[2:]) if projected.dim() == 4 else mask
        result = gsp_pool(
            projected,
            self.prototypes,
            transport_ratio=self._transport_ratio_argument(),
            gamma=self._gamma_argument(tokens.shape[1]),
            normalize=self.normalize,
            cost=self.cost,
            backend=self.backend,
            solver=self.solver,
            max_iter=self.max_iter,
            return_weights=return_weights or pools_backbone,
            **options,
        )
        embedding, attributes = result[0], result[1]  # [B, E], [B, M]
        if pools_backbone:  # gradients reach the plan through the weights
            embedding = self._pool_backbone(tokens, result[2].reshape(tokens.shape[:2]), mask)
        if self.augment_max_pool:
            embedding = embedding + self._max_pool_term(tokens, mask)
        weights = None
        if return_weights:
            weights = result[2] if grid is None or result[2].dim() == 3 else result[2].view(tokens.shape[0], *grid)
        return GSPOutput(embedding, attributes, weights)

    def _pool_backbone(self, tokens: Tensor, weights: Tensor, mask: Tensor | None) -> Tensor:
        """``pooling_method`` "gem" or "max" of the backbone tokens ``[B, N, C]`` with the
        mixing weights n·w_i (w ``[B, N]``; n the sample's count of valid positions, N without
        a mask), then the projection: ``[B, E]``."""
        compute = torch.promote_types(tokens.dtype, torch.float32)  # GeM's powers in at least float32
        count = tokens.shape[1] if mask is None else valid_counts(mask, compute)  # N, or [B, 1]
        mixed = tokens.to(compute) * (weights.to(compute) * count).unsqueeze(-1)  # [B, N, C]
        if self.pooling_method == "max":
            pooled = masked_max(mixed, mask)  # [B, C]
        else:
            power = self.gem_power.to(compute)
            pooled = masked_mean(mixed.clamp_min(GEM_CLAMP).pow(power), mask).pow(1.0 / power)  # [B, C]
        return self.projection(pooled.to(tokens.dtype))

    def _max_pool_term(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """W·max_i x_i ``[B, E]`` over the valid positions: the projected global max pool (weight
        only; the embedding has the bias)."""
        return F.linear(masked_max(tokens, mask), self.projection.weight)

    def _prototypes_ready(self) -> bool:
        if not self._ready_cache:
            self._ready_cache = bool(self.prototypes_ready)  # one device read per forward while warming up
        return self._ready_cache

    def _warm_up_forward(self, tokens: Tensor, projected: Tensor, grid, return_weights: bool, mask: Tensor | None) -> GSPOutput:
        """GAP of the projected features (over the valid positions) while the prototype memory
        fills (training mode); the memory stores that average, before any max-pool term (the
        prototypes' space, as theirs)."""
        if projected.dim() == 4 and mask is None:
            embedding = projected.mean(dim=(2, 3))  # [B, E]
        else:
            embedding = masked_mean(local_features(projected)[0], mask)  # [B, E]
        if self.training:
            self._remember(embedding.detach())
        if self.augment_max_pool:
            embedding = embedding + self._max_pool_term(tokens, mask)
        # A zero-weighted touch of every parameter that GSP pooling uses, so that
        # DistributedDataParallel (without find_unused_parameters) sees them all used.
        touched = self.prototypes.sum() + sum(self.pooling_parameters(), 0.0)
        touched = touched + (self.gem_power if self.gem_power is not None else 0.0)
        embedding = embedding + 0.0 * touched
        attributes = embedding.new_zeros(embedding.shape[0], self.num_prototypes)  # [B, M]
        return GSPOutput(embedding, attributes, uniform_weights(tokens, grid, mask) if return_weights else None)

    @torch.no_grad()
    def _remember(self, embeddings: Tensor) -> None:
        """Count a training forward; after the warm-up steps, store ``embeddings`` ``[B, E]``
        (every rank's, after the cost normalization) in the memory, and pick the prototypes
        once it is full."""
        self.training_steps += 1
        if int(self.training_steps) <= self.warm_up_steps:
            return
        embeddings = gathered_across_ranks(embeddings.to(self.memory.dtype))
        embeddings = normalize_rows(embeddings, self.normalize)[0][: self.memory_size]  # [b, E]
        count = embeddings.shape[0]
        start = min(int(self.memory_filled), self.memory_size - count)  # an overflowing batch fills the tail
        self.memory[start : start + count] = embeddings
        self.memory_filled.fill_(min(int(self.memory_filled) + count, self.memory_size))
        if int(self.memory_filled) == self.memory_size:
            self.init_prototypes_from_memory()

    @torch.no_grad()
    def init_prototypes_from_memory(self) -> Tensor:
        """The authors' memory initialization, now (``memory_size`` > 0; normally called when
        the memory is full): greedy k-center over ``memory[M:]`` seeded with ``memory[:M]``;
        the prototypes become the chosen rows, and the warm-up ends. Returns their indices in
        the memory ``[M]``."""
        if not self.memory_size:
            raise ValueError("init_prototypes_from_memory needs a GSP built with memory_size > 0")
        if not torch.isfinite(self.memory).all():
            raise ValueError("the prototype memory has non-finite embeddings; the prototypes are left unchanged")
        count = self.num_prototypes
        indices = kcenter_indices(self.memory[count:], count, covered=self.memory[:count]) + count
        self.prototypes.copy_(self.memory[indices].to(self.prototypes))
        self._end_warm_up()
        return indices

    def _end_warm_up(self) -> None:
        if self.memory_size:
            self.prototypes_ready.fill_(True)
            self._ready_cache = True

    @torch.no_grad()
    def init_prototypes_kcenter(self, features: Tensor | PatchTokens, start_index: int = 0, *, mask: Tensor | None = None) -> Tensor:
        """Set the prototypes to M candidate vectors picked by greedy k-center (the paper's
        initialization), measured after the layer's cost normalization; ends any warm-up.

        features: a batch's backbone features (a map ``[B, C, H, W]``, tokens ``[B, N, C]`` or
        ``PatchTokens``, projected here: B*N candidates, the valid ones only with a mask, as in
        ``forward``), or embedding-space vectors ``[P, E]`` used as they are. Returns the chosen
        indices ``[M]`` (among the candidates).
        """
        if isinstance(features, Tensor) and features.dim() == 2:
            if features.shape[1] != self.embedding_dim:
                raise ValueError(
                    f"expected backbone features [B, {self.in_channels}, H, W] / [B, N, {self.in_channels}] "
                    f"or vectors [P, {self.embedding_dim}], got shape {tuple(features.shape)}"
                )
            vectors = features
        else:
            valid = features_and_mask(features, None, mask)[2]  # [B, N] or None
            vectors = local_features(self.project(features))[0]  # [B, N, E]
            vectors = vectors.reshape(-1, self.embedding_dim) if valid is None else vectors[valid]  # [B*N or valid, E]
        vectors = vectors.float()
        if vectors.shape[0] < self.num_prototypes:
            raise ValueError(f"{self.num_prototypes} prototypes need at least as many candidate vectors, got {vectors.shape[0]}")
        if not torch.isfinite(vectors).all():  # one sync, once: NaN prototypes would poison every output
            raise ValueError("the candidate vectors have non-finite values; the prototypes are left unchanged")
        normalized, _ = normalize_rows(vectors, self.normalize)
        indices = kcenter_indices(normalized, self.num_prototypes, start_index)
        self.prototypes.copy_(vectors[indices].to(self.prototypes))
        self._end_warm_up()
        return indices

    def init_prototypes_from_proxies(self, proxies: Tensor, start_index: int = 0) -> Tensor:
        """Greedy k-center over class proxies ``[P, E]`` (e.g. a proxy loss's ``proxies`` or a
        classifier's weight rows), starting from ``proxies[start_index]``; the prototypes become
        the chosen proxies as they are. The authors' PyTorch layer does this with its classifier's
        weights, but measures raw distances; here they are measured after the layer's cost
        normalization, where the prototypes act (the same choice with ``normalize="none"``).
        Returns the indices ``[M]``."""
        if not isinstance(proxies, Tensor) or proxies.dim() != 2 or proxies.shape[1] != self.embedding_dim:
            shape = tuple(proxies.shape) if isinstance(proxies, Tensor) else type(proxies).__name__
            raise ValueError(f"proxies must be [P, {self.embedding_dim}] (one embedding per class), got {shape}")
        if proxies.shape[0] < self.num_prototypes:
            raise ValueError(f"{self.num_prototypes} prototypes need at least as many proxies (classes), got {proxies.shape[0]}")
        return self.init_prototypes_kcenter(proxies.detach(), start_index)


def _forget_ready_cache(module: GSP, _incompatible_keys) -> None:
    """After ``load_state_dict``, read the loaded ``prototypes_ready`` flag again."""
    module._ready_cache = False
