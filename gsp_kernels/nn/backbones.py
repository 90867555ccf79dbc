"""Backbones for GSP: the part of an image model before its global pooling.

A backbone here is an ``nn.Module`` from images to local features:

- CNNs (timm ResNet/ConvNeXt/EfficientNet/MobileNetV3/..., torchvision ResNets and other
  torchvision models with a global ``avgpool`` child) give a map ``[B, C, H, W]``;
- vision transformers (timm ViT, DeiT with its distillation token, DINO/DINOv2, models with
  register tokens, torchvision's ``VisionTransformer``) give ``PatchTokens``: the patch tokens
  ``[B, h*w, C]`` without the model's prefix tokens (class, distillation, registers), and the
  patch grid ``(h, w)`` read from the patch embedding for the images' size.

Layers a model runs after its global pooling, other than the classifier (a ViT's ``fc_norm``,
ConvNeXt's head norm, MobileNetV3's Linear + Hardswish), are applied to every local feature (see
``TimmBackbone``, ``SequentialBackbone``); a layer that cannot be is named in a warning.
``backbone_from_model`` wraps a classification model, changing it in place (its classifier
removed, timm ViTs switched to any image size); ``check_image_size`` says whether a backbone takes
an image size (``arch`` builds a classification model from an ``--arch`` name).
"""

from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .naflex import is_naflex, naflex_patch_tokens


class PatchTokens(NamedTuple):
    """Patch tokens of a vision transformer: ``tokens`` ``[B, h*w, C]`` in row-major grid order,
    ``grid`` ``(h, w)``. ``GSP`` pools them and returns weights on the grid ``[B, h, w]``.

    A padded batch of images of several sizes (timm's NaFlexViT, ``naflex``) has tokens
    ``[B, N, C]``, no one grid (None) and ``mask`` ``[B, N]`` (bool, True at its images'
    patches), which the pooling heads respect."""

    tokens: Tensor
    grid: tuple[int, int] | None
    mask: Tensor | None = None


def _checked_tokens(tokens: Tensor, grid: tuple[int, int], source: str) -> PatchTokens:
    """``PatchTokens`` after checking that the token count is ``h*w``."""
    height, width = grid
    if tokens.shape[1] != height * width:
        raise ValueError(
            f"{source} gave {tokens.shape[1]} patch tokens for a {height}x{width} patch grid "
            f"({height * width} expected); are the prefix tokens counted right?"
        )
    return PatchTokens(tokens, (height, width))


class RemovedClassifier(nn.Identity):
    """What a torchvision model's classifier Linear becomes once ``backbone_from_model`` has
    taken the model: an ``nn.Identity`` that remembers the ``in_features`` it read (so the model,
    its forward now returning those features, can be wrapped again)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = int(in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}"


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _size_text(height: int, width: int) -> str:
    return f"{height}x{width}"


def _timm_patch_embed(model: nn.Module) -> nn.Module | None:
    for name in ("patch_embed", "stem", "embeds"):  # embeds: NaFlexViT
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _timm_size_error(model: nn.Module, height: int, width: int) -> str | None:
    """Why the timm model ``model``, as it is, refuses ``height x width`` images (what to change),
    or None when it takes them: a patch embedding with ``strict_img_size`` takes its ``img_size``
    only; one without (``dynamic_img_size`` models) sizes its patch size divides, unless it pads
    (``dynamic_img_pad``). Models without such a patch embedding (CNNs) take any size."""
    patch_embed = _timm_patch_embed(model)
    img_size = getattr(patch_embed, "img_size", None)
    if patch_embed is None or img_size is None:
        return None
    name = type(model).__name__
    if getattr(patch_embed, "strict_img_size", False):
        built = _pair(img_size)
        if (height, width) == built:
            return None
        wanted = height if height == width else (height, width)
        return (
            f"{name} takes {_size_text(*built)} images only (the img_size it was built with), got {_size_text(height, width)}: "
            f"build it for that size (timm.create_model(NAME, img_size={wanted!r}), or dynamic_img_size=True for any size where "
            f"the model takes it) or call its set_input_size(img_size={(height, width)!r}) (timm resamples the position "
            "embedding) before replace_global_pool / backbone_from_model"
        )
    if not hasattr(patch_embed, "strict_img_size") or getattr(patch_embed, "dynamic_img_pad", False):
        return None  # not timm's PatchEmbed/HybridEmbed (whose forward checks sizes), or padding to whole patches
    ratio = patch_embed.feat_ratio(as_scalar=False) if hasattr(patch_embed, "feat_ratio") else getattr(patch_embed, "patch_size", 1)
    patch_h, patch_w = _pair(ratio)
    if height % patch_h or width % patch_w:
        up = (-(-height // patch_h) * patch_h, -(-width // patch_w) * patch_w)
        down = (max(patch_h, height // patch_h * patch_h), max(patch_w, width // patch_w * patch_w))
        return (
            f"image size {_size_text(height, width)} is not a multiple of {name}'s patch size {_size_text(patch_h, patch_w)}: "
            f"use a multiple of it (e.g. {_size_text(*down)} or {_size_text(*up)})"
        )
    return None


def _enable_dynamic_img_size(model: nn.Module) -> None:
    """Switch a timm ViT (``VisionTransformer``: ViT, DeiT, DINO/DINOv2, register tokens) or EVA
    without rotary embeddings, built for one image size, to timm's ``dynamic_img_size`` mode, set
    as timm's constructor sets it for ``dynamic_img_size=True`` (the patch embedding unflattened,
    NHWC, not strict; the model resamples its position embedding to each batch's grid, an
    identity at the built size). Other models are left as they are (their size checked by
    ``_timm_size_error``)."""
    if getattr(model, "dynamic_img_size", True):
        return
    try:
        from timm.layers import Format
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm too old to have these
        return
    if not isinstance(model, (VisionTransformer, Eva)):
        return
    if isinstance(model, Eva) and getattr(model, "rope", None) is not None:
        return  # its rotary embedding is cached for the built grid: only the constructor sets it up for any size
    patch_embed = getattr(model, "patch_embed", None)
    if not all(hasattr(patch_embed, name) for name in ("strict_img_size", "flatten", "output_fmt", "dynamic_feat_size")):
        return
    patch_embed.strict_img_size = False
    patch_embed.flatten = False
    patch_embed.output_fmt = Format.NHWC
    model.dynamic_img_size = True


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward_features``, then, for transformers, the
    patch tokens after the ``num_prefix_tokens`` prefix tokens, on the grid of ``patch_embed``
    (or ``stem``; ``dynamic_feat_size`` of the images' size when the model has
    ``dynamic_img_size``).

    The model is changed in place: ``reset_classifier(0)`` (transformers: ``reset_classifier(0,
    '')``, their pooling removed too, a ``map`` ViT's attention pool included, which is named in a
    warning); timm ViTs and EVA (without rotary embeddings) built for one image size are switched
    to timm's ``dynamic_img_size`` mode, so they take any size their patch size divides; other
    sizes, and any size but its own for a model that cannot be switched, are a ``ValueError``
    at the forward saying what to change (``check_image_size`` tells before).

    What the model does after its global pooling, other than the classifier, is applied to every
    local feature instead of to the pooled one, so that every parameter is used (as
    DistributedDataParallel requires) and pretrained features keep the scale the model's head was
    trained on: a transformer's ``fc_norm`` and ``head_drop`` (``global_pool='avg'`` ViTs, BEiT, EVA: GSP pools
    ``fc_norm(x_i)`` where the model outputs ``fc_norm(mean_i x_i)``); a CNN head's layers between
    pooling and classifier (ConvNeXt's ``head.norm``, MobileNetV3's ``conv_head``), found by running
    ``forward_head`` once on a 1x1 map, are applied at every position through ``forward_head``.
    NHWC maps (``output_fmt == 'NHWC'``, e.g. Swin) are returned as NCHW. timm's NaFlexViT takes
    images of any size its patch size divides, and its padded batches (a dict, ``naflex``), whose
    ``patch_valid`` becomes the ``PatchTokens`` mask.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        transformer = hasattr(model, "num_prefix_tokens")
        if transformer:
            attn_pool = getattr(model, "attn_pool", None)
            if isinstance(attn_pool, nn.Module):
                warnings.warn(
                    f"{type(model).__name__}'s attention pooling attn_pool ({type(attn_pool).__name__}) is removed: "
                    "GSP pools the patch tokens in its place",
                    stacklevel=4,
                )
            model.reset_classifier(0, "")  # no classifier, no pooling (a ViT's attention pool goes too)
            _enable_dynamic_img_size(model)
        else:
            model.reset_classifier(0)  # no classifier; the pooling stays, run on 1x1 maps only
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        head_channels = None if transformer else _parametric_head_channels(model)
        self.head_per_position = head_channels is not None
        self.num_features = int(model.num_features) if head_channels is None else head_channels

    def image_size_error(self, height: int, width: int) -> str | None:
        """Why ``height x width`` images are refused (what to change), or None when they are taken."""
        return _timm_size_error(self.model, height, width)

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of ``images`` ``[B, 3, H, W]``."""
        patch_embed = _timm_patch_embed(self.model)
        if patch_embed is not None and is_naflex(self.model):  # any size: its embeds have no one grid
            return tuple(patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        if patch_embed is None or not hasattr(patch_embed, "grid_size"):
            raise ValueError(
                f"{type(self.model).__name__} returns tokens but has no patch_embed.grid_size (nor stem.grid_size) to give their grid"
            )
        if getattr(self.model, "dynamic_img_size", False):
            return tuple(patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        return tuple(patch_embed.grid_size)

    def forward(self, images: Tensor | dict) -> Tensor | PatchTokens:
        """Images ``[B, 3, H, W]`` -> map ``[B, C, h, w]`` or ``PatchTokens``; a NaFlexViT's
        padded batch (a dict, see ``naflex``) -> ``PatchTokens`` with its ``patch_valid`` as mask."""
        if isinstance(images, dict):
            tokens, valid = naflex_patch_tokens(self.model, images)
            return PatchTokens(self._per_token_head(tokens[:, self.num_prefix_tokens :]), None, valid)
        if images.dim() == 4:
            problem = self.image_size_error(int(images.shape[-2]), int(images.shape[-1]))
            if problem is not None:
                raise ValueError(problem)
        features = self.model.forward_features(images)
        if features.dim() == 4:
            channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
            if self.head_per_position:
                return self._head_at_every_position(features, channels_last)
            return features.permute(0, 3, 1, 2) if channels_last else features  # [B, C, h, w]
        if features.dim() == 3:
            tokens = self._per_token_head(features[:, self.num_prefix_tokens :])  # [B, h*w, C]
            return _checked_tokens(tokens, self.grid(images), type(self.model).__name__)
        raise ValueError(f"{type(self.model).__name__}.forward_features gave shape {tuple(features.shape)}, not a map or tokens")

    def _per_token_head(self, tokens: Tensor) -> Tensor:
        """A transformer's ``fc_norm`` and ``head_drop`` at every patch token ``[B, N, C]``."""
        for name in ("fc_norm", "head_drop"):
            layer = getattr(self.model, name, None)
            if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
                tokens = layer(tokens)
        return tokens

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


def _torchvision_vit_size_error(model: nn.Module, height: int, width: int) -> str | None:
    built, patch = int(model.image_size), int(model.patch_size)
    if (height, width) == (built, built):
        return None
    return (
        f"torchvision's VisionTransformer takes {built}x{built} images only (the image_size it was built with: its "
        f"position embedding is fixed), got {_size_text(height, width)}: use {built} px images, or build the model for "
        "the size you want (square, a multiple of the patch size "
        f"{patch}): torchvision.models.get_model(NAME, image_size=SIZE) or VisionTransformer(image_size=SIZE, ...), "
        "pretrained weights loaded into it through torchvision.models.vision_transformer.interpolate_embeddings"
    )


class TorchvisionViTBackbone(nn.Module):
    """torchvision's ``VisionTransformer`` without its classifier: the encoder's output tokens
    after the class token, on the ``image_size // patch_size`` grid, through the layers of
    ``heads`` before its final Linear (a ``representation_size`` model's ``pre_logits`` Linear
    and Tanh) at every token.

    The model is changed in place: ``heads``' final Linear becomes a ``RemovedClassifier``
    (identity), so the model's forward returns what that Linear read. torchvision has no way to
    run one model at another size than its ``image_size`` (its position embedding is a fixed
    parameter): any other size is a ``ValueError`` at the forward, before torchvision's assertion,
    saying how to build one for that size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        heads = getattr(model, "heads", None)
        if isinstance(heads, nn.Linear):
            model.heads = RemovedClassifier(heads.in_features)
            channels = heads.in_features
        elif isinstance(heads, nn.Sequential):
            channels = _remove_classifier(model, [("heads", heads)], type(model).__name__)[1]
        else:
            channels = None
        self.model = model
        self.num_features = int(model.hidden_dim) if channels is None else int(channels)

    def image_size_error(self, height: int, width: int) -> str | None:
        """Why ``height x width`` images are refused (what to change), or None when they are taken."""
        return _torchvision_vit_size_error(self.model, height, width)

    def forward(self, images: Tensor) -> PatchTokens:
        """Images ``[B, 3, S, S]`` (S = the model's image_size) -> ``PatchTokens``."""
        if images.dim() == 4:
            problem = self.image_size_error(int(images.shape[-2]), int(images.shape[-1]))
            if problem is not None:
                raise ValueError(problem)
        tokens = self.model._process_input(images)  # [B, h*w, C]; checks the image size
        class_token = self.model.class_token.expand(tokens.shape[0], -1, -1)  # [B, 1, C]
        encoded = self.model.encoder(torch.cat([class_token, tokens], dim=1))  # [B, 1 + h*w, C]
        patch = self.model.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        patch_tokens = encoded[:, 1:]
        heads = getattr(self.model, "heads", None)
        if isinstance(heads, nn.Module) and not isinstance(heads, nn.Identity):
            patch_tokens = heads(patch_tokens)  # the layers before the removed classifier, per token
        return _checked_tokens(patch_tokens, grid, "VisionTransformer")


class SequentialBackbone(nn.Sequential):
    """The children of a torchvision-style CNN before its ``avgpool``, under their own names (so
    the model's checkpoints load into it): images -> ``[B, C, H, W]``.

    ``head``: the layers the model runs between its global pooling and its classifier's final
    Linear (torchvision ConvNeXt's ``classifier.0`` LayerNorm2d and Flatten, MobileNetV3's
    ``classifier.0-2`` Linear, Hardswish and Dropout, EfficientNet's Dropout), as ``(name,
    module)`` under their names in the model (nested in ``nn.Sequential`` containers: ``classifier``
    holding ``0``, ``1``, ...); they run at every position of the map as on the model's pooled
    ``[B, C, 1, 1]`` map (flattened to ``[B, C]`` first, as torchvision's forwards do, unless the
    head has its own ``Flatten``), giving ``[B, C', H, W]``. ``num_features`` is ``C'``."""

    def __init__(self, children: list[tuple[str, nn.Module]], num_features: int, head: list[tuple[str, nn.Module]] | None = None):
        head = list(head or [])
        super().__init__(OrderedDict(children + head))
        self.num_features = num_features
        self.head_names = tuple(name for name, _ in head)
        self.head_flattens = any(isinstance(module, nn.Flatten) for _, module in _units(head))

    def forward(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` -> ``[B, C, h, w]``."""
        features = images
        head = []
        for name, module in self._modules.items():
            if name in self.head_names:
                head.append(module)
            else:
                features = module(features)
        if not head:
            return features
        batch, channels, height, width = features.shape
        # [B*h*w, C, 1, 1]: each position as a pooled map, in a tensor of its own (heads may work in place)
        pixels = torch.clone(features.permute(0, 2, 3, 1), memory_format=torch.contiguous_format).reshape(-1, channels, 1, 1)
        if not self.head_flattens:
            pixels = pixels.flatten(1)  # [B*h*w, C], as the model's forward flattens its pooled map
        for module in head:
            pixels = module(pixels)
        return pixels.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # [B, C', h, w]


def _is_torchvision_vit(model: nn.Module) -> bool:
    try:
        from torchvision.models import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def _units(modules: list[tuple[str, nn.Module]], prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of ``modules`` in the order they run, ``nn.Sequential``
    containers opened (recursively), any other module whole."""
    for name, module in modules:
        if isinstance(module, nn.Sequential) and len(module) > 0:
            yield from _units(list(module.named_children()), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", module


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(inner, (nn.Linear, RemovedClassifier)) for inner in module.modules())


def _first_in_features(module: nn.Module) -> int:
    for inner in module.modules():
        if isinstance(inner, (nn.Linear, RemovedClassifier)):
            return int(inner.in_features)
    raise AssertionError("no Linear")  # pragma: no cover - callers check _has_linear


def _set_qualified(root: nn.Module, qualified: str, module: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _nest(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``(top-level name, module)`` holding ``units`` (qualified names) under their own names:
    dotted names nested in ``nn.Sequential`` containers, in order."""
    top: OrderedDict[str, nn.Module] = OrderedDict()
    for qualified, module in units:
        *path, leaf = qualified.split(".")
        if not path:
            top[leaf] = module
            continue
        container = top.setdefault(path[0], nn.Sequential())
        for part in path[1:]:
            if part not in container._modules:
                container.add_module(part, nn.Sequential())
            container = container._modules[part]
        container.add_module(leaf, module)
    return list(top.items())


def _remove_classifier(model: nn.Module, after_pool: list[tuple[str, nn.Module]], name: str) -> tuple[list[tuple[str, nn.Module]], int | None]:
    """Find the classifier among ``after_pool`` (what the model runs after its global pooling):
    its last Linear. Returns the layers before it (to apply at every position, as ``(qualified
    name, module)``) and its ``in_features``, or ``([], None)`` without a Linear. Changes ``model``
    in place: the Linear becomes a ``RemovedClassifier``; layers after it (if any) become
    ``nn.Identity`` and are named in a warning, as is a classifier found inside a module other
    than a Linear (removed whole)."""
    units = list(_units(after_pool))
    positions = [index for index, (_, module) in enumerate(units) if _has_linear(module)]
    if not positions:
        return [], None
    index = positions[-1]
    qualified, classifier = units[index]
    channels = _first_in_features(classifier)
    dropped = [
        f"{unit_name} ({type(module).__name__})"
        for unit_name, module in units[index + 1 :]
        if not isinstance(module, (nn.Identity, nn.Flatten))
    ]
    if not isinstance(classifier, (nn.Linear, RemovedClassifier)):
        dropped.insert(0, f"{qualified} ({type(classifier).__name__}, the classifier, whole)")
    if dropped:
        warnings.warn(
            f"{name}: GSP replaces the classifier {qualified}; these layers of the model's head are not applied: {', '.join(dropped)}",
            stacklevel=4,
        )
    if not isinstance(classifier, RemovedClassifier):
        _set_qualified(model, qualified, RemovedClassifier(channels))
    for unit_name, module in units[index + 1 :]:
        if not isinstance(module, nn.Identity):
            _set_qualified(model, unit_name, nn.Identity())
    return units[:index], channels


def _applied_head(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``units`` nested under their names, or nothing when they compute nothing per position
    (only ``Flatten``/``Identity``)."""
    if all(isinstance(module, (nn.Flatten, nn.Identity)) for _, module in units):
        return []
    return _nest(units)


def backbone_from_model(model: nn.Module) -> nn.Module:
    """The backbone of a classification model (sharing its modules), its classifier removed.

    Recognized: a timm model (``forward_features``, ``reset_classifier``, ``num_features``),
    torchvision's ``VisionTransformer``, and torchvision-style CNNs whose children run in order
    up to a global ``avgpool`` child (``AdaptiveAvgPool2d(1)``) followed by the classifier
    (ResNet, ResNeXt, Wide-ResNet, RegNet, ConvNeXt, EfficientNet, MobileNetV2/V3, Swin,
    GoogLeNet/Inception without ``transform_input``; auxiliary classifiers, children named
    ``aux*``, are left out). The layers between the global pooling and the classifier's final
    Linear run at every local feature (timm: ``TimmBackbone``; torchvision ConvNeXt's LayerNorm2d,
    MobileNetV3's Linear + Hardswish + Dropout, a ViT's ``pre_logits``: ``SequentialBackbone``,
    ``TorchvisionViTBackbone``); any the backbone cannot apply is named in a warning.

    ``model`` is changed in place, timm's and torchvision's alike, and its modules are the
    backbone's: its classifier is removed (timm: ``reset_classifier(0)``, transformers'
    pooling too; torchvision: the final Linear becomes a ``RemovedClassifier``, an identity), so
    its forward returns the features its classifier read (timm transformers: all tokens); timm
    ViTs built for one image size take any size their patch size divides from then on
    (``dynamic_img_size``). The result has ``num_features`` (C, the channels of its features).
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
        after_pool = [(child, module) for child, module in children[position + 1 :] if not child.lower().startswith("aux")]
        head, channels = _remove_classifier(model, after_pool, name)
        if channels is None:
            raise ValueError(f"{name} has an 'avgpool' child but no Linear classifier after it to give the channels")
        features = [(child, module) for child, module in children[:position] if not child.lower().startswith("aux")]
        return SequentialBackbone(features, channels, _applied_head(head))
    raise ValueError(
        f"cannot find the global pooling of {type(model).__name__}: looked for a timm model "
        "(forward_features, reset_classifier, num_features), torchvision's VisionTransformer, "
        "and a torchvision-style CNN with an 'avgpool' child followed by its classifier"
    )


def check_image_size(backbone: nn.Module, image_size: int) -> None:
    """Raise ``ValueError`` saying what to change when ``backbone`` refuses ``image_size`` x
    ``image_size`` images; return None when it takes them.

    ``backbone``: what ``backbone_from_model`` returns (or an ``EmbeddingModel``/``GSPNet``, whose
    ``trunk`` is checked), or a timm model or torchvision ``VisionTransformer`` as it is. Refused:
    a timm transformer's size its patch size does not divide (timm ViTs wrapped by
    ``backbone_from_model`` take any other size), any size but its own for a timm model whose patch
    embedding is strict (one that could not be switched to ``dynamic_img_size``, e.g. BEiT, Swin)
    and for torchvision's ``VisionTransformer`` (its ``image_size``). CNNs and anything else take
    any size: nothing is raised. A non-positive or non-integer ``image_size`` is a ``ValueError``
    too. The backbones' forwards raise the same message for a batch of a refused size.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    size = int(image_size)
    trunk = getattr(backbone, "trunk", None)
    module = trunk if isinstance(trunk, nn.Module) else backbone
    size_error = getattr(module, "image_size_error", None)
    if callable(size_error):
        problem = size_error(size, size)
    elif _is_torchvision_vit(module):
        problem = _torchvision_vit_size_error(module, size, size)
    elif all(hasattr(module, name) for name in ("forward_features", "reset_classifier", "num_features")):
        problem = _timm_size_error(module, size, size)
    else:
        problem = None
    if problem is not None:
        raise ValueError(problem)
