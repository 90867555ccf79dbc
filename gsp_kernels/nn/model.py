"""Models of images -> embeddings: a backbone trunk and a pooling head (``GSP``, or the GAP
baseline ``GlobalAveragePoolHead``), and ``replace_global_pool``, which builds one from a timm or
torchvision model.

``EmbeddingModel`` is that model; ``GSPNet`` is the same model with a ``GSP`` head, held under the
name ``gsp`` (what ``replace_global_pool`` returns; its state dict is ``trunk.*`` and ``gsp.*``,
where an ``EmbeddingModel``, as training builds and saves it, has ``trunk.*`` and ``head.*``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .backbones import PatchTokens, backbone_from_model
from .layer import GSP, GSPOutput, features_and_mask, uniform_weights
from .masks import masked_mean


class GlobalAveragePoolHead(nn.Module):
    """The GAP baseline: average the local features, then a Linear to the embedding.

    It averages the very features GSP pools (GSP with transport_ratio 1 computes the same), so
    for backbones whose head runs per position (``backbones.TimmBackbone``: a ViT's ``fc_norm``,
    ConvNeXt's head norm) it is the mean of those, not the head of the mean.

    A map ``[B, C, H, W]``, tokens ``[B, N, C]`` or ``PatchTokens`` -> ``GSPOutput(embedding
    [B, E], None, weights)`` where the weights, when asked for, are uniform (``[B, H, W]``,
    ``[B, h, w]`` or ``[B, N]``, as ``GSP`` gives them). With a ``mask`` (as ``GSP`` takes it,
    or a ``PatchTokens`` mask) it averages each sample's valid positions only, as GSP pools them.
    """

    def __init__(self, in_channels: int, embedding_dim: int):
        super().__init__()
        self.projection = nn.Linear(in_channels, embedding_dim)

    def forward(self, features: Tensor | PatchTokens, return_weights: bool = False, grid: tuple[int, int] | None = None,
                mask: Tensor | None = None) -> GSPOutput:
        """Local features -> ``GSPOutput`` with the averaged features' embedding (uniform weights)."""
        tokens, grid, mask = features_and_mask(features, grid, mask)  # [B, N, C], [B, N] or None
        embedding = self.projection(masked_mean(tokens, mask))  # [B, E]
        return GSPOutput(embedding, None, uniform_weights(tokens, grid, mask) if return_weights else None)


class EmbeddingModel(nn.Module):
    """``trunk`` (images -> local features: a map or ``PatchTokens``) followed by a pooling head
    (``GSP`` or ``GlobalAveragePoolHead``); forward returns the head's ``GSPOutput``.

    ``pretrained_report``: the ``pretrained.LoadReport`` of the backbone weights loaded into the
    trunk when it was built, or None.
    """

    head_name = "head"  # the head's name among the children (and in the state dict)

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.add_module(self.head_name, head)
        self.pretrained_report = None

    @property
    def pooling_head(self) -> nn.Module:
        """The pooling head, whatever its name."""
        return getattr(self, self.head_name)

    def features(self, images: Tensor | dict) -> Tensor | PatchTokens:
        """Images (or a NaFlexViT's padded batch, ``naflex``) -> the backbone's local features (a
        map, or ``PatchTokens``)."""
        return self.trunk(images)

    def forward(self, images: Tensor | dict, return_weights: bool = False, mask: Tensor | None = None) -> GSPOutput:
        """Images -> ``GSPOutput`` of the pooling head on the trunk's features; ``mask`` (bool,
        True at valid positions of those features, ``[B, N]`` or ``[B, h, w]``) goes to the head,
        with the mask of a NaFlexViT batch's padding."""
        return self.pooling_head(self.features(images), return_weights=return_weights, mask=mask)


class GSPNet(EmbeddingModel):
    """An ``EmbeddingModel`` whose head is a ``GSP`` layer, held as ``gsp``: a backbone (see
    ``backbones``) whose global pooling and classifier are replaced by GSP."""

    head_name = "gsp"

    def __init__(self, trunk: nn.Module, gsp: GSP):
        super().__init__(trunk, gsp)


def replace_global_pool(model: nn.Module, embedding_dim: int, *, in_channels: int | None = None, **gsp_kwargs) -> GSPNet:
    """Swap the global pooling (and classifier) of an image model for a ``GSP`` layer.

    Supported (``backbones.backbone_from_model``): timm models, CNNs (ResNet, ConvNeXt,
    EfficientNet, ...) and vision transformers (ViT, DeiT, DINO/DINOv2, register tokens: the
    prefix tokens are not pooled, the grid comes from the patch embedding at the images' size),
    torchvision's ``VisionTransformer``, and torchvision CNNs with an ``avgpool`` child (ResNet,
    ConvNeXt, EfficientNet, MobileNetV3, ...). The layers the model runs between its pooling and
    its classifier's final Linear (a ViT's ``fc_norm``, ConvNeXt's head norm, MobileNetV3's
    Linear + Hardswish) are applied at every local feature; any that cannot be is named in a
    warning.

    ``model`` is changed in place, timm's and torchvision's alike, and the returned ``GSPNet``'s
    trunk holds its modules (training one trains the other): its classifier is removed (timm:
    ``reset_classifier(0)``, for transformers with their pooling; torchvision: the classifier's
    final Linear becomes an identity, ``backbones.RemovedClassifier``), so its own forward
    returns the features the classifier read; timm ViTs built for one image size take any size
    their patch size divides (timm's ``dynamic_img_size``). A size a backbone cannot take
    (torchvision's ``VisionTransformer`` takes its ``image_size`` only) is a ``ValueError`` at the
    forward saying what to change; ``backbones.check_image_size`` tells before. timm's NaFlexViT
    also takes its padded batches of images of several sizes (a dict, ``naflex``): its
    ``patch_valid`` masks the padding in attention and in GSP, so each image pools as if alone.
    ``in_channels`` defaults to the backbone's ``num_features``; ``gsp_kwargs`` go to ``GSP``.
    """
    backbone = backbone_from_model(model)
    gsp = GSP(backbone.num_features if in_channels is None else in_channels, embedding_dim, **gsp_kwargs)
    reference = next(model.parameters(), None)
    if reference is not None:
        gsp = gsp.to(device=reference.device, dtype=reference.dtype)
    return GSPNet(backbone, gsp)
