"""The embedding models training builds: ``nn.EmbeddingModel``, a backbone trunk with a GAP
baseline head or a GSP head, by ``--arch`` name (``build_model``), or as a ``TrainConfig``
describes it (``build_model_for``).

Every model's forward returns ``GSPOutput``; the GAP head gives ``attributes=None``. The trunk
is the embedded ``SmallCNN``, or the backbone of a torchvision or timm model
(``gsp_kernels.nn.backbones``), randomly initialized or loaded from local weights
(``gsp_kernels.nn.pretrained``: nothing downloads). ``check_model(config)`` builds a run's
model once before any data is read, to find what would fail later; ``prototypes_warm_up(model)``
says whether a GSP head is still in its GAP warm-up; ``pooling_values(model)`` gives its mu and
gamma now (learned or fixed).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..nn import GSP, EmbeddingModel, GlobalAveragePoolHead
from ..nn.arch import create_classifier
from ..nn.backbones import backbone_from_model, check_image_size
from ..nn.pretrained import LoadReport, cached_weights_path, load_backbone_weights
from .config import CACHED_WEIGHTS, POOLINGS, RunError, TrainConfig
from .datasets.collage import COLLAGE_SIZE


class SmallCNN(nn.Sequential):
    """Four 3x3 conv-BN-ReLU stages for 32x32 inputs: ``[B, 3, 32, 32]`` -> ``[B, width*2, 8, 8]``.

    Two stride-2 stages: each 16x16 collage tile maps to a 4x4 block of the output map.
    """

    def __init__(self, width: int = 32):
        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        super().__init__(*stage(3, width, 1), *stage(width, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 2 * width, 2))
        self.num_features = 2 * width


def build_trunk(arch: str, *, width: int = 32, pretrained: str | Path | bool | None = None, **backbone_kwargs) -> tuple[nn.Module, LoadReport | None]:
    """The trunk an ``arch`` names (``gsp_kernels.nn.arch.resolve_arch``) and the report of
    the weights loaded into it: ``pretrained`` is None/False (random init), a checkpoint path,
    or True/"cache" (the arch's weights from the local caches, see ``cached_weights_path``).
    ``backbone_kwargs`` go to ``timm.create_model`` / ``torchvision.models.get_model``."""
    if arch == "smallcnn":
        if pretrained not in (None, False):
            raise ValueError("smallcnn has no pretrained weights; pretrained needs a torchvision or timm arch")
        return SmallCNN(width), None
    trunk = backbone_from_model(create_classifier(arch, **backbone_kwargs))
    if pretrained in (None, False):
        return trunk, None
    path = cached_weights_path(arch) if pretrained is True or pretrained == CACHED_WEIGHTS else Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained: no checkpoint file at {str(path)!r}; pass a local .pth/.safetensors state dict, "
            f"or {CACHED_WEIGHTS!r} for {arch!r}'s weights from the local Hugging Face / torch.hub caches"
        )
    return trunk, load_backbone_weights(trunk, path)


def build_model(
    arch: str = "smallcnn",
    pooling: str = "gsp",
    embedding_dim: int = 64,
    *,
    width: int = 32,
    num_prototypes: int = 16,
    transport_ratio: float = 0.3,
    gamma: float = 5.0,
    learn_transport_ratio: bool = False,
    learn_gamma: bool = False,
    backend: str = "auto",
    solver: str = "newton",
    max_iter: int | None = None,
    pretrained: str | Path | bool | None = None,
    pooling_method: str = "sum",
    augment_max_pool: bool = False,
    memory_size: int = 0,
    warm_up_steps: int = 0,
    backbone_kwargs: dict | None = None,
) -> EmbeddingModel:
    """An ``EmbeddingModel``: the trunk of ``build_trunk`` and a GAP or GSP head whose input
    width is the backbone's ``num_features``. ``learn_transport_ratio``, ``learn_gamma``,
    ``solver``, ``max_iter``, ``pooling_method``, ``augment_max_pool``, ``memory_size`` and
    ``warm_up_steps`` are ``GSP``'s options (the last four the authors' variants)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    trunk, report = build_trunk(arch, width=width, pretrained=pretrained, **(backbone_kwargs or {}))
    channels = trunk.num_features
    if pooling == "gap":
        head = GlobalAveragePoolHead(channels, embedding_dim)
    else:
        head = GSP(
            channels,
            embedding_dim,
            num_prototypes,
            transport_ratio=transport_ratio,
            gamma=gamma,
            learn_transport_ratio=learn_transport_ratio,
            learn_gamma=learn_gamma,
            backend=backend,
            solver=solver,
            max_iter=max_iter,
            pooling_method=pooling_method,
            augment_max_pool=augment_max_pool,
            memory_size=memory_size,
            warm_up_steps=warm_up_steps,
        )
    model = EmbeddingModel(trunk, head)
    model.pretrained_report = report
    return model


def build_model_for(config: TrainConfig, load_pretrained: bool = True) -> nn.Module:
    """The embedding model ``config`` describes: random initialization, with the backbone
    weights of ``config.pretrained`` when ``load_pretrained``."""
    return build_model(
        config.arch,
        config.pooling,
        config.embedding_dim,
        width=config.width,
        num_prototypes=config.num_prototypes,
        transport_ratio=config.transport_ratio,
        gamma=config.gamma,
        learn_transport_ratio=config.learn_transport_ratio,
        learn_gamma=config.learn_gamma,
        backend=config.backend,
        pretrained=config.pretrained if load_pretrained else None,
        pooling_method=config.pooling_method,
        augment_max_pool=config.augment_max_pool,
        memory_size=config.prototype_memory if config.prototype_init == "memory" else 0,
        warm_up_steps=config.warm_up_steps,
    )


def input_size(config: TrainConfig) -> int:
    """The side of the images the model gets: ``config.image_size``, or the collages' own."""
    return COLLAGE_SIZE if config.dataset == "collage" else config.image_size


def check_image_fits(model: nn.Module, config: TrainConfig) -> None:
    """RunError when the model's backbone cannot take the run's images (a torchvision ViT at
    another size than its own, a patch size that does not divide it)."""
    try:
        check_image_size(model.trunk, input_size(config))
    except ValueError as exc:
        raise RunError(f"--arch {config.arch} at --image-size {input_size(config)}: {exc}") from exc


def check_model(config: TrainConfig) -> None:
    """Build the model ``config`` describes (on the CPU; then dropped) to find, before any data
    is read, what would fail once it is: ``--pretrained`` weights that do not load or fit, an
    image size the backbone refuses. ``RunError`` saying what to change. Draws from torch's
    RNG: seed after it."""
    try:
        model = build_model_for(config)
    except (ValueError, FileNotFoundError) as exc:
        if config.pretrained is None:
            raise
        raise RunError(f"--pretrained {config.pretrained}: {exc}") from exc
    check_image_fits(model, config)


def prototypes_warm_up(model: nn.Module) -> dict | None:
    """{"memory_filled", "memory_size"} of a GSP head that never left its warm-up (a prototype
    memory still filling: it pools by GAP, in training and at test time); None for any other
    model."""
    head = getattr(model, "pooling_head", None)
    if not isinstance(head, GSP) or not head.memory_size or bool(head.prototypes_ready):
        return None
    return {"memory_filled": int(head.memory_filled), "memory_size": head.memory_size}


def pooling_values(model: nn.Module) -> dict:
    """{"transport_ratio", "gamma"} of a GSP head now (floats; learned or fixed); {} for GAP."""
    head = getattr(model, "pooling_head", None)
    if not isinstance(head, GSP):
        return {}
    return {"transport_ratio": head.transport_ratio, "gamma": head.gamma}
