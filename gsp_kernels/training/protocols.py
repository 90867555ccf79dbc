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

import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CHECKPOINT_NAME, fold_checkpoint, fold_config, seed_everything
from .config import RunError, TrainConfig, eval_resize
from .datasets import BenchmarkData, class_folds, held_out_classes, subset
from .embeddings import (
    compute_embeddings,
    concatenated_metrics,
    embed_test_splits,
    embedding_options,
    retrieval_scores,
)
from .loop import fit
from .metrics import retrieval_metrics, separated_metrics
from .tensorboard_log import training_log
from .transforms import test_transform


def run_notes(config: TrainConfig, run: dict, world_size: int = 1) -> dict:
    """What a trained model's run did otherwise than its settings say, from ``fit``'s result:
    {"warnings": a GSP head that never left its GAP warm-up}, and for a recipe's run
    {"recipe_not_followed": the parts of the recipe the data did not allow (the prototype
    memory, the batches' classes and images per class)}."""
    warnings, not_followed = [], []
    if run["warm_up"] is not None:
        filled, size = run["warm_up"]["memory_filled"], run["warm_up"]["memory_size"]
        warnings.append(f"the GSP prototypes never left their warm-up: the prototype memory held {filled} of {size} pooled "
                        f"embeddings when training ended, so the model pooled by GAP in every step and at test time (GAP numbers, "
                        f"not GSP's); more steps (--epochs, --steps-per-epoch) or a smaller --prototype-memory fill it")
        not_followed.append(f"GSP prototypes by k-center over a memory of {size} pooled embeddings: it held {filled} when "
                            f"training ended, so the run pooled by GAP throughout")
    batches = run["batches"]
    wanted = (config.batch_size // config.samples_per_class, config.samples_per_class)
    if (batches["classes"], batches["images_per_class"]) != wanted:
        ranks = f" for {world_size} ranks" if world_size > 1 else ""
        not_followed.append(f"batches of {wanted[0]} classes x {wanted[1]} images: the training set has {batches['training_classes']} "
                            f"classes{ranks}, so a batch held {batches['classes']} classes x {batches['images_per_class']} images")
    if batches["short_classes"]:
        not_followed.append(f"{batches['images_per_class']} images per class in a batch: {batches['short_classes']} of the "
                            f"{batches['training_classes']} training classes have fewer, drawn with repetition")
    notes = {"warnings": warnings}
    if config.recipe is not None:
        notes["recipe_not_followed"] = not_followed
    return notes


def _log_notes(notes: dict, recipe: str | None, rank: int, prefix: str = "") -> None:
    """The notes of ``run_notes`` on stderr (rank 0): the run's log says them as it ends."""
    if rank != 0:
        return
    for text in notes["warnings"]:
        print(f"WARNING: {prefix}{text}", file=sys.stderr, flush=True)
    for text in notes.get("recipe_not_followed", ()):
        print(f"WARNING: recipe {recipe} not followed on this data: {prefix}{text}", file=sys.stderr, flush=True)


def metrics_entries(metrics: dict) -> dict:
    """{"metrics", "recall_at_1", "map_at_r"} of a result from retrieval metrics."""
    return {"metrics": metrics, "recall_at_1": metrics["recall@1"], "map_at_r": metrics["map@r"]}


def train_standard(config: TrainConfig, data: BenchmarkData, device: torch.device, *, rank: int = 0, world_size: int = 1) -> dict:
    """Train one model on ``data.train`` (checkpoints to ``output_dir/checkpoint.pt``) and
    evaluate it on the test split: the ``train`` result (metrics on rank 0; other ranks get None).

    With ``config.validation_classes``, that share of the training classes (drawn by the seed) is
    held out: the model trains on the rest for every epoch, its validation MAP@R is measured
    after each, and the best epoch's weights are kept (``output_dir/best.pt``) and tested; the
    result adds "best_epoch", "best_val_map_at_r" and "validation" (its classes and images)."""
    checkpoint_path = Path(config.output_dir) / CHECKPOINT_NAME if config.output_dir else None
    train_set, validate, validation = data.train, None, None
    if config.validation_classes > 0:
        try:
            train_indices, val_indices = held_out_classes(data.train.labels, config.validation_classes, seed=config.seed)
        except ValueError as exc:
            raise RunError(f"--validation-classes {config.validation_classes}: {exc}; lower it, or train on more classes") from exc
        train_set = subset(data.train, train_indices)
        val_set = subset(data.train, val_indices, transform=_validation_transform(config))
        validation = {"classes": val_set.num_classes, "images": len(val_set),
                      "class_ids": torch.unique(data.train.labels[val_indices]).tolist()}  # labels of data.train
        validate = lambda model: validation_map_at_r(model, val_set, config, device)  # noqa: E731
    log = training_log(config, config.output_dir, data, rank)
    run = fit(config, train_set, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint_path,
              validate=validate, stop_early=False, log=log)
    notes = run_notes(config, run, world_size)
    _log_notes(notes, config.recipe, rank)
    result = {"config": config, "splits": data.describe(), "split_differences": data.differences_from_papers(),
              "epochs": run["history"], "seconds": run["seconds"],
              "images_per_second": run["images_per_second"], "model": run["model"], "metrics": None,
              "recall_at_1": None, "map_at_r": None, "warm_up": run["warm_up"], "pooling_values": run["pooling_values"], **notes}
    if validation is not None:
        result.update(validation=validation, best_epoch=run["best_epoch"], best_val_map_at_r=run["best_score"])
    if rank == 0:
        result.update(metrics_entries(retrieval_scores(data, *embed_test_splits(run["model"], data, config, device))))
    if log is not None:
        log.finish(result["metrics"])
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
    if config.num_folds > data.train.num_classes:
        raise RunError(f"--num-folds {config.num_folds} needs at least as many training classes, and the training set has "
                       f"{data.train.num_classes}: lower --num-folds (at least 2), or train on more classes")
    folds = class_folds(data.train.labels, config.num_folds, seed=config.seed)
    val_transform = _validation_transform(config)
    records, models, query_parts, gallery_parts = [], [], [], []
    for index, (train_indices, val_indices) in enumerate(folds, start=1):
        fold_settings = fold_config(config, index)
        seed_everything(fold_settings.seed)
        train_set = subset(data.train, train_indices)
        val_set = subset(data.train, val_indices, transform=val_transform)
        checkpoint = fold_checkpoint(config.output_dir, index) if config.output_dir else None
        log = training_log(fold_settings, checkpoint.parent if checkpoint else None, data, rank)
        run = fit(fold_settings, train_set, device, rank=rank, world_size=world_size, checkpoint_path=checkpoint,
                  validate=lambda model, val_set=val_set, settings=fold_settings: validation_map_at_r(model, val_set, settings, device),
                  description=f"fold {index}/{len(folds)} ", log=log)
        notes = run_notes(fold_settings, run, world_size)
        _log_notes(notes, config.recipe, rank, prefix=f"fold {index}: ")
        models.append(run["model"])
        record = {
            "fold": index,
            "seed": fold_settings.seed,
            "train": {"classes": train_set.num_classes, "images": len(train_set)},
            "validation": {"classes": val_set.num_classes, "images": len(val_set)},
            "validation_class_ids": torch.unique(data.train.labels[val_indices]).tolist(),  # labels of data.train
            "best_epoch": run["best_epoch"],
            "best_val_map_at_r": run["best_score"],
            "epochs": run["history"],
            "seconds": run["seconds"],
            "images_per_second": run["images_per_second"],
            "metrics": None,
            "warm_up": run["warm_up"],
            "pooling_values": run["pooling_values"],
            **notes,
        }
        if rank == 0:
            query, gallery = embed_test_splits(run["model"], data, config, device)
            record["metrics"] = retrieval_scores(data, query, gallery)
            query_parts.append(query)
            gallery_parts.append(gallery)
        if log is not None:
            log.finish(record["metrics"])
        records.append(record)
    seconds = sum(record["seconds"] for record in records)
    images = sum(record["seconds"] * (record["images_per_second"] or 0) for record in records)
    result = {"config": config, "splits": data.describe(), "split_differences": data.differences_from_papers(),
              "folds": records, "seconds": seconds, "images_per_second": images / seconds if seconds > 0 else None, "model": None, "models": models,
              "metrics": None, "recall_at_1": None, "map_at_r": None,
              "warnings": [f"fold {record['fold']}: {text}" for record in records for text in record["warnings"]]}
    if config.recipe is not None:
        result["recipe_not_followed"] = [f"fold {record['fold']}: {text}" for record in records for text in record["recipe_not_followed"]]
    if rank == 0:
        metrics, result["concatenated_dim"] = concatenated_metrics(data, query_parts, gallery_parts)
        result.update(metrics_entries(metrics))
        result["separated_metrics"] = separated_metrics([record["metrics"] for record in records])
    return result
