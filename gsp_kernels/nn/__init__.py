"""The GSP layer and the models around it (``gsp_kernels.nn``).

- ``GSP`` (``layer``): Generalized Sum Pooling as an ``nn.Module`` that replaces global average
  pooling; ``GSPOutput``, what it returns.
- ``EmbeddingModel``, ``GSPNet``, ``GlobalAveragePoolHead``, ``replace_global_pool`` (``model``):
  a backbone trunk with a pooling head; the GAP baseline head; a timm or torchvision model with
  its global pooling replaced by GSP.
- ``PatchTokens``, ``backbone_from_model``, ``check_image_size`` and the backbone wrappers
  (``backbones``), ``load_backbone_weights``
  (``pretrained``: local timm/torchvision checkpoints, nothing downloads).
- ``naflex_batch`` (``naflex``): a padded batch of images of several sizes for timm's NaFlexViT.
- ``kcenter_indices`` (``prototypes``): the greedy k-center selection of prototype initializations.
- ``arch``: classification models by ``--arch`` name (``resolve_arch``, ``create_classifier``).
"""

from .backbones import PatchTokens, backbone_from_model, check_image_size
from .layer import (
    DEFAULT_NUM_PROTOTYPES,
    GEM_CLAMP,
    GSP,
    LEARNED_MINIMUM,
    POOLING_METHODS,
    GSPOutput,
    gamma_ceiling,
    local_features,
    uniform_weights,
)
from .model import EmbeddingModel, GlobalAveragePoolHead, GSPNet, replace_global_pool
from .naflex import naflex_batch
from .pretrained import LoadReport, load_backbone_weights
from .prototypes import kcenter_indices

__all__ = [
    "DEFAULT_NUM_PROTOTYPES", "GEM_CLAMP", "GSP", "LEARNED_MINIMUM", "POOLING_METHODS", "EmbeddingModel", "GSPNet", "GSPOutput",
    "GlobalAveragePoolHead", "LoadReport", "PatchTokens", "backbone_from_model", "check_image_size", "kcenter_indices",
    "gamma_ceiling", "load_backbone_weights", "local_features", "naflex_batch", "replace_global_pool", "uniform_weights",
]
