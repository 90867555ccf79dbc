"""What a run prints and writes: every table of ``gsp-kernels train``, ``evaluate`` and the
summaries, and the JSON record of results.json.

- ``run_title(config)``: one line naming the data, the model (a learned mu or gamma says so) and the schedule.
- ``split_note(differences)``: a warning line when the splits are not the papers'.
- ``notes_lines(result)``: the run's warnings (a GSP model still in its GAP warm-up) and the
  parts of a recipe the data did not allow.
- ``summary_table(result)``: everything ``gsp-kernels train`` prints at the end (an mlrc run's
  through ``mlrc_table``: one row per fold, then every model's metrics and the concatenation's).
- ``evaluation_table(result)``: what ``gsp-kernels evaluate`` prints.
- ``format_metrics_table(metrics)``: retrieval metrics in percent, one row per model.
- ``results_record(result)``: the JSON-ready part of a ``train`` result.
- ``splits_line(splits)``, ``model_label(config)``: the plain-text pieces (tables by
  ``gsp_kernels.table.format_table``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ..table import format_table
from .config import TrainConfig
from .recipes import NOT_REPRODUCED

SUMMARY_EPOCHS = 10  # epochs the summary table shows (the last ones; results.json has all)


def splits_line(splits: dict) -> str:
    """"train: 100 classes, 5864 images  test: ..." from a BenchmarkData.describe()."""
    return "  ".join(f"{split}: {sizes['classes']} classes, {sizes['images']} images" for split, sizes in splits.items())


def split_note(differences: list[str] | None) -> str:
    """"" when the splits are the papers' (or the data has none), else a line saying how
    they differ: numbers from such a run are not comparable with the papers' tables."""
    if not differences:
        return ""
    return f"\nWARNING: not the papers' split, not comparable with their tables: {'; '.join(differences)}"


def notes_lines(result: dict) -> str:
    """"\nWARNING: ..." lines: the run's ``warnings`` and its ``recipe_not_followed`` parts
    (``protocols.run_notes``); "" when there are none."""
    lines = [f"WARNING: {text}" for text in result.get("warnings") or ()]
    recipe = result["config"].recipe if "config" in result else None
    lines += [f"WARNING: recipe {recipe} not followed on this data: {text}" for text in result.get("recipe_not_followed") or ()]
    return "".join(f"\n{line}" for line in lines)


WARM_UP_LABEL = " (GAP warm-up)"  # a GSP model whose prototypes never left their warm-up pools by GAP


def model_label(config: TrainConfig, warm_up: dict | None = None) -> str:
    """"gsp resnet50 512-d": the row name of a model in the metrics table; a GSP model still in
    its warm-up (``warm_up``, ``models.prototypes_warm_up``) says so."""
    return f"{config.pooling} {config.arch} {config.embedding_dim}-d{WARM_UP_LABEL if warm_up else ''}"


def run_title(config: TrainConfig) -> str:
    """One line: dataset (and recipe, protocol), pooling and its settings, backbone and its
    weights, embedding size, and the schedule's length."""
    recipe = f", recipe {config.recipe}" if config.recipe else ""
    protocol = f", protocol {config.protocol}" if config.protocol != "standard" else ""
    pooling = "GAP"
    if config.pooling == "gsp":
        extras = (config.pooling_method if config.pooling_method != "sum" else "", "max-pool branch" if config.augment_max_pool else "")
        mu = f"mu learned from {config.transport_ratio:g}" if config.learn_transport_ratio else f"mu {config.transport_ratio:g}"
        gamma = f"gamma learned from {config.gamma:g}" if config.learn_gamma else f"gamma {config.gamma:g}"
        pooling = (f"GSP ({config.num_prototypes} prototypes, {mu}, {gamma}"
                   f"{''.join(f', {extra}' for extra in extras if extra)}; zero-shot loss x{config.zero_shot_weight:g})")
    weights = f"weights {config.pretrained}" if config.pretrained else "random init"
    steps = f"{config.steps_per_epoch} steps" if config.steps_per_epoch else "one pass"
    length = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} of {steps}"
    if config.protocol == "mlrc":
        length = f"{config.num_folds} folds, each at most {length} (early stopping patience {config.early_stopping_patience})"
    return (f"{config.dataset}{recipe}{protocol}: {pooling} on {config.arch} ({weights}), {config.embedding_dim}-d, "
            f"{config.metric_loss} loss; {length}, batches of {config.batch_size}")


def summary_table(result: dict) -> str:
    """The run's title, losses, learned mu and gamma (when learned) and throughput of the last
    ``SUMMARY_EPOCHS`` epochs, then the split sizes and the retrieval metrics (mlrc: one row per
    fold's model and the concatenation)."""
    if "folds" in result:
        return mlrc_table(result)
    history = result["epochs"]
    first_shown = max(0, len(history) - SUMMARY_EPOCHS)
    validated = "best_epoch" in result
    learned = [(key, label, spec) for key, label, spec, flag in (("transport_ratio", "mu", ".4f", "learn_transport_ratio"),
                                                                 ("gamma", "gamma", ".4g", "learn_gamma"))
               if getattr(result["config"], flag)]  # the learned pooling parameters' values at each epoch's end
    rows = [
        [str(index + 1), f"{epoch['loss']:.4f}", f"{epoch['metric']:.4f}", f"{epoch['zero_shot']:.4f}", f"{epoch['lr']:.3g}",
         *(format(epoch[key], spec) for key, _, spec in learned),
         f"{epoch['images_per_second']:.1f}", *([f"{epoch['val_map_at_r']:.4f}"] if validated else [])]
        for index, epoch in enumerate(history[first_shown:], start=first_shown)
    ]
    header = ["epoch", "loss", "metric", "zero-shot", "lr", *(label for _, label, _ in learned), "images/s",
              *(["val MAP@R"] if validated else [])]
    table = f"{run_title(result['config'])}\n" + format_table(header, rows)
    if first_shown:
        table += f"\n({first_shown} earlier epochs in results.json)"
    if result["metrics"] is not None:
        table += f"\n{splits_line(result['splits'])}{split_note(result.get('split_differences'))}"
        table += f"\n{format_metrics_table({model_label(result['config'], result.get('warm_up')): result['metrics']})}"
        table += f"\n({result['seconds']:.1f} s training, {result['images_per_second'] or 0:.1f} images/s)"
        if validated:
            validation = result["validation"]
            table += (f"\n(tested: epoch {result['best_epoch']}, the best validation MAP@R {result['best_val_map_at_r']:.4f} on "
                      f"{validation['classes']} held-out training classes, {validation['images']} images; kept as best.pt)")
    return table + notes_lines(result)


def mlrc_table(result: dict) -> str:
    """Per fold: classes, best epoch and validation MAP@R; then the test metrics of every
    model and of the concatenation."""
    rows = [[str(record["fold"]), str(record["train"]["classes"]), str(record["validation"]["classes"]),
             str(record["best_epoch"]), f"{record['best_val_map_at_r']:.4f}", f"{record['images_per_second'] or 0:.1f}"]
            for record in result["folds"]]
    header = ["fold", "train classes", "val classes", "best epoch", "val MAP@R", "images/s"]
    table = f"{run_title(result['config'])}\n{format_table(header, rows)}"
    if result["metrics"] is not None:
        dim = result["config"].embedding_dim
        per_model = {f"fold {record['fold']} ({dim}-d){WARM_UP_LABEL if record.get('warm_up') else ''}": record["metrics"]
                     for record in result["folds"]}
        per_model[f"separated (mean of {len(result['folds'])}, {dim}-d)"] = result["separated_metrics"]
        per_model[f"concatenated ({result['concatenated_dim']}-d)"] = result["metrics"]
        table += f"\n{splits_line(result['splits'])}{split_note(result.get('split_differences'))}"
        table += f"\n{format_metrics_table(per_model)}"
        table += f"\n({result['seconds']:.1f} s training, {result['images_per_second'] or 0:.1f} images/s)"
    return table + notes_lines(result)


def evaluation_table(result: dict) -> str:
    """The split sizes and one metrics row per model (and the concatenation)."""
    rows = {f"{index}. {Path(model['checkpoint']).parent.name} ({model['embedding_dim']}-d)"
            f"{WARM_UP_LABEL if model.get('warm_up') else ''}": model["metrics"]
            for index, model in enumerate(result["models"], start=1)}
    if "concatenated_dim" in result:
        rows[f"separated (mean of {len(result['models'])})"] = result["separated_metrics"]
        rows[f"concatenated ({result['concatenated_dim']}-d)"] = result["metrics"]
    return (f"{result['dataset']}  {splits_line(result['splits'])}{split_note(result.get('split_differences'))}\n"
            f"{format_metrics_table(rows)}{notes_lines(result)}")


def format_metrics_table(metrics: Mapping) -> str:
    """A plain-text table of metrics in percent: ``{"recall@1": 0.5, ...}`` gives one row;
    ``{"gsp": {...}, "gap": {...}}`` one row per model (columns from the first row)."""
    if not metrics:
        raise ValueError("no metrics to format")
    rows = metrics if all(isinstance(value, Mapping) for value in metrics.values()) else {"": metrics}
    columns = list(next(iter(rows.values())))
    name_width = max(len(str(name)) for name in rows)
    widths = [max(len(column), 6) for column in columns]
    header = " " * name_width + "".join(f"  {column:>{width}}" for column, width in zip(columns, widths))
    lines = [header]
    for name, row in rows.items():
        missing = [column for column in columns if column not in row]
        if missing:
            raise ValueError(f"row {name!r} lacks {missing}")
        cells = "".join(f"  {100 * float(row[column]):>{width}.2f}" for column, width in zip(columns, widths))
        lines.append(f"{name!s:<{name_width}}{cells}")
    lines.append("(percent)")
    return "\n".join(lines)


def results_record(result: dict) -> dict:
    """The JSON-ready part of a ``train`` result (what results.json holds): no model; a run
    from a recipe also lists what the recipe does not reproduce of the authors' runs."""
    rest = {key: value for key, value in result.items() if key not in ("model", "models", "config")}
    record = {"config": dataclasses.asdict(result["config"]), **rest}
    if result["config"].recipe is not None:
        record["recipe_not_reproduced"] = list(NOT_REPRODUCED)
    return record
