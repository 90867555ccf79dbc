"""Training loop, retrieval evaluation on unseen classes, checkpoints, torchrun support.

``train(config)`` trains one model (GAP baseline or GSP + zero-shot loss) with a
pytorch-metric-learning loss and returns Recall@1 ("precision_at_1") and MAP@R
("mean_average_precision_at_r") of the test classes from its AccuracyCalculator.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..backends import BACKENDS
from ..losses import ZeroShotPredictionLoss
from .data import ClassBalancedBatchSampler, CollageDataset, ImageFolderSplit
from .models import ARCHITECTURES, POOLINGS, build_model

METRIC_LOSSES = ("multisimilarity", "contrastive", "proxyanchor")


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags mirror these names)."""

    dataset: str = "collage"  # "collage" (embedded) or the root of an ImageFolder-style benchmark
    pooling: str = "gsp"  # "gsp" or "gap"
    arch: str = "smallcnn"  # "smallcnn", "resnet18", "resnet50" (torchvision)
    embedding_dim: int = 64
    width: int = 32  # SmallCNN width
    num_prototypes: int = 16
    transport_ratio: float = 0.3
    gamma: float = 5.0
    prototype_init: str = "kcenter"  # "kcenter" (from a training batch) or "random"
    zero_shot_weight: float = 0.1
    class_embedding_dim: int = 32
    metric_loss: str = "multisimilarity"
    epochs: int = 12
    batch_size: int = 60
    samples_per_class: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 224  # ImageFolder datasets only
    num_train_classes: int | None = None  # ImageFolder: default first half of the classes
    collages_per_digit: int = 2  # collage training set size
    data_seed: int = 0  # collage content (fixed across training seeds)
    seed: int = 0  # model init and batch sampling
    backend: str = "auto"
    amp: bool = False  # bf16 autocast (CUDA, or CPU when asked)
    device: str = "auto"
    num_workers: int = 0
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


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def load_datasets(config: TrainConfig):
    """(train, test) datasets for ``config.dataset``."""
    if config.dataset == "collage":
        return (
            CollageDataset("train", config.collages_per_digit, seed=config.data_seed),
            CollageDataset("test", 1, seed=config.data_seed),
        )
    return (
        ImageFolderSplit(config.dataset, "train", config.image_size, config.num_train_classes),
        ImageFolderSplit(config.dataset, "test", config.image_size, config.num_train_classes),
    )


def build_metric_loss(name: str, num_classes: int, embedding_dim: int) -> nn.Module:
    """A pytorch-metric-learning loss (cosine-based, on normalized embeddings)."""
    from pytorch_metric_learning import losses

    if name == "multisimilarity":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)
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


@torch.no_grad()
def compute_embeddings(model: nn.Module, dataset, device: torch.device, batch_size: int = 256, amp: bool = False) -> Tensor:
    """Embeddings ``[n, E]`` (float32, on the CPU) of a whole dataset in eval mode."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = []
    for images, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(model(images.to(device)).embedding.float().cpu())
    return torch.cat(chunks)


def evaluate_retrieval(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Recall@1 and MAP@R with every test sample as a query against all the others
    (cosine similarity), from pytorch-metric-learning's AccuracyCalculator."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
        device=torch.device("cpu"),
    )
    scores = calculator.get_accuracy(embeddings, labels, embeddings, labels, ref_includes_query=True)
    return {"recall_at_1": float(scores["precision_at_1"]), "map_at_r": float(scores["mean_average_precision_at_r"])}


@torch.no_grad()
def _kcenter_init(model, dataset, sampler, device) -> None:
    """Initialize the GSP prototypes by greedy k-center on one training batch's local features."""
    indices = next(iter(sampler))
    images = torch.stack([dataset[i][0] for i in indices]).to(device)
    was_training = model.training
    model.eval()
    model.head.init_prototypes_kcenter(model.trunk(images))
    model.train(was_training)


def _validate(config: TrainConfig) -> None:
    """Fail early, before data loading, on settings that would fail later."""
    choices = {"pooling": POOLINGS, "arch": ARCHITECTURES, "metric_loss": METRIC_LOSSES, "prototype_init": ("kcenter", "random")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("epochs", "batch_size", "embedding_dim", "num_prototypes", "width", "class_embedding_dim",
                 "image_size", "collages_per_digit"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 1 <= config.samples_per_class <= config.batch_size:
        raise ValueError(f"samples_per_class must be in [1, batch_size={config.batch_size}], got {config.samples_per_class}")
    for name in ("zero_shot_weight", "weight_decay", "num_workers"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if not 0 < config.transport_ratio <= 1:
        raise ValueError(f"transport_ratio must be in (0, 1], got {config.transport_ratio}")
    if not config.gamma > 0:
        raise ValueError(f"gamma must be > 0, got {config.gamma}")
    if config.backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {config.backend!r}")
    if config.dataset != "collage" and not Path(config.dataset).is_dir():
        raise ValueError(f"dataset must be 'collage' or a directory, got {config.dataset!r}")


def train(config: TrainConfig) -> dict:
    """Train one model; returns {"config", "epochs": [per-epoch losses], "recall_at_1",
    "map_at_r", "seconds", "model"} (metrics on rank 0; other ranks get None)."""
    _validate(config)
    rank, world_size, local_rank = init_distributed()
    device = _device(config, local_rank)
    seed_everything(config.seed)
    train_set, test_set = load_datasets(config)
    model = build_model(
        config.arch,
        config.pooling,
        config.embedding_dim,
        width=config.width,
        num_prototypes=config.num_prototypes,
        transport_ratio=config.transport_ratio,
        gamma=config.gamma,
        backend=config.backend,
    ).to(device)
    sampler = ClassBalancedBatchSampler(
        train_set.labels, config.batch_size, config.samples_per_class, seed=config.seed, rank=rank, world_size=world_size
    )
    if config.pooling == "gsp" and config.prototype_init == "kcenter":
        _kcenter_init(model, train_set, sampler, device)
    zero_shot = None
    if config.pooling == "gsp" and config.zero_shot_weight > 0:
        zero_shot = ZeroShotPredictionLoss(train_set.num_classes, config.class_embedding_dim, weight=config.zero_shot_weight)
    metric_loss = build_metric_loss(config.metric_loss, train_set.num_classes, config.embedding_dim)
    objective = TrainingObjective(model, metric_loss, zero_shot).to(device)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(sampler)))

    checkpoint_path = Path(config.output_dir) / "checkpoint.pt" if config.output_dir else None
    history, start_epoch = [], 0
    if config.resume and checkpoint_path is not None and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], state["epoch"] + 1
    trainer = objective
    if world_size > 1:
        trainer = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        objective.train()
        sums = {"loss": 0.0, "metric": 0.0, "zero_shot": 0.0}
        bar = _progress(loader, f"{config.pooling} epoch {epoch + 1}/{config.epochs}", config.progress and rank == 0)
        for step, (images, labels) in enumerate(bar, start=1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss, metric, zero_shot_value = trainer(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach())
            sums["metric"] += float(metric)
            sums["zero_shot"] += float(zero_shot_value) if zero_shot_value is not None else 0.0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'] / step:.4f}")  # running mean (tqdm's n lags)
        history.append({key: value / len(sampler) for key, value in sums.items()})
        if checkpoint_path is not None and rank == 0:
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "epoch": epoch,
                "config": dataclasses.asdict(config),
            }
            torch.save(state, checkpoint_path)
    seconds = time.perf_counter() - started
    del trainer  # release DDP's reducer while the process group is still up
    result = {"config": config, "epochs": history, "seconds": seconds, "model": model, "recall_at_1": None, "map_at_r": None}
    if rank == 0:
        embeddings = compute_embeddings(model, test_set, device, amp=config.amp)
        result.update(evaluate_retrieval(embeddings, test_set.labels))
    return result


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    """Per-epoch losses and the final retrieval metrics of one run."""
    rows = [
        [str(index + 1), f"{epoch['loss']:.4f}", f"{epoch['metric']:.4f}", f"{epoch['zero_shot']:.4f}"]
        for index, epoch in enumerate(result["epochs"])
    ]
    table = format_table(["epoch", "loss", "metric", "zero-shot"], rows)
    if result["recall_at_1"] is not None:
        table += f"\nRecall@1 {result['recall_at_1']:.4f}   MAP@R {result['map_at_r']:.4f}   ({result['seconds']:.1f} s training)"
    return table
