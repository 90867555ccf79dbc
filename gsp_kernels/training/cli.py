"""`gsp-kernels train` and `gsp-kernels demo`: ``register(subparsers)`` adds both subcommands
to the main CLI's argparse subparsers; each sets ``func`` to a function of the parsed args."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .train import METRIC_LOSSES, TrainConfig, _validate

_HELP = {
    "dataset": "'collage' (embedded, no download) or the root of an ImageFolder-style benchmark (root/<class>/<images>)",
    "pooling": "gsp, or gap (the baseline)",
    "arch": "smallcnn, resnet18 or resnet50 (torchvision, random init)",
    "num_train_classes": "ImageFolder: classes used for training (default: first half of the sorted classes)",
    "prototype_init": "kcenter (greedy k-center on a training batch) or random",
    "zero_shot_weight": "weight of the zero-shot prediction loss next to the metric loss (0 disables it)",
    "metric_loss": f"one of {', '.join(METRIC_LOSSES)} (pytorch-metric-learning)",
    "backend": "gsp_pool backend: auto, reference, triton or cuda",
    "output_dir": "write output_dir/checkpoint.pt after every epoch (and results.json at the end)",
    "amp": "bf16 autocast",
    "resume": "continue from output_dir/checkpoint.pt if it exists",
}
_CHOICES = {"pooling": ("gsp", "gap"), "arch": ("smallcnn", "resnet18", "resnet50"), "metric_loss": METRIC_LOSSES, "prototype_init": ("kcenter", "random")}
_NOT_FLAGS = {"progress"}


def _add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig, skip: set[str] = frozenset()) -> None:
    """One --flag per TrainConfig field (underscores become dashes), defaults from ``defaults``."""
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_FLAGS or field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=_HELP.get(field.name))
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[field.type]
        parser.add_argument(flag, type=kind, default=default, choices=_CHOICES.get(field.name), help=_HELP.get(field.name, f"default {default}"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings; a bad one is a usage error (exit 2) before any data is loaded."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig) if hasattr(args, field.name)}
    config = TrainConfig(**values, progress=not args.no_progress)
    try:
        _validate(config)
    except ValueError as exc:
        print(f"gsp-kernels {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def run_train(args: argparse.Namespace) -> int:
    """Train one model and print its summary table (rank 0 under torchrun)."""
    from .train import shutdown_distributed, summary_table, train

    result = train(_config_from_args(args))
    shutdown_distributed()  # on success only: a barrier after a failed rank would hang
    if result["recall_at_1"] is None:
        return 0  # not rank 0
    print(summary_table(result))
    if args.output_dir:
        from pathlib import Path

        summary = {key: result[key] for key in ("recall_at_1", "map_at_r", "seconds", "epochs")}
        summary["config"] = dataclasses.asdict(result["config"])
        Path(args.output_dir, "results.json").write_text(json.dumps(summary, indent=2))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    """GAP vs GSP on the embedded collage data over several seeds."""
    from .demo import run_demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = _config_from_args(args)
    run_demo(seeds=args.seeds, figure_path=args.figure or None, progress=base.progress, base_config=base)
    return 0


def register(subparsers) -> None:
    """Add the ``train`` and ``demo`` subcommands to an argparse subparsers object."""
    train_parser = subparsers.add_parser(
        "train",
        help="metric learning with GSP or the GAP baseline (torchrun-ready)",
        description="Train an embedding with GSP (+ zero-shot loss) or GAP and report Recall@1 and MAP@R on unseen classes.",
    )
    _add_config_flags(train_parser, TrainConfig())
    train_parser.set_defaults(func=run_train)

    demo_parser = subparsers.add_parser(
        "demo",
        help="GAP vs GSP on the embedded collage data (CPU, a few minutes)",
        description="Train a small CNN with GAP and with GSP on digit collages for several seeds; "
        "print Recall@1 / MAP@R on unseen digits and save a PNG of GSP weight maps.",
    )
    demo_parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..seeds-1), default 3")
    demo_parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads, default 1: the small CNN gains little from more, and extra threads thrash on a busy machine"
    )
    demo_parser.add_argument("--figure", default="gsp_demo.png", help="PNG path for the weight maps ('' for none)")
    from .demo import DEMO_CONFIG

    _add_config_flags(demo_parser, DEMO_CONFIG, skip={"dataset", "pooling", "seed", "resume", "output_dir"})
    demo_parser.set_defaults(func=run_demo_command)
