"""One model's training loop: ``fit`` trains a model on a training set for the epochs of a
``TrainConfig`` (class-balanced batches, a pytorch-metric-learning loss with GSP's zero-shot
loss, the optimizer and learning-rate schedule, optional early stopping on a validation
score), writes a checkpoint after every epoch and resumes from one exactly. The protocols
(``protocols.py``) call it once per model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..losses import ZeroShotPredictionLoss
from ..nn import GSP, local_features
from .checkpoint import (
    BEST_NAME,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from .config import METRIC_LOSSES, RunError, TrainConfig
from .distributed import broadcast_float, gather_objects
from .embeddings import to_device
from .models import build_model_for, input_size, pooling_values, prototypes_warm_up
from .samplers import ClassBalancedBatchSampler, SeededBatches, SeededSamples
from .tensorboard_log import TensorBoardLog


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


def _loader_options(config: TrainConfig, device: torch.device) -> dict:
    """DataLoader workers, pinned memory on CUDA, persistent workers when there are workers."""
    return {"num_workers": config.num_workers, "pin_memory": device.type == "cuda", "persistent_workers": config.num_workers > 0}


def _kcenter_init(model, dataset, sampler, device, config: TrainConfig) -> None:
    """Initialize the GSP prototypes by greedy k-center on one training batch's local features
    (a RunError saying which flags to change when the batch has fewer than the prototypes)."""
    indices = next(iter(sampler))
    images = torch.stack([dataset[i][0] for i in indices]).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.features(images)
        tokens, grid = local_features(features)
        candidates, wanted = tokens.shape[0] * tokens.shape[1], model.pooling_head.num_prototypes
        if candidates < wanted:
            where = f"a {grid[0]}x{grid[1]} feature map" if grid else f"{tokens.shape[1]} tokens"
            raise RunError(f"--num-prototypes {wanted} needs at least {wanted} local features for its k-center start, and the first "
                           f"training batch has {candidates} ({tokens.shape[0]} images x {where} at --image-size {input_size(config)}): "
                           f"lower --num-prototypes to {candidates} or less, or raise --batch-size or --image-size "
                           f"(or --prototype-init random)")
        model.pooling_head.init_prototypes_kcenter(features)
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


def build_optimizer(config: TrainConfig, parameters, pooling_parameters=()) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 weight decay) over the trainable parameters.

    ``pooling_parameters`` (a GSP head's learned mu and gamma, ``GSP.pooling_parameters``) form a
    second group, after the first: lr x ``config.pooling_params_lr_multiplier`` and no weight
    decay (which would pull mu to 0.5 and gamma to softplus(0), not towards a smaller model).
    Adam's steps are about lr in each raw parameter whatever its gradient's scale, so at the
    shared lr a logit would move 1e-3 a step; x10 lets mu cross its useful range (logit(0.1) to
    logit(0.5) is 2.2) in a few hundred steps while one step still moves mu by 0.0025 at most."""
    pooling = [parameter for parameter in pooling_parameters if parameter.requires_grad]
    pooling_ids = {id(parameter) for parameter in pooling}
    trainable = [parameter for parameter in parameters if parameter.requires_grad and id(parameter) not in pooling_ids]
    groups = [{"params": trainable}]
    if pooling:
        groups.append({"params": pooling, "lr": config.lr * config.pooling_params_lr_multiplier, "weight_decay": 0.0})
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
    return kind(groups, lr=config.lr, weight_decay=config.weight_decay)


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


def _train_epoch(trainer, objective, optimizer, scheduler, loader, config: TrainConfig, device, description: str, show: bool,
                 log: TensorBoardLog | None = None, done_steps: int = 0) -> dict:
    """One epoch over ``loader``. -> {"loss", "metric", "zero_shot" (means over the steps and
    the ranks), "lr" (at the epoch's end, before a plateau step), "images_per_second", "seconds"}.

    images/s counts the images of steps 2..N over the time from the end of step 1 to the end
    of step N: DataLoader start-up, cuDNN autotuning and compilation fall in step 1 (an
    epoch of one step is timed whole). Under DDP it is the total over the ranks. ``log`` gets
    each step's losses and learning rate (steps counted from ``done_steps``)."""
    objective.train()
    if config.freeze_bn:
        freeze_batchnorm(objective.model.trunk)
    trainable = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    sums = torch.zeros(3, device=device)  # loss, metric, zero-shot summed over the steps
    no_zero_shot = torch.zeros((), device=device)  # the zero-shot term of a run without that loss
    started = time.perf_counter()
    timed_from, timed_images, steps = started, 0, 0
    bar = _progress(loader, description, show)
    for step, (images, labels) in enumerate(bar, start=1):
        images, labels = to_device(images, device, config.channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            loss, metric, zero_shot_value = trainer(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        if config.scheduler == "cosine":
            scheduler.step()
        zero_shot_value = no_zero_shot if zero_shot_value is None else zero_shot_value
        if log is not None:
            log.step(done_steps + step, loss.detach(), metric, zero_shot_value, optimizer.param_groups[0]["lr"])
        sums += torch.stack([loss.detach().float(), metric.float(), zero_shot_value.float()])
        steps = step
        if step == 1:
            _synchronize(device)
            timed_from = time.perf_counter()
        else:
            timed_images += len(labels)
        if hasattr(bar, "set_postfix") and step > 1 and (step % 10 == 0 or step == len(loader)):
            rate = world_size * timed_images / max(time.perf_counter() - timed_from, 1e-9)  # every rank's images
            bar.set_postfix(loss=f"{float(sums[0]) / step:.4f}", images_per_s=f"{rate:.1f}")
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


def _epoch_line(description: str, record: dict, config: TrainConfig) -> str:
    line = (f"{description}: loss {record['loss']:.4f} (metric {record['metric']:.4f}, zero-shot {record['zero_shot']:.4f})"
            f"  lr {record['lr']:.3g}  {record['images_per_second']:.1f} images/s  {record['seconds']:.1f} s")
    if config.learn_transport_ratio:
        line += f"  mu {record['transport_ratio']:.4f}"
    if config.learn_gamma:
        line += f"  gamma {record['gamma']:.4g}"
    if "val_map_at_r" in record:
        line += f"  val MAP@R {record['val_map_at_r']:.4f}"
    return line


def fit(
    config: TrainConfig,
    train_set,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    checkpoint_path: Path | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    stop_early: bool = True,
    description: str = "",
    log: TensorBoardLog | None = None,
) -> dict:
    """Train one model on ``train_set`` for ``config.epochs`` epochs of class-balanced batches.

    ``validate(model) -> score`` (higher is better), when given, runs on rank 0 after every
    epoch: the best epoch's weights are kept (and written to best.pt beside ``checkpoint_path``)
    and, with ``stop_early``, training stops after ``config.early_stopping_patience`` epochs
    without a better score. With ``checkpoint_path``
    the full state (model, losses, optimizer, scheduler, epoch, early stopping, every rank's
    RNG states) is written after every epoch; ``config.resume`` continues from it at the
    next epoch boundary, exactly as an uninterrupted run would: the batches are a function of
    seed and epoch, and each sample's augmentation of (seed, epoch, step, position), whatever
    the number of DataLoader workers. ``log`` (``tensorboard_log.TensorBoardLog``, rank 0) gets
    every step's losses and every epoch's record and pooling weights.

    -> {"model" (best or last weights), "history" (a dict per epoch), "seconds",
    "images_per_second", "best_epoch", "best_score", "warm_up" (``models.prototypes_warm_up``:
    a GSP head that never left its GAP warm-up, else None), "pooling_values" (a GSP head's mu and
    gamma in the returned weights, ``models.pooling_values``; every epoch's record has them at its
    end too), "batches" (what a batch held:
    "classes", "images_per_class"; the "training_classes", and the "short_classes" among them
    with fewer images, drawn with repetition)}.
    """
    model = build_model_for(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sampler = ClassBalancedBatchSampler(train_set.labels, config.batch_size, config.samples_per_class, seed=config.seed,
                                        rank=rank, world_size=world_size, num_batches=config.steps_per_epoch)
    if config.pooling == "gsp" and config.prototype_init == "kcenter":
        _kcenter_init(model, train_set, sampler, device, config)
    zero_shot = None
    if config.pooling == "gsp" and config.zero_shot_weight > 0:
        zero_shot = ZeroShotPredictionLoss(train_set.num_classes, config.class_embedding_dim, weight=config.zero_shot_weight)
    metric_loss = build_metric_loss(config.metric_loss, train_set.num_classes, config.embedding_dim, config.contrastive_neg_margin)
    objective = TrainingObjective(model, metric_loss, zero_shot).to(device)
    if config.pooling == "gsp" and config.prototype_init == "proxies":
        if train_set.num_classes < config.num_prototypes:
            raise RunError(f"--prototype-init proxies picks the --num-prototypes {config.num_prototypes} prototypes among the "
                           f"class proxies, and the training set has {train_set.num_classes} classes: lower --num-prototypes to "
                           f"{train_set.num_classes} or less, or choose another --prototype-init")
        model.pooling_head.init_prototypes_from_proxies(metric_loss.proxies)  # the authors' PyTorch init
    if config.freeze_bn:
        freeze_batchnorm(model.trunk)
    head = model.pooling_head
    optimizer = build_optimizer(config, objective.parameters(), head.pooling_parameters() if isinstance(head, GSP) else ())
    scheduler = build_scheduler(config, optimizer, len(sampler))

    history, start_epoch, stopped = [], 0, False
    early = {"score": None, "epoch": None, "bad_epochs": 0, "model": None}
    if config.resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        check_resumable(state["config"], config, checkpoint_path)
        try:
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(f"cannot resume {checkpoint_path}: its state does not fit the model and optimizer these settings "
                           f"build ({first}); pass --overwrite to train anew, or another --output-dir") from exc
        history, start_epoch, stopped = state["history"], state["epoch"] + 1, state["stopped"]
        early = state["early_stopping"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    if log is not None:
        log.open(start_epoch * len(sampler))
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
        record = _train_epoch(trainer, objective, optimizer, scheduler, loader, config, device, label, show, log, epoch * len(sampler))
        if config.scheduler == "plateau":
            scheduler.step(record["loss"])
        record.update(pooling_values(model))  # a GSP head's mu and gamma at the epoch's end
        if validate is not None:
            score = broadcast_float(validate(model) if rank == 0 else None, device, world_size)
            record["val_map_at_r"] = score
            if early["score"] is None or score > early["score"]:
                early = {"score": score, "epoch": epoch, "bad_epochs": 0,
                         "model": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}}
                if checkpoint_path is not None and rank == 0:
                    save_best(checkpoint_path.with_name(BEST_NAME), early["model"], epoch, score, config)
            else:
                early["bad_epochs"] += 1
            stopped = stop_early and early["bad_epochs"] >= config.early_stopping_patience
        history.append(record)
        if log is not None:
            log.epoch((epoch + 1) * len(sampler), epoch + 1, record, model, config, device)
        if show:
            print(_epoch_line(label, record, config), file=sys.stderr, flush=True)
        # every rank's RNG states (rank order), so each resumes its own augmentation stream
        rng_states = gather_objects(rng_state(), world_size) if checkpoint_path is not None else None
        if checkpoint_path is not None and rank == 0:
            save_checkpoint(checkpoint_path, {
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
        "warm_up": prototypes_warm_up(model),
        "pooling_values": pooling_values(model),
        "batches": {"classes": sampler.classes_per_batch, "images_per_class": sampler.samples_per_class,
                    "training_classes": len(sampler.by_class),
                    "short_classes": sum(len(members) < sampler.samples_per_class for members in sampler.by_class)},
    }
