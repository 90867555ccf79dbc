"""Embedding models: a backbone trunk with a GAP baseline head or a GSP head.

Every model's forward returns ``GSPOutput``; the GAP head gives ``attributes=None``.
torchvision is imported only when a torchvision backbone is asked for.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import GSP, GSPOutput

ARCHITECTURES = ("smallcnn", "resnet18", "resnet50")
POOLINGS = ("gap", "gsp")


class SmallCNN(nn.Sequential):
    """Four 3x3 conv-BN-ReLU stages for 32x32 inputs: ``[B, 3, 32, 32]`` -> ``[B, width*2, 8, 8]``.

    Two stride-2 stages: each 16x16 collage tile maps to a 4x4 block of the output map.
    """

    def __init__(self, width: int = 32):
        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        super().__init__(*stage(3, width, 1), *stage(width, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 2 * width, 2))
        self.out_channels = 2 * width


class GlobalAveragePoolHead(nn.Module):
    """The GAP baseline: average the map, then a Linear to the embedding.

    ``[B, C, H, W]`` -> ``GSPOutput(embedding [B, E], None, weights)`` where the weights, when
    asked for, are uniform ``[B, H, W]``.
    """

    def __init__(self, in_channels: int, embedding_dim: int):
        super().__init__()
        self.projection = nn.Linear(in_channels, embedding_dim)

    def forward(self, feature_map: Tensor, return_weights: bool = False) -> GSPOutput:
        """``[B, C, H, W]`` -> ``GSPOutput`` with the averaged map's embedding (uniform weights)."""
        embedding = self.projection(feature_map.mean(dim=(2, 3)))  # [B, E]
        weights = None
        if return_weights:
            batch, _, height, width = feature_map.shape
            weights = feature_map.new_full((batch, height, width), 1.0 / (height * width))
        return GSPOutput(embedding, None, weights)


class EmbeddingModel(nn.Module):
    """``trunk`` (images -> ``[B, C, H, W]``) followed by ``head`` (a GAP head or ``GSP``)."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, images: Tensor, return_weights: bool = False) -> GSPOutput:
        """Images -> ``GSPOutput`` of the pooling head on the trunk's map."""
        return self.head(self.trunk(images), return_weights=return_weights)


def _torchvision_trunk(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialized torchvision ResNet without its avgpool and fc, and its channels."""
    import torchvision  # lazy: optional, and absent from some environments

    resnet = getattr(torchvision.models, arch)(weights=None)
    children = dict(resnet.named_children())
    trunk = nn.Sequential(*(module for name, module in children.items() if name not in ("avgpool", "fc")))
    return trunk, resnet.fc.in_features


def build_model(
    arch: str = "smallcnn",
    pooling: str = "gsp",
    embedding_dim: int = 64,
    *,
    width: int = 32,
    num_prototypes: int = 16,
    transport_ratio: float = 0.3,
    gamma: float = 5.0,
    backend: str = "auto",
) -> EmbeddingModel:
    """An ``EmbeddingModel`` with a ``SmallCNN`` (width ``width``) or torchvision ResNet trunk."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if arch == "smallcnn":
        trunk = SmallCNN(width)
        channels = trunk.out_channels
    else:
        trunk, channels = _torchvision_trunk(arch)
    if pooling == "gap":
        head = GlobalAveragePoolHead(channels, embedding_dim)
    else:
        head = GSP(channels, embedding_dim, num_prototypes, transport_ratio=transport_ratio, gamma=gamma, backend=backend)
    return EmbeddingModel(trunk, head)
