"""Settings of a training run: ``TrainConfig`` (the CLI flags mirror its fields), the choices
its fields take (``POOLINGS``, ``PROTOTYPE_INITS``, ``METRIC_LOSSES``, ...), ``layer_defaults``
(the layer's sizes for a real backbone), ``validate_config`` (every setting checked before any
data is read), ``eval_resize``, and ``RunError``: what stops a run that is no bug of the code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..backends import BACKENDS
from ..nn import POOLING_METHODS
from ..nn.arch import resolve_arch
from .datasets import DATASETS
from .transforms import papers_resize

POOLINGS = ("gap", "gsp")
PROTOTYPE_INITS = ("kcenter", "random", "memory", "proxies")
CACHED_WEIGHTS = "cache"  # ``pretrained`` value: the arch's own weights from the local caches
METRIC_LOSSES = ("multisimilarity", "contrastive", "proxyanchor")
OPTIMIZERS = ("adamw", "adam")
SCHEDULERS = ("cosine", "plateau", "constant")
PROTOCOLS = ("standard", "mlrc")
LOGS = ("none", "tensorboard")


class RunError(ValueError):
    """A run cannot go on for a reason outside the code: a setting, a file or a folder it was
    given (a checkpoint that is not one, a changed setting on resume, a folder holding a run,
    a full disk). The message says what to change; the CLI prints it as one line (exit 2)."""


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags mirror these names)."""

    dataset: str = "collage"  # one of datasets.DATASETS; "collage" is embedded, the others read data_root
    data_root: str | None = None
    pooling: str = "gsp"  # "gsp" or "gap"
    arch: str = "smallcnn"  # "smallcnn", a torchvision ResNet/ViT name, or a timm name ("timm:NAME"); see nn.arch.resolve_arch
    pretrained: str | None = None  # backbone weights: a local .pth/.safetensors state dict, or "cache" (the arch's, from the local caches)
    embedding_dim: int = 64
    width: int = 32  # SmallCNN width
    num_prototypes: int = 16
    transport_ratio: float = 0.3
    gamma: float = 5.0
    learn_transport_ratio: bool = False  # GSP: learn mu (a sigmoid's logit, started at transport_ratio)
    learn_gamma: bool = False  # GSP: learn gamma (a softplus's argument, started at gamma)
    pooling_params_lr_multiplier: float = 10.0  # the learned mu's and gamma's lr: lr x this (no weight decay)
    prototype_init: str = "kcenter"  # "kcenter" (a training batch), "random", "memory" (warm-up memory), "proxies" (proxyanchor's)
    prototype_memory: int = 1024  # prototype_init "memory": pooled embeddings stored (GAP meanwhile) before k-center
    warm_up_steps: int = 0  # prototype_init "memory": training steps before the memory starts filling
    pooling_method: str = "sum"  # GSP: "sum" (the paper), "gem" or "max" (the authors' variants, see nn.GSP)
    augment_max_pool: bool = False  # GSP: add the projected global max pool to the embedding (the authors' option)
    zero_shot_weight: float = 0.1
    class_embedding_dim: int = 32
    metric_loss: str = "multisimilarity"
    contrastive_neg_margin: float = 0.5  # negative margin of the contrastive loss (Euclidean, normalized)
    epochs: int = 12
    steps_per_epoch: int | None = None  # None: one pass, len(train) // batch_size batches
    batch_size: int = 60
    samples_per_class: int = 4
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) or "adam" (L2 in the gradient)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # "cosine" (per step to 0), "plateau" (on the epoch's training loss), "constant"
    plateau_factor: float = 0.5
    plateau_patience: int = 4
    min_lr: float = 1e-6  # plateau floor
    grad_clip: float = 0.0  # clip the gradient norm at this value (0: no clipping)
    freeze_bn: bool = False  # backbone BatchNorm: running statistics and affine parameters fixed
    image_size: int = 224  # image datasets: training crop and test centre crop
    resize: int | None = None  # image datasets: test-time shorter side (None: image_size * 256 / 227)
    num_train_classes: int | None = None  # imagefolder: default first half of the classes
    collages_per_digit: int = 2  # collage training set size
    data_seed: int = 0  # collage content (fixed across training seeds)
    seed: int = 0  # model init, batch sampling, augmentation, folds
    protocol: str = "standard"  # "standard" (one model) or "mlrc" (one model per class-disjoint fold)
    num_folds: int = 4  # mlrc
    early_stopping_patience: int = 15  # mlrc: epochs without a better validation MAP@R before stopping
    validation_classes: float = 0.0  # standard: share of the training classes held out to pick best.pt (0: none)
    recipe: str | None = None  # the recipe the settings came from (recorded only; see recipes.py)
    backend: str = "auto"
    amp: bool = False  # bf16 autocast (CUDA, or CPU when asked)
    channels_last: bool = False  # channels-last memory format for the model and the images
    compile: bool = False  # torch.compile the model's forward
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 256
    log: str = "none"  # "tensorboard": event files under output_dir (see tensorboard_log.py)
    output_dir: str | None = None  # checkpoints go to output_dir/checkpoint.pt after each epoch
    resume: bool = False
    overwrite: bool = False  # train anew into an output_dir that holds a run's checkpoint(s), replacing them
    progress: bool = True


# The layer's sizes for a real backbone when neither a recipe nor a flag sets them: the paper's
# 512-d embedding and 64 prototypes (its choice below 1000 training classes; the SOP and In-Shop
# recipes take 128), class embeddings as large as the embedding, as in the recipes. The
# TrainConfig defaults (64-d, 16 prototypes) are sized for the small CNN of the embedded data.
BACKBONE_LAYER_DEFAULTS = {"embedding_dim": 512, "num_prototypes": 64, "class_embedding_dim": 512}


def layer_defaults(arch: str) -> dict:
    """The GSP layer's sizes that suit ``arch``'s backbone: ``BACKBONE_LAYER_DEFAULTS`` for every
    arch but the small CNN, which keeps TrainConfig's."""
    return {} if arch == "smallcnn" else dict(BACKBONE_LAYER_DEFAULTS)


def validate_config(config: TrainConfig) -> None:
    """Fail early, before data loading, on settings that would fail later."""
    choices = {"pooling": POOLINGS, "metric_loss": METRIC_LOSSES, "prototype_init": PROTOTYPE_INITS, "pooling_method": POOLING_METHODS,
               "dataset": DATASETS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "protocol": PROTOCOLS,
               "log": LOGS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    resolve_arch(config.arch)  # a ValueError naming the accepted spellings
    if config.pretrained is not None and config.pretrained != CACHED_WEIGHTS and not Path(config.pretrained).is_file():
        raise ValueError(f"pretrained must be a checkpoint file or {CACHED_WEIGHTS!r}, got {config.pretrained!r} (no such file)")
    if config.pretrained is not None and config.arch == "smallcnn":
        raise ValueError("pretrained needs a torchvision or timm arch; smallcnn has no pretrained weights")
    if config.prototype_init == "proxies" and config.metric_loss != "proxyanchor":
        raise ValueError(f"prototype_init 'proxies' needs a loss with class proxies (proxyanchor), got metric_loss {config.metric_loss!r}")
    if config.prototype_init == "memory" and config.prototype_memory < 2 * config.num_prototypes:
        raise ValueError(f"prototype_memory must be >= 2 * num_prototypes={2 * config.num_prototypes}, got {config.prototype_memory}")
    for name in ("epochs", "batch_size", "embedding_dim", "num_prototypes", "width", "class_embedding_dim",
                 "image_size", "collages_per_digit", "eval_batch_size", "early_stopping_patience"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("steps_per_epoch", "resize"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(config, name)}")
    if config.resize is not None and config.resize < config.image_size:
        raise ValueError(f"resize must be >= image_size={config.image_size} (the centre crop), got {config.resize}")
    if not 1 <= config.samples_per_class <= config.batch_size:
        raise ValueError(f"samples_per_class must be in [1, batch_size={config.batch_size}], got {config.samples_per_class}")
    for name in ("zero_shot_weight", "weight_decay", "num_workers", "grad_clip", "min_lr", "plateau_patience", "contrastive_neg_margin",
                 "warm_up_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if not 0 < config.plateau_factor < 1:
        raise ValueError(f"plateau_factor must be in (0, 1), got {config.plateau_factor}")
    if not 0 < config.transport_ratio <= 1:
        raise ValueError(f"transport_ratio must be in (0, 1], got {config.transport_ratio}")
    if not config.gamma > 0:
        raise ValueError(f"gamma must be > 0, got {config.gamma}")
    if not config.pooling_params_lr_multiplier > 0:
        raise ValueError(f"pooling_params_lr_multiplier must be > 0, got {config.pooling_params_lr_multiplier}")
    for name in ("learn_transport_ratio", "learn_gamma"):
        if getattr(config, name) and config.pooling != "gsp":
            raise ValueError(f"{name} learns a parameter of GSP pooling; pooling {config.pooling!r} has none")
    if config.learn_transport_ratio and config.transport_ratio == 1:
        raise ValueError("learn_transport_ratio learns the logit of mu, infinite at transport_ratio 1: start below 1 (e.g. 0.99)")
    if not 0.0 <= config.validation_classes < 1.0:
        raise ValueError(f"validation_classes must be a share of the training classes in [0, 1), got {config.validation_classes}")
    if config.validation_classes > 0 and config.protocol == "mlrc":
        raise ValueError("validation_classes applies to the standard protocol; mlrc validates on its folds (num_folds)")
    if config.num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {config.num_folds}")
    if config.backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {config.backend!r}")
    if config.resume and config.overwrite:
        raise ValueError("resume continues the run in output_dir and overwrite replaces it: choose one")
    for name in ("resume", "overwrite"):
        if getattr(config, name) and not config.output_dir:
            raise ValueError(f"{name} needs output_dir, the folder of the run's checkpoint")
    if config.dataset != "collage" and (config.data_root is None or not Path(config.data_root).expanduser().is_dir()):
        raise ValueError(f"dataset {config.dataset!r} reads data_root, which must be a directory, got {config.data_root!r}")


def eval_resize(config: TrainConfig) -> int:
    """Test-time shorter side: ``config.resize``, or the papers' 256/227 ratio of the crop."""
    return config.resize if config.resize is not None else papers_resize(config.image_size)

