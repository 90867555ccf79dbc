"""`GSP`: Generalized Sum Pooling as an ``nn.Module`` that replaces global average pooling.

The layer takes a backbone map ``[B, C, H, W]``, projects every position to the embedding
space with a 1x1 convolution (the weights of a ``Linear(C, E)``, as in the paper's code),
and pools the projected map with ``gsp_pool`` against M learnable prototypes.
``replace_global_pool`` swaps the pooling of a torchvision ResNet or a timm model for it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _reference
from .ops import gsp_pool

DEFAULT_NUM_PROTOTYPES = 64


class GSPOutput(NamedTuple):
    """What ``GSP.forward`` returns.

    embedding: ``[B, E]`` pooled embedding (not normalized; metric losses normalize it).
    attributes: ``[B, M]`` share of the transported mass per prototype (rows sum to 1),
        the input of ``ZeroShotPredictionLoss`` (None from heads without prototypes, such
        as the GAP baseline of ``gsp_kernels.training.models``).
    weights: ``[B, H, W]`` pooling weights (sum to 1 per sample) when asked for, else None.
    """

    embedding: Tensor
    attributes: Tensor | None
    weights: Tensor | None


def kcenter_indices(points: Tensor, k: int, start_index: int = 0) -> Tensor:
    """Greedy k-center: start from ``points[start_index]``, then repeatedly add the point
    with the largest Euclidean distance to its nearest chosen point.

    points: ``[P, D]``; returns ``[k]`` int64 indices (distinct while distinct points remain).
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [P, D], got shape {tuple(points.shape)}")
    num_points = points.shape[0]
    if not 1 <= k <= num_points:
        raise ValueError(f"k must be in [1, {num_points}] (the number of points), got {k}")
    if not 0 <= start_index < num_points:
        raise ValueError(f"start_index must be in [0, {num_points}), got {start_index}")
    points = points.detach().float()
    chosen = torch.empty(k, dtype=torch.long, device=points.device)
    chosen[0] = start_index
    min_dist = torch.linalg.vector_norm(points - points[start_index], dim=1)  # [P]
    for step in range(1, k):
        next_index = torch.argmax(min_dist)
        chosen[step] = next_index
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(points - points[next_index], dim=1))
    return chosen


class GSP(nn.Module):
    """Generalized Sum Pooling head: ``[B, C, H, W]`` backbone map -> ``GSPOutput``.

    Args:
        in_channels: C, channels of the backbone map.
        embedding_dim: E, size of the embedding (the 1x1 projection's output).
        num_prototypes: M (the paper uses 64, and 128 above 1000 training classes).
        transport_ratio: mu in (0, 1]: share of the feature mass pooled (1 is GAP).
        gamma: inverse temperature of the transport plan.
        normalize, cost: as in ``gsp_pool`` (cost-side normalization, distance).
        backend: ``gsp_pool`` backend ("auto", "reference", "triton", "cuda").
    """

    def __init__(
        self,
        in_channels: int,
        embedding_dim: int,
        num_prototypes: int = DEFAULT_NUM_PROTOTYPES,
        *,
        transport_ratio: float = 0.3,
        gamma: float = 5.0,
        normalize: str = "lipschitz",
        cost: str = "euclidean",
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embedding_dim", embedding_dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < transport_ratio <= 1.0:
            raise ValueError(f"transport_ratio must be in (0, 1], got {transport_ratio}")
        if not gamma > 0.0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if normalize not in _reference.NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {_reference.NORMALIZE_MODES}, got {normalize!r}")
        if cost not in _reference.COST_MODES:
            raise ValueError(f"cost must be one of {_reference.COST_MODES}, got {cost!r}")
        self.transport_ratio = float(transport_ratio)
        self.gamma = float(gamma)
        self.normalize = normalize
        self.cost = cost
        self.backend = backend
        # A Linear's weights applied as a 1x1 convolution (Linear's default init).
        self.projection = nn.Linear(in_channels, embedding_dim)
        # Default init: random directions of norm ~1, the scale of lipschitz-normalized features.
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, embedding_dim) / embedding_dim**0.5)

    @property
    def in_channels(self) -> int:
        return self.projection.in_features

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, embedding_dim={self.embedding_dim}, "
            f"num_prototypes={self.num_prototypes}, transport_ratio={self.transport_ratio}, "
            f"gamma={self.gamma}, normalize={self.normalize!r}, cost={self.cost!r}, backend={self.backend!r}"
        )

    def project(self, feature_map: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, E, H, W]``: the 1x1 projection of every position."""
        if feature_map.dim() != 4:
            raise ValueError(f"GSP expects a backbone map [B, C, H, W], got shape {tuple(feature_map.shape)}")
        if feature_map.shape[1] != self.in_channels:
            raise ValueError(f"GSP was built for {self.in_channels} channels, got a map with {feature_map.shape[1]}")
        weight = self.projection.weight[:, :, None, None]  # [E, C, 1, 1]
        return F.conv2d(feature_map, weight, self.projection.bias)

    def forward(self, feature_map: Tensor, return_weights: bool = False) -> GSPOutput:
        """Pool ``[B, C, H, W]``; returns ``GSPOutput(embedding [B, E], attributes [B, M],
        weights [B, H, W] or None)``."""
        projected = self.project(feature_map)  # [B, E, H, W]
        # Under autocast the map is bf16/fp16 and the prototypes stay float32: gsp_pool
        # computes in float32 either way and returns each gradient in its input's dtype.
        result = gsp_pool(
            projected,
            self.prototypes,
            transport_ratio=self.transport_ratio,
            gamma=self.gamma,
            normalize=self.normalize,
            cost=self.cost,
            backend=self.backend,
            return_weights=return_weights,
        )
        weights = result[2] if return_weights else None
        return GSPOutput(result[0], result[1], weights)

    @torch.no_grad()
    def init_prototypes_kcenter(self, feature_maps: Tensor, start_index: int = 0) -> Tensor:
        """Set the prototypes to M of the projected local features of a batch, picked by
        greedy k-center (the paper's initialization).

        feature_maps: backbone maps ``[B, C, H, W]`` (projected here) giving B*H*W
        candidates, or embedding-space vectors ``[P, E]`` used as they are. Distances are
        measured after the layer's cost normalization. Returns the chosen indices ``[M]``.
        """
        if feature_maps.dim() == 4:
            vectors = self.project(feature_maps).flatten(2).transpose(1, 2).reshape(-1, self.embedding_dim)  # [B*H*W, E]
        elif feature_maps.dim() == 2 and feature_maps.shape[1] == self.embedding_dim:
            vectors = feature_maps
        else:
            raise ValueError(
                f"expected backbone maps [B, {self.in_channels}, H, W] or vectors [P, {self.embedding_dim}], "
                f"got shape {tuple(feature_maps.shape)}"
            )
        vectors = vectors.float()
        if vectors.shape[0] < self.num_prototypes:
            raise ValueError(f"{self.num_prototypes} prototypes need at least as many candidate vectors, got {vectors.shape[0]}")
        if not torch.isfinite(vectors).all():  # one sync, once: NaN prototypes would poison every output
            raise ValueError("the candidate vectors have non-finite values; the prototypes are left unchanged")
        normalized, _ = _reference.normalize_rows(vectors, self.normalize)
        indices = kcenter_indices(normalized, self.num_prototypes, start_index)
        self.prototypes.copy_(vectors[indices].to(self.prototypes))
        return indices


class GSPNet(nn.Module):
    """A backbone whose global pooling and classifier are replaced by a ``GSP`` layer.

    ``trunk`` maps images to a backbone map ``[B, C, H, W]`` (through its
    ``forward_features`` when ``use_forward_features``, as for a timm model); forward returns
    ``GSPOutput``.
    """

    def __init__(self, trunk: nn.Module, gsp: GSP, use_forward_features: bool = False):
        super().__init__()
        self.trunk = trunk
        self.gsp = gsp
        self.use_forward_features = use_forward_features

    def features(self, images: Tensor) -> Tensor:
        """Images -> backbone map ``[B, C, H, W]``."""
        return self.trunk.forward_features(images) if self.use_forward_features else self.trunk(images)

    def forward(self, images: Tensor, return_weights: bool = False) -> GSPOutput:
        """Images -> ``GSPOutput`` of the GSP head on the backbone map."""
        return self.gsp(self.features(images), return_weights=return_weights)


def _linear_in_features(head: nn.Module) -> int | None:
    """in_features of a Linear head, or of the first Linear inside a head module."""
    if isinstance(head, nn.Linear):
        return head.in_features
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


def replace_global_pool(model: nn.Module, embedding_dim: int, *, in_channels: int | None = None, **gsp_kwargs) -> GSPNet:
    """Swap the global average pooling (and classifier) of a CNN for a ``GSP`` layer.

    Supported structures:
      - torchvision style: children run in order, with an ``avgpool`` child followed by the
        classifier (``fc``, as in ResNet). The trunk is the children before ``avgpool``.
      - timm style: ``forward_features`` gives the map, ``global_pool``/``forward_head``
        pool and classify; the classifier is removed with ``reset_classifier(0, "")``.

    The returned ``GSPNet`` shares the backbone's parameters with ``model``. ``in_channels``
    is read from the classifier (``fc.in_features``) or ``num_features`` unless given.
    ``gsp_kwargs`` go to ``GSP`` (num_prototypes, transport_ratio, gamma, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, "forward_features") and (hasattr(model, "global_pool") or hasattr(model, "forward_head")):
        if in_channels is None:
            in_channels = getattr(model, "num_features", None)
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0, "")  # drop the classifier so DDP sees no unused parameters
        gsp = _build_gsp(in_channels, embedding_dim, gsp_kwargs, model)
        return GSPNet(model, gsp, use_forward_features=True)
    names = [name for name, _ in model.named_children()]
    if "avgpool" in names:
        pool_position = names.index("avgpool")
        if in_channels is None:
            for head_name in names[pool_position + 1 :]:
                in_channels = _linear_in_features(getattr(model, head_name))
                if in_channels is not None:
                    break
        trunk = nn.Sequential(*(child for _, child in list(model.named_children())[:pool_position]))
        return GSPNet(trunk, _build_gsp(in_channels, embedding_dim, gsp_kwargs, model))
    raise ValueError(
        f"{type(model).__name__} has neither an 'avgpool' child (torchvision style) nor "
        "'forward_features' with 'global_pool'/'forward_head' (timm style)"
    )


def _build_gsp(in_channels, embedding_dim, gsp_kwargs, model) -> GSP:
    if in_channels is None:
        raise ValueError(f"could not infer the channels of {type(model).__name__}'s map; pass in_channels")
    reference = next(model.parameters(), None)
    gsp = GSP(in_channels, embedding_dim, **gsp_kwargs)
    if reference is not None:
        gsp = gsp.to(device=reference.device, dtype=reference.dtype)
    return gsp
