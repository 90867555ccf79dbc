"""Backbones for GSP: the part of an image model before its global pooling.

A backbone here is an ``nn.Module`` from images to local features:

- CNNs (timm ResNet/ConvNeXt/EfficientNet/MobileNetV3/..., torchvision ResNets and other
  torchvision models with a global ``avgpool`` child) give a map ``[B, C, H, W]``;
- vision transformers (timm ViT, DeiT with its distillation token, DINO/DINOv2, models with
  register tokens, torchvision's ``VisionTransformer``) give ``PatchTokens``: the patch tokens
  ``[B, h*w, C]`` without the model's prefix tokens (class, distillation, registers), and the
  patch grid ``(h, w)`` read from the patch embedding for the images' size.

Layers a model runs after its global pooling, other than the classifier (a ViT's ``fc_norm``,
ConvNeXt's head norm), are applied to every local feature (see ``TimmBackbone``).
``backbone_from_model`` wraps a classification model (removing its classifier);
``create_backbone`` builds one from an ``--arch`` name (``resolve_arch``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet", "regnet_", "googlenet", "vit_")


class PatchTokens(NamedTuple):
    """Patch tokens of a vision transformer: ``tokens`` ``[B, h*w, C]`` in row-major grid order,
    ``grid`` ``(h, w)``. ``GSP`` pools them and returns weights on the grid ``[B, h, w]``."""

    tokens: Tensor
    grid: tuple[int, int]


def _checked_tokens(tokens: Tensor, grid: tuple[int, int], source: str) -> PatchTokens:
    """``PatchTokens`` after checking that the token count is ``h*w``."""
    height, width = grid
    if tokens.shape[1] != height * width:
        raise ValueError(
            f"{source} gave {tokens.shape[1]} patch tokens for a {height}x{width} patch grid "
            f"({height * width} expected); are the prefix tokens counted right?"
        )
    return PatchTokens(tokens, (height, width))


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward_features``, then, for transformers, the
    patch tokens after the ``num_prefix_tokens`` prefix tokens, on the grid of ``patch_embed``
    (or ``stem``; ``dynamic_feat_size`` of the images' size when the model has
    ``dynamic_img_size``).

    What the model does after its global pooling, other than the classifier, is applied to every
    local feature instead of to the pooled one, so that every parameter is used (as
    DistributedDataParallel requires) and pretrained features keep the scale the model's head was
    trained on: a transformer's ``fc_norm`` (``global_pool='avg'`` ViTs, BEiT, EVA: GSP pools
    ``fc_norm(x_i)`` where the model outputs ``fc_norm(mean_i x_i)``); a CNN head's layers between
    pooling and classifier (ConvNeXt's ``head.norm``, MobileNetV3's ``conv_head``), found by running
    ``forward_head`` once on a 1x1 map, are applied at every position through ``forward_head``.
    NHWC maps (``output_fmt == 'NHWC'``, e.g. Swin) are returned as NCHW.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        transformer = hasattr(model, "num_prefix_tokens")
        if transformer:
            model.reset_classifier(0, "")  # no classifier, no pooling (a ViT's attention pool goes too)
        else:
            model.reset_classifier(0)  # no classifier; the pooling stays, run on 1x1 maps only
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        head_channels = None if transformer else _parametric_head_channels(model)
        self.head_per_position = head_channels is not None
        self.num_features = int(model.num_features) if head_channels is None else head_channels

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of ``images`` ``[B, 3, H, W]``."""
        patch_embed = getattr(self.model, "patch_embed", None) or getattr(self.model, "stem", None)
        if patch_embed is None or not hasattr(patch_embed, "grid_size"):
            raise ValueError(
                f"{type(self.model).__name__} returns tokens but has no patch_embed.grid_size (nor stem.grid_size) to give their grid"
            )
        if getattr(self.model, "dynamic_img_size", False):
            return tuple(patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        return tuple(patch_embed.grid_size)

    def forward(self, images: Tensor) -> Tensor | PatchTokens:
        """Images ``[B, 3, H, W]`` -> map ``[B, C, h, w]`` or ``PatchTokens``."""
        features = self.model.forward_features(images)
        if features.dim() == 4:
            channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
            if self.head_per_position:
                return self._head_at_every_position(features, channels_last)
            return features.permute(0, 3, 1, 2) if channels_last else features  # [B, C, h, w]
        if features.dim() == 3:
            tokens = features[:, self.num_prefix_tokens :]  # [B, h*w, C]
            fc_norm = getattr(self.model, "fc_norm", None)
            if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
                tokens = fc_norm(tokens)
            return _checked_tokens(tokens, self.grid(images), type(self.model).__name__)
        raise ValueError(f"{type(self.model).__name__}.forward_features gave shape {tuple(features.shape)}, not a map or tokens")

    def _head_at_every_position(self, features: Tensor, channels_last: bool) -> Tensor:
        """``forward_head(pre_logits=True)`` on every position of ``features`` (``[B, C, h, w]``,
        or ``[B, h, w, C]`` when ``channels_last``) as a 1x1 map: ``[B, C', h, w]``."""
        if channels_last:
            batch, height, width, channels = features.shape
            pixels = features.reshape(-1, 1, 1, channels)  # [B*h*w, 1, 1, C]
        else:
            batch, channels, height, width = features.shape
            pixels = features.permute(0, 2, 3, 1).reshape(-1, channels, 1, 1)  # [B*h*w, C, 1, 1]
        head = self.model.forward_head(pixels, pre_logits=True).reshape(batch, height, width, self.num_features)
        return head.permute(0, 3, 1, 2)  # [B, C', h, w]


def _parametric_head_channels(model: nn.Module) -> int | None:
    """The output width of a timm CNN's ``forward_head(pre_logits=True)`` when that head has
    parameters of its own (run once, in eval mode, on a 1x1 map), else None."""
    if not hasattr(model, "forward_head"):
        return None
    parameter = next(model.parameters(), None)
    if parameter is None:
        return None
    channels = int(model.num_features)
    shape = (2, 1, 1, channels) if getattr(model, "output_fmt", "NCHW") == "NHWC" else (2, channels, 1, 1)
    used: list[nn.Module] = []
    hooks = [
        module.register_forward_hook(lambda module, _inputs, _output: used.append(module))
        for module in model.modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    modes = [(module, module.training) for module in model.modules()]  # restored one by one (e.g. frozen BatchNorm)
    try:
        model.eval()
        with torch.no_grad():
            pooled = model.forward_head(torch.zeros(shape, device=parameter.device, dtype=parameter.dtype), pre_logits=True)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:  # a head that cannot take a 1x1 map
        warnings.warn(f"{type(model).__name__}.forward_head could not run on a 1x1 map ({exc}); GSP pools forward_features, the head's own layers unused", stacklevel=3)
        return None
    finally:
        for module, training in modes:
            module.training = training
        for hook in hooks:
            hook.remove()
    return pooled.reshape(shape[0], -1).shape[1] if used else None


class TorchvisionViTBackbone(nn.Module):
    """torchvision's ``VisionTransformer`` without its heads: the encoder's output tokens
    after the class token, on the ``image_size // patch_size`` grid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.heads = nn.Identity()  # the classifier, unused
        self.model = model
        self.num_features = int(model.hidden_dim)

    def forward(self, images: Tensor) -> PatchTokens:
        """Images ``[B, 3, S, S]`` (S = the model's image_size) -> ``PatchTokens``."""
        tokens = self.model._process_input(images)  # [B, h*w, C]; checks the image size
        class_token = self.model.class_token.expand(tokens.shape[0], -1, -1)  # [B, 1, C]
        encoded = self.model.encoder(torch.cat([class_token, tokens], dim=1))  # [B, 1 + h*w, C]
        patch = self.model.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        return _checked_tokens(encoded[:, 1:], grid, "VisionTransformer")


class SequentialBackbone(nn.Sequential):
    """The children of a torchvision-style CNN before its ``avgpool``, under their own names (so
    the model's checkpoints load into it): images -> ``[B, C, H, W]``."""

    def __init__(self, children: list[tuple[str, nn.Module]], num_features: int):
        super().__init__(OrderedDict(children))
        self.num_features = num_features


def _is_torchvision_vit(model: nn.Module) -> bool:
    try:
        from torchvision.models import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def _first_linear_in_features(modules: list[nn.Module]) -> int | None:
    for head in modules:
        for module in head.modules():
            if isinstance(module, nn.Linear):
                return module.in_features
    return None


def backbone_from_model(model: nn.Module) -> nn.Module:
    """The backbone of a classification model (sharing its parameters), its classifier removed.

    Recognized: a timm model (``forward_features``, ``reset_classifier``, ``num_features``),
    torchvision's ``VisionTransformer``, and torchvision-style CNNs whose children run in order
    up to a global ``avgpool`` child (``AdaptiveAvgPool2d(1)``) followed by the classifier
    (ResNet, ResNeXt, Wide-ResNet, RegNet, EfficientNet, GoogLeNet/Inception without
    ``transform_input``; auxiliary classifiers, children named ``aux*``, are left out; layers of
    the classifier before its first Linear, e.g. torchvision ConvNeXt's LayerNorm2d, are dropped).
    The result has ``num_features`` (C, the channels of its features).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if all(hasattr(model, name) for name in ("forward_features", "reset_classifier", "num_features")):
        return TimmBackbone(model)
    if _is_torchvision_vit(model):
        return TorchvisionViTBackbone(model)
    children = list(model.named_children())
    names = [name for name, _ in children]
    if "avgpool" in names:
        name = type(model).__name__
        position = names.index("avgpool")
        pool = children[position][1]
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            raise ValueError(f"{name}'s 'avgpool' is {pool}, not a global pooling AdaptiveAvgPool2d(1): the classifier reads a map")
        if getattr(model, "transform_input", False):
            raise ValueError(f"{name} transforms its input in forward (transform_input=True), which a backbone of its children would skip")
        channels = _first_linear_in_features([module for _, module in children[position + 1 :]])
        if channels is None:
            raise ValueError(f"{name} has an 'avgpool' child but no Linear classifier after it to give the channels")
        features = [(child, module) for child, module in children[:position] if not child.lower().startswith("aux")]
        return SequentialBackbone(features, channels)
    raise ValueError(
        f"cannot find the global pooling of {type(model).__name__}: looked for a timm model "
        "(forward_features, reset_classifier, num_features), torchvision's VisionTransformer, "
        "and a torchvision-style CNN with an 'avgpool' child followed by its classifier"
    )


def resolve_arch(arch: str) -> tuple[str, str]:
    """``(library, model name)`` of an ``--arch`` value: ``("smallcnn", "smallcnn")``,
    ``("torchvision", name)`` for torchvision ResNet/ResNeXt/Wide-ResNet/RegNet/GoogLeNet/ViT
    names (resnet18, resnet50, regnet_y_400mf, googlenet, vit_b_16, ...), ``("timm", name)``
    for ``timm:NAME``, ``timm/NAME`` and ``hf-hub:timm/NAME`` (the Hugging Face spellings, read
    as the local timm name; nothing is fetched) or any other name timm knows (a pretrained tag
    ``NAME.TAG`` included).
    torchvision wins for names both libraries have (use ``timm:resnet50`` for timm's)."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a non-empty string, got {arch!r}")
    if arch == "smallcnn":
        return "smallcnn", arch
    for prefix in ("timm:", "timm/", "hf-hub:timm/", "hf_hub:timm/"):
        if arch.startswith(prefix):
            return "timm", _known_timm_name(arch[len(prefix) :], arch)
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models) and arch.startswith(TORCHVISION_PREFIXES):
        return "torchvision", arch
    import timm

    if timm.is_model(arch):
        return "timm", arch
    raise ValueError(
        f"unknown arch {arch!r}: expected 'smallcnn', a torchvision ResNet/ViT name (resnet18, resnet50, vit_b_16, ...), "
        "or a timm model name (timm:NAME, e.g. timm:vit_small_patch16_224)"
    )


def _known_timm_name(name: str, arch: str) -> str:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (from arch {arch!r}); timm.list_models('PATTERN*') lists its names")
    return name


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """A randomly initialized timm model; transformers get ``dynamic_img_size=True`` (any image
    size, position embeddings resampled) when their class takes it."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs)
    except TypeError as exc:  # CNN classes do not take the argument
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, pretrained=False, **kwargs)


def create_classifier(arch: str, **kwargs) -> nn.Module:
    """The randomly initialized classification model (timm or torchvision) an ``--arch`` names;
    ``kwargs`` go to ``timm.create_model`` or ``torchvision.models.get_model``."""
    library, name = resolve_arch(arch)
    if library == "smallcnn":
        raise ValueError("smallcnn is not a classification model of timm or torchvision")
    if library == "timm":
        return create_timm_model(name, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)
