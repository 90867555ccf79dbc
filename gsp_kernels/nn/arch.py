"""Classification models by ``--arch`` name: "smallcnn", a torchvision ResNet/ResNeXt/RegNet/
GoogLeNet/ViT name, or a timm model name (``resolve_arch``), built randomly initialized
(``create_classifier``; ``backbones.backbone_from_model`` then takes its local features)."""

from __future__ import annotations

from torch import nn

TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet", "regnet_", "googlenet", "vit_")


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
