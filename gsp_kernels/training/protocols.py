"""The protocols a run trains and evaluates by (``config.protocol``), each a function of
(config, data, device, rank, world_size) -> the ``train`` result.

- "standard" (``train_standard``): one model (GAP baseline or GSP + zero-shot loss) trained
  on the training classes and evaluated on the test classes.
- "mlrc" (``train_mlrc``): the protocol of "A Metric Learning Reality Check" (Musgrave et al.,
  2020), as the GSP authors' TensorFlow framework runs it (``dml_*.yaml``). The training
  classes are cut into ``num_folds`` class-disjoint folds. Model k trains on the other folds
  and validates on fold k (test-time transform) after every epoch: its weights at the best
  validation MAP@R are kept, and training stops after ``early_stopping_patience`` epochs
  without a better one. Model selection never sees the test classes. Each model is evaluated
  on the test split, and so is the concatenation of the models' embeddings (each
  L2-normalized, then the concatenation normalized again: 4 x 128-d -> 512-d).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CHECKPOINT_NAME, seed_everything
from .config import TrainConfig, eval_resize
from .datasets import BenchmarkData, class_folds, subset
from .embeddings import (
    compute_embeddings,
    concatenated_metrics,
    embed_test_splits,
    embedding_options,
    retrieval_scores,
)
from .loop import fit
from .metrics import retrieval_metrics, separated_metrics
from .transforms import test_transform


def metrics_entries(metrics: dict) -> dict:
    """{"metrics", "recall_at_1", "map_at_r"} of a result from retrieval metrics."""
    return {"metrics": metrics, "recall_at_1": metrics["recall@1"], "map_at_r": metrics["map@r"]}


def train_standard(config: TrainConfig, data: BenchmarkData, device: torch.device, *, rank: int = 0, world_size: int = 1) -> dict:
    """Train one model on ``data.train`` (checkpoints to ``output_dir/checkpoint.pt``) and
    evaluate it on the test split: the ``train`` result (metrics on rank 0; other ranks get None)."""
    checkpoint_path = Path(config.output_dir) / CHECKPOINT_NAME if config.output_dir else None
    run = fit(config, data.train, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint_path)
    result = {"config": config, "splits": data.describe(), "split_differences": data.differences_from_papers(),
              "epochs": run["history"], "seconds": run["seconds"],
              "images_per_second": run["images_per_second"], "model": run["model"], "metrics": None,
              "recall_at_1": None, "map_at_r": None}
    if rank == 0:
        result.update(metrics_entries(retrieval_scores(data, *embed_test_splits(run["model"], data, config, device))))
    return result


def validation_map_at_r(model: nn.Module, val_set, config: TrainConfig, device: torch.device) -> float:
    """MAP@R of ``val_set`` searched all against all with ``model``'s embeddings."""
    embeddings = compute_embeddings(model, val_set, device, **embedding_options(config))
    return retrieval_metrics(embeddings, val_set.labels, recall_ks=(1,))["map@r"]


def _validation_transform(config: TrainConfig):
    """The test-time transform for a validation fold of an image dataset (None for the
    collage data, whose tensors have no transform)."""
    return None if config.dataset == "collage" else test_transform(eval_resize(config), config.image_size)


def train_mlrc(config: TrainConfig, data: BenchmarkData, device: torch.device, *, rank: int = 0, world_size: int = 1) -> dict:
    """Train one model per class-disjoint fold of ``data.train`` and evaluate each and their
    concatenation on the test split. Fold k trains with seed ``config.seed + k - 1`` and
    checkpoints to ``output_dir/fold<k>/checkpoint.pt`` (resumable fold by fold).

    -> the ``train`` result with "folds" (per model: its classes, best epoch, validation
    MAP@R, history, test metrics), "metrics" of the concatenated embeddings and
    "separated_metrics" (the mean over the models); "models" holds the models (rank 0 gets
    the metrics, other ranks None)."""
    folds = class_folds(data.train.labels, config.num_folds, seed=config.seed)
    val_transform = _validation_transform(config)
    records, models, query_parts, gallery_parts = [], [], [], []
    for index, (train_indices, val_indices) in enumerate(folds, start=1):
        fold_config = dataclasses.replace(config, seed=config.seed + index - 1)
        seed_everything(fold_config.seed)
        train_set = subset(data.train, train_indices)
        val_set = subset(data.train, val_indices, transform=val_transform)
        checkpoint = Path(config.output_dir) / f"fold{index}" / CHECKPOINT_NAME if config.output_dir else None
        run = fit(fold_config, train_set, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint,
                  validate=lambda model, val_set=val_set, fold_config=fold_config: validation_map_at_r(model, val_set, fold_config, device),
                  description=f"fold {index}/{len(folds)} ")
        models.append(run["model"])
        record = {
            "fold": index,
            "seed": fold_config.seed,
            "train": {"classes": train_set.num_classes, "images": len(train_set)},
            "validation": {"classes": val_set.num_classes, "images": len(val_set)},
            "validation_class_ids": torch.unique(data.train.labels[val_indices]).tolist(),  # labels of data.train
            "best_epoch": run["best_epoch"],
            "best_val_map_at_r": run["best_score"],
            "epochs": run["history"],
            "seconds": run["seconds"],
            "images_per_second": run["images_per_second"],
            "metrics": None,
        }
        if rank == 0:
            query, gallery = embed_test_splits(run["model"], data, config, device)
            record["metrics"] = retrieval_scores(data, query, gallery)
            query_parts.append(query)
            gallery_parts.append(gallery)
        records.append(record)
    seconds = sum(record["seconds"] for record in records)
    images = sum(record["seconds"] * (record["images_per_second"] or 0) for record in records)
    result = {"config": config, "splits": data.describe(), "split_differences": data.differences_from_papers(),
              "folds": records, "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else None, "model": None, "models": models,
              "metrics": None, "recall_at_1": None, "map_at_r": None}
    if rank == 0:
        metrics, result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
        result.update(metrics_entries(metrics))
        result["separated_metrics"] = separated_metrics([record["metrics"] for record in records])
    return result
