"""Training loop, retrieval evaluation on unseen classes, checkpoints that resume exactly,
torchrun support.

``train(config)`` runs the protocol ``config.protocol`` names: "standard" trains one model
(GAP baseline or GSP + zero-shot loss) with a pytorch-metric-learning loss and evaluates
it on the test classes; "mlrc" (``mlrc.py``) trains one model per class-disjoint fold of
the training classes. ``fit`` is one model's training loop, shared by both.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..backbones import resolve_arch
from ..backends import BACKENDS
from ..losses import ZeroShotPredictionLoss
from ..nn import POOLING_METHODS
from .benchmarks import DATASETS, RECALL_KS, BenchmarkData, load_benchmark
from .data import (
    ClassBalancedBatchSampler,
    CollageDataset,
    test_transform,
    train_transform,
)
from .models import CACHED_WEIGHTS, POOLINGS, PROTOTYPE_INITS, build_model

METRIC_LOSSES = ("multisimilarity", "contrastive", "proxyanchor")
OPTIMIZERS = ("adamw", "adam")
SCHEDULERS = ("cosine", "plateau", "constant")
PROTOCOLS = ("standard", "mlrc")
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags mirror these names)."""

    dataset: str = "collage"  # one of benchmarks.DATASETS; "collage" is embedded, the others read data_root
    data_root: str | None = None
    pooling: str = "gsp"  # "gsp" or "gap"
    arch: str = "smallcnn"  # "smallcnn", a torchvision ResNet/ViT name, or a timm name ("timm:NAME"); see backbones.resolve_arch
    pretrained: str | None = None  # backbone weights: a local .pth/.safetensors state dict, or "cache" (the arch's, from the local caches)
    embedding_dim: int = 64
    width: int = 32  # SmallCNN width
    num_prototypes: int = 16
    transport_ratio: float = 0.3
    gamma: float = 5.0
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
    recipe: str | None = None  # the recipe the settings came from (recorded only; see recipes.py)
    backend: str = "auto"
    amp: bool = False  # bf16 autocast (CUDA, or CPU when asked)
    channels_last: bool = False  # channels-last memory format for the model and the images
    compile: bool = False  # torch.compile the model's forward
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 256
    output_dir: str | None = None  # checkpoints go to output_dir/checkpoint.pt after each epoch
    resume: bool = False
    progress: bool = True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initializes the process group from torchrun's env vars
    (WORLD_SIZE > 1): nccl with CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def shutdown_distributed() -> None:
    """Tear down the process group ``init_distributed`` started, after every rank is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(config: TrainConfig, local_rank: int = 0) -> torch.device:
    """``config.device``, or this rank's GPU when there is one, else the CPU."""
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def load_data(config: TrainConfig) -> BenchmarkData:
    """The train and test splits of ``config.dataset`` with the papers' transforms at
    ``config.image_size`` (test: shorter side ``config.resize``, centre crop)."""
    if config.dataset == "collage":
        return BenchmarkData(
            train=CollageDataset("train", config.collages_per_digit, seed=config.data_seed),
            query=CollageDataset("test", 1, seed=config.data_seed),
            gallery=None,
            recall_ks=RECALL_KS["collage"],
            name="collage",
        )
    return load_benchmark(
        config.dataset,
        config.data_root,
        train_transform=train_transform(config.image_size),
        test_transform=test_transform(eval_resize(config), config.image_size),
        num_train_classes=config.num_train_classes,
    )


def eval_resize(config: TrainConfig) -> int:
    """Test-time shorter side: ``config.resize``, or the papers' 256/227 ratio of the crop."""
    return config.resize if config.resize is not None else round(config.image_size * 256 / 227)


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
        backend=config.backend,
        pretrained=config.pretrained if load_pretrained else None,
        pooling_method=config.pooling_method,
        augment_max_pool=config.augment_max_pool,
        memory_size=config.prototype_memory if config.prototype_init == "memory" else 0,
        warm_up_steps=config.warm_up_steps,
    )


def build_metric_loss(name: str, num_classes: int, embedding_dim: int, contrastive_neg_margin: float = 0.5) -> nn.Module:
    """A pytorch-metric-learning loss on normalized embeddings (cosine similarity, or
    Euclidean distance for the contrastive loss)."""
    from pytorch_metric_learning import losses

    if name == "multisimilarity":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=contrastive_neg_margin)
    if name == "proxyanchor":
        return losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=0.1, alpha=32)
    raise ValueError(f"metric_loss must be one of {METRIC_LOSSES}, got {name!r}")


class TrainingObjective(nn.Module):
    """Model + losses in one module (so DDP averages every trainable parameter):
    images, labels -> (total loss, metric loss, zero-shot loss or None)."""

    def __init__(self, model: nn.Module, metric_loss: nn.Module, zero_shot_loss: ZeroShotPredictionLoss | None):
        super().__init__()
        self.model = model
        self.metric_loss = metric_loss
        self.zero_shot_loss = zero_shot_loss

    def forward(self, images: Tensor, labels: Tensor):
        """-> (total loss, metric loss detached, zero-shot loss detached or None)."""
        output = self.model(images)
        metric = self.metric_loss(output.embedding.float(), labels)
        if self.zero_shot_loss is None:
            return metric, metric.detach(), None
        zero_shot = self.zero_shot_loss(output.attributes.float(), labels)
        return metric + zero_shot, metric.detach(), zero_shot.detach()


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """A batch sampler's batches with a seed per sample: ``[(index, seed), ...]``, the seed a
    function of (seed, epoch, step, position in the step's batch, rank) only. With
    ``SeededSamples`` the augmentation of every sample is then fixed whatever the number of
    DataLoader workers, and a resumed run sees the crops an uninterrupted one saw."""

    def __init__(self, batches: ClassBalancedBatchSampler, seed: int):
        self.batches, self.seed = batches, seed

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the batches and of the seeds."""
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch, rank = self.batches.epoch, self.batches.rank
        for step, batch in enumerate(self.batches):
            yield [(index, hash((self.seed, epoch, step, position, rank)) % (2**63)) for position, index in enumerate(batch)]


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with torch's RNG seeded by the key's seed: ``[(index, seed)]``
    keys from ``SeededBatches``. The caller's RNG state is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _loader_options(config: TrainConfig, device: torch.device) -> dict:
    """DataLoader workers, pinned memory on CUDA, persistent workers when there are workers."""
    return {"num_workers": config.num_workers, "pin_memory": device.type == "cuda", "persistent_workers": config.num_workers > 0}


def _to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def compute_embeddings(model: nn.Module, dataset, device: torch.device, *, batch_size: int = 256, amp: bool = False,
                       num_workers: int = 0, channels_last: bool = False) -> Tensor:
    """Embeddings ``[n, E]`` (float32, on the CPU) of a whole dataset in eval mode."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for images, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(model(_to_device(images, device, channels_last)).embedding.float().cpu())
    return torch.cat(chunks)


def embed_test_splits(model: nn.Module, data: BenchmarkData, config: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(query embeddings ``[Q, E]``, gallery embeddings ``[G, E]`` or None) of one model."""
    options = {"batch_size": config.eval_batch_size, "amp": config.amp, "num_workers": config.num_workers,
               "channels_last": config.channels_last}
    query = compute_embeddings(model, data.query, device, **options)
    gallery = None if data.gallery is None else compute_embeddings(model, data.gallery, device, **options)
    return query, gallery


def retrieval_scores(data: BenchmarkData, query: Tensor, gallery: Tensor | None) -> dict:
    """Retrieval metrics of the test split: the queries against the gallery, or all against
    all (each query excluded from its own neighbours) without one."""
    from .metrics import retrieval_metrics

    if gallery is None:
        return retrieval_metrics(query, data.query.labels, recall_ks=data.recall_ks)
    return retrieval_metrics(query, data.query.labels, gallery, data.gallery.labels, recall_ks=data.recall_ks)


def _kcenter_init(model, dataset, sampler, device) -> None:
    """Initialize the GSP prototypes by greedy k-center on one training batch's local features."""
    indices = next(iter(sampler))
    images = torch.stack([dataset[i][0] for i in indices]).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model.head.init_prototypes_kcenter(model.trunk(images))
    model.train(was_training)


def freeze_batchnorm(trunk: nn.Module) -> None:
    """Stop training the trunk's BatchNorm layers: affine parameters get no gradient and
    the layers run in eval mode (running statistics fixed). Call after every ``.train()``."""
    for layer in trunk.modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue
        layer.eval()
        for parameter in layer.parameters(recurse=False):
            parameter.requires_grad_(False)


def build_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 weight decay) over the trainable parameters."""
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
    return kind(trainable, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Cosine annealing over every step of the run, reduce-on-plateau on the epoch's
    training loss (never on the test split), or None (constant learning rate)."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience, min_lr=config.min_lr
        )
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG states (rank order), so each resumes its own augmentation stream."""
    if world_size == 1:
        return [_rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, _rng_state())
    return states


def _broadcast_float(value: float | None, device: torch.device, world_size: int) -> float:
    """Rank 0's ``value`` on every rank (DDP ranks must take the same early-stopping decision)."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value if value is not None else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor)


def _progress(iterable, description: str, enabled: bool):
    """A tqdm bar updating in place when stderr is a terminal; the plain iterable otherwise
    (a log then gets one line per epoch from ``fit``, not every refresh)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_epoch(trainer, objective, optimizer, scheduler, loader, config: TrainConfig, device, description: str, show: bool) -> dict:
    """One epoch over ``loader``. -> {"loss", "metric", "zero_shot" (means over the steps and
    the ranks), "lr" (at the epoch's end, before a plateau step), "images_per_second", "seconds"}.

    images/s counts the images of steps 2..N over the time from the end of step 1 to the end
    of step N: DataLoader start-up, cuDNN autotuning and compilation fall in step 1 (an
    epoch of one step is timed whole). Under DDP it is the total over the ranks."""
    objective.train()
    if config.freeze_bn:
        freeze_batchnorm(objective.model.trunk)
    trainable = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    sums = torch.zeros(3, device=device)  # loss, metric, zero-shot summed over the steps
    started = time.perf_counter()
    timed_from, timed_images, steps = started, 0, 0
    bar = _progress(loader, description, show)
    for step, (images, labels) in enumerate(bar, start=1):
        images, labels = _to_device(images, device, config.channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            loss, metric, zero_shot_value = trainer(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        if config.scheduler == "cosine":
            scheduler.step()
        zero_shot_value = torch.zeros((), device=device) if zero_shot_value is None else zero_shot_value
        sums += torch.stack([loss.detach().float(), metric.float(), zero_shot_value.float()])
        steps = step
        if step == 1:
            _synchronize(device)
            timed_from = time.perf_counter()
        else:
            timed_images += len(labels)
        if hasattr(bar, "set_postfix") and step > 1 and (step % 10 == 0 or step == len(loader)):
            rate = timed_images / max(time.perf_counter() - timed_from, 1e-9)
            bar.set_postfix(loss=f"{float(sums[0]) / step:.4f}", images_per_s=f"{rate:.1f}")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:  # every rank's mean: the plateau schedule must take the same step on every rank
        dist.all_reduce(sums)
        sums /= world_size
    means = (sums / max(1, steps)).tolist()  # waits for the device
    finished = time.perf_counter()
    if timed_images == 0:  # one step: time it whole
        timed_from, timed_images = started, len(labels)
    return {
        "loss": means[0],
        "metric": means[1],
        "zero_shot": means[2],
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_second": world_size * timed_images / max(finished - timed_from, 1e-9),
        "seconds": finished - started,
    }


def _epoch_line(description: str, record: dict) -> str:
    line = (f"{description}: loss {record['loss']:.4f} (metric {record['metric']:.4f}, zero-shot {record['zero_shot']:.4f})"
            f"  lr {record['lr']:.3g}  {record['images_per_second']:.1f} images/s  {record['seconds']:.1f} s")
    if "val_map_at_r" in record:
        line += f"  val MAP@R {record['val_map_at_r']:.4f}"
    return line


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write keeps the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by ``fit`` (our own file: RNG states need ``weights_only=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location=device, weights_only=False)


def model_state(checkpoint: dict) -> dict:
    """The model weights a checkpoint stands for: the early-stopping best when it kept one,
    else the last epoch's."""
    best = checkpoint.get("early_stopping") or {}
    if best.get("model") is not None:
        return best["model"]
    prefix = "model."
    return {key[len(prefix):]: value for key, value in checkpoint["objective"].items() if key.startswith(prefix)}


# Settings a run may change when it resumes: where and how fast it runs, and how long.
RESUMABLE_CHANGES = ("epochs", "resume", "progress", "output_dir", "device", "num_workers", "eval_batch_size", "compile", "backend")


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """ValueError naming the settings a checkpoint was trained with that ``config`` changes
    (beyond ``RESUMABLE_CHANGES``): resuming them would not continue the same run."""
    current = dataclasses.asdict(config)
    changed = [name for name, value in saved.items() if name in current and name not in RESUMABLE_CHANGES and current[name] != value]
    if changed:
        details = ", ".join(f"{name} {saved[name]!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"cannot resume {path} with other settings: {details} (use another output_dir, or the saved settings)")


def fit(
    config: TrainConfig,
    train_set,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    checkpoint_path: Path | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    description: str = "",
) -> dict:
    """Train one model on ``train_set`` for ``config.epochs`` epochs of class-balanced batches.

    ``validate(model) -> score`` (higher is better), when given, runs on rank 0 after every
    epoch: the best epoch's weights are kept and training stops after
    ``config.early_stopping_patience`` epochs without a better score. With ``checkpoint_path``
    the full state (model, losses, optimizer, scheduler, epoch, early stopping, every rank's
    RNG states) is written after every epoch; ``config.resume`` continues from it at the
    next epoch boundary, exactly as an uninterrupted run would: the batches are a function of
    seed and epoch, and each sample's augmentation of (seed, epoch, step, position), whatever
    the number of DataLoader workers.

    -> {"model" (best or last weights), "history" (a dict per epoch), "seconds",
    "images_per_second", "best_epoch", "best_score"}.
    """
    model = build_model_for(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sampler = ClassBalancedBatchSampler(train_set.labels, config.batch_size, config.samples_per_class, seed=config.seed,
                                        rank=rank, world_size=world_size, num_batches=config.steps_per_epoch)
    if config.pooling == "gsp" and config.prototype_init == "kcenter":
        _kcenter_init(model, train_set, sampler, device)
    zero_shot = None
    if config.pooling == "gsp" and config.zero_shot_weight > 0:
        zero_shot = ZeroShotPredictionLoss(train_set.num_classes, config.class_embedding_dim, weight=config.zero_shot_weight)
    metric_loss = build_metric_loss(config.metric_loss, train_set.num_classes, config.embedding_dim, config.contrastive_neg_margin)
    objective = TrainingObjective(model, metric_loss, zero_shot).to(device)
    if config.pooling == "gsp" and config.prototype_init == "proxies":
        model.head.init_prototypes_from_proxies(metric_loss.proxies)  # the authors' PyTorch init
    if config.freeze_bn:
        freeze_batchnorm(model.trunk)
    optimizer = build_optimizer(config, objective.parameters())
    scheduler = build_scheduler(config, optimizer, len(sampler))

    history, start_epoch, stopped = [], 0, False
    early = {"score": None, "epoch": None, "bad_epochs": 0, "model": None}
    if config.resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        _check_resumable(state["config"], config, checkpoint_path)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        history, start_epoch, stopped = state["history"], state["epoch"] + 1, state["stopped"]
        early = state["early_stopping"]
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    if config.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    trainer = objective
    if world_size > 1:
        trainer = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    loader = DataLoader(SeededSamples(train_set), batch_sampler=SeededBatches(sampler, config.seed), **_loader_options(config, device))
    show = config.progress and rank == 0
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        loader.batch_sampler.set_epoch(epoch)
        label = f"{description}{config.pooling} epoch {epoch + 1}/{config.epochs}"
        record = _train_epoch(trainer, objective, optimizer, scheduler, loader, config, device, label, show)
        if config.scheduler == "plateau":
            scheduler.step(record["loss"])
        if validate is not None:
            score = _broadcast_float(validate(model) if rank == 0 else None, device, world_size)
            record["val_map_at_r"] = score
            if early["score"] is None or score > early["score"]:
                early = {"score": score, "epoch": epoch, "bad_epochs": 0,
                         "model": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}}
            else:
                early["bad_epochs"] += 1
            stopped = early["bad_epochs"] >= config.early_stopping_patience
        history.append(record)
        if show:
            print(_epoch_line(label, record), file=sys.stderr, flush=True)
        rng_states = _gather_rng_states(world_size) if checkpoint_path is not None else None
        if checkpoint_path is not None and rank == 0:
            _save_checkpoint(checkpoint_path, {
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "history": history,
                "epoch": epoch,
                "stopped": stopped,
                "early_stopping": early,
                "rng": rng_states,
                "config": dataclasses.asdict(config),
            })
    del trainer  # release DDP's reducer while the process group is still up
    if early["model"] is not None:
        model.load_state_dict(early["model"])
    timed = [(record["images_per_second"], record["seconds"]) for record in history]
    images = sum(rate * seconds for rate, seconds in timed)
    seconds = sum(seconds for _, seconds in timed)
    return {
        "model": model,
        "history": history,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
        "best_epoch": None if early["epoch"] is None else early["epoch"] + 1,
        "best_score": early["score"],
    }


def _validate(config: TrainConfig) -> None:
    """Fail early, before data loading, on settings that would fail later."""
    choices = {"pooling": POOLINGS, "metric_loss": METRIC_LOSSES, "prototype_init": PROTOTYPE_INITS, "pooling_method": POOLING_METHODS,
               "dataset": DATASETS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "protocol": PROTOCOLS}
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
    if config.prototype_init == "memory" and config.prototype_memory < config.num_prototypes:
        raise ValueError(f"prototype_memory must be >= num_prototypes={config.num_prototypes}, got {config.prototype_memory}")
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
    if config.num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {config.num_folds}")
    if config.backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {config.backend!r}")
    if config.dataset != "collage" and (config.data_root is None or not Path(config.data_root).is_dir()):
        raise ValueError(f"dataset {config.dataset!r} reads data_root, which must be a directory, got {config.data_root!r}")


def train(config: TrainConfig) -> dict:
    """Train and evaluate as ``config.protocol`` says. Returns {"config", "splits" (classes
    and images per split), "epochs" (per-epoch records), "metrics" (test retrieval metrics),
    "recall_at_1", "map_at_r", "seconds", "images_per_second", "model"}; "mlrc" adds
    "folds" (mlrc.py). Metrics on rank 0; other ranks get None."""
    _validate(config)
    rank, world_size, local_rank = init_distributed()
    device = resolve_device(config, local_rank)
    seed_everything(config.seed)
    data = load_data(config)
    if config.protocol == "mlrc":
        from .mlrc import train_mlrc

        return train_mlrc(config, data, device, rank=rank, world_size=world_size)
    checkpoint_path = Path(config.output_dir) / CHECKPOINT_NAME if config.output_dir else None
    run = fit(config, data.train, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint_path)
    result = {"config": config, "splits": data.describe(), "epochs": run["history"], "seconds": run["seconds"],
              "images_per_second": run["images_per_second"], "model": run["model"], "metrics": None,
              "recall_at_1": None, "map_at_r": None}
    if rank == 0:
        result.update(metrics_entries(retrieval_scores(data, *embed_test_splits(run["model"], data, config, device))))
    return result


def metrics_entries(metrics: dict) -> dict:
    """{"metrics", "recall_at_1", "map_at_r"} of a result from retrieval metrics."""
    return {"metrics": metrics, "recall_at_1": metrics["recall@1"], "map_at_r": metrics["map@r"]}


def results_record(result: dict) -> dict:
    """The JSON-ready part of a ``train`` result (what results.json holds): no model; a run
    from a recipe also lists what the recipe does not reproduce of the authors' runs."""
    rest = {key: value for key, value in result.items() if key not in ("model", "models", "config")}
    record = {"config": dataclasses.asdict(result["config"]), **rest}
    if result["config"].recipe is not None:
        from .recipes import NOT_REPRODUCED

        record["recipe_not_reproduced"] = list(NOT_REPRODUCED)
    return record


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def splits_line(splits: dict) -> str:
    """"train: 100 classes, 5864 images  test: ..." from a BenchmarkData.describe()."""
    return "  ".join(f"{split}: {sizes['classes']} classes, {sizes['images']} images" for split, sizes in splits.items())


SUMMARY_EPOCHS = 10  # epochs the summary table shows (the last ones; results.json has all)


def summary_table(result: dict) -> str:
    """Losses and throughput of the last ``SUMMARY_EPOCHS`` epochs, then the retrieval
    metrics table of one run (mlrc: one row per fold's model and the concatenation)."""
    from .metrics import format_metrics_table

    if "folds" in result:
        from .mlrc import mlrc_table

        return mlrc_table(result)
    history = result["epochs"]
    first_shown = max(0, len(history) - SUMMARY_EPOCHS)
    rows = [
        [str(index + 1), f"{epoch['loss']:.4f}", f"{epoch['metric']:.4f}", f"{epoch['zero_shot']:.4f}", f"{epoch['lr']:.3g}",
         f"{epoch['images_per_second']:.1f}"]
        for index, epoch in enumerate(history[first_shown:], start=first_shown)
    ]
    table = format_table(["epoch", "loss", "metric", "zero-shot", "lr", "images/s"], rows)
    if first_shown:
        table += f"\n({first_shown} earlier epochs in results.json)"
    if result["metrics"] is not None:
        table += f"\n{splits_line(result['splits'])}\n{format_metrics_table(result['metrics'])}"
        table += f"\n({result['seconds']:.1f} s training, {result['images_per_second'] or 0:.1f} images/s)"
    return table
