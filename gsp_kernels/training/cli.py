"""`gsp-kernels train`, `gsp-kernels evaluate`, `gsp-kernels embed`, `gsp-kernels export` and `gsp-kernels demo`:
``register(subparsers)`` adds the subcommands to the main CLI's argparse subparsers; each sets ``func`` to a function
of the parsed args.

Every TrainConfig field is a flag whose argparse default is None, so a flag given explicitly
can be told from one left out: the settings are the recipe's (``--recipe``, in the file or on
the command line) or the defaults, overridden by those of a settings file (``train --config
FILE``, YAML or TOML: ``config_files``), overridden by the explicit flags.

A user's mistake (a setting, a file, a folder, a missing package of the train extra) ends in
one line on stderr and exit status 2, before any data is read where it can be found then; a
traceback is a bug. Results files are written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

from ..nn import POOLING_METHODS
from ..nn.arch import resolve_arch
from .checkpoint import MODEL_CHOICES
from .config import (
    LOGS,
    METRIC_LOSSES,
    OPTIMIZERS,
    PROTOCOLS,
    PROTOTYPE_INITS,
    SCHEDULERS,
    RunError,
    TrainConfig,
    layer_defaults,
    validate_config,
)
from .config_files import config_format, read_config_file
from .datasets import DATASETS
from .datasets.images import ImageReadError, LayoutError
from .embed import SPLITS
from .files import check_writable, write_json
from .recipes import RECIPES, recipe_config

_HELP = {
    "dataset": f"one of {', '.join(DATASETS)} ('collage' is embedded; the others are read from --data-root)",
    "data_root": "the folder the benchmark's archive was extracted into (or the archive's top folder)",
    "pooling": "gsp, or gap (the baseline)",
    "arch": "smallcnn, a torchvision ResNet/ViT name (resnet18, resnet50, vit_b_16), or a timm model name "
    "(timm:NAME, timm/NAME or a bare name timm knows, e.g. timm:vit_small_patch14_dinov2.lvd142m); random init unless --pretrained",
    "pretrained": "backbone weights: a local torchvision/timm state dict (.pth, .safetensors), or 'cache' for the arch's "
    "weights already in the Hugging Face / torch.hub cache (nothing is downloaded)",
    "embedding_dim": "embedding size (default 64 with smallcnn, 512 with any other backbone, unless a recipe sets it)",
    "num_prototypes": "GSP prototypes M (default 16 with smallcnn, 64 with any other backbone, unless a recipe sets it)",
    "class_embedding_dim": "zero-shot loss: class embedding size (default 32 with smallcnn, 512 with any other backbone)",
    "num_train_classes": "imagefolder: classes used for training (default: first half of the sorted classes)",
    "prototype_init": "kcenter (greedy k-center on a training batch), random, memory (GAP while a memory of "
    "--prototype-memory pooled embeddings fills, then k-center over it) or proxies (k-center over proxyanchor's class proxies)",
    "learn_transport_ratio": "GSP: learn mu (sigmoid of a parameter started at --transport-ratio, below 1); its value per "
    "epoch is in the log and results.json",
    "learn_gamma": "GSP: learn gamma (softplus of a parameter started at --gamma, kept below half the largest gamma the op "
    "accepts); its value per epoch is in the log and results.json",
    "pooling_params_lr_multiplier": "learning rate of a learned mu and gamma: --lr x this (default 10; no weight decay)",
    "warm_up_steps": "prototype-init memory: training steps before the memory starts filling",
    "prototype_memory": "prototype-init memory: pooled embeddings stored before k-center picks the prototypes",
    "pooling_method": "GSP pooling of the transport weights: sum (the paper), gem (generalized mean of the weighted "
    "backbone features, learnable power 3) or max (max over them)",
    "augment_max_pool": "GSP: add the projected global max pool of the backbone features to the embedding",
    "zero_shot_weight": "weight of the zero-shot prediction loss next to the metric loss (0 disables it)",
    "metric_loss": f"one of {', '.join(METRIC_LOSSES)} (pytorch-metric-learning)",
    "contrastive_neg_margin": "negative margin of the contrastive loss (Euclidean distance of normalized embeddings)",
    "steps_per_epoch": "batches per epoch ('none': one pass over the training images)",
    "optimizer": "adamw (decoupled weight decay) or adam (L2 weight decay)",
    "scheduler": "cosine (per step, to 0), plateau (x plateau-factor when the epoch's training loss stalls), constant",
    "grad_clip": "clip the gradient norm at this value (0: off)",
    "freeze_bn": "backbone BatchNorm in eval mode with its affine parameters fixed",
    "image_size": "image datasets: training crop and test centre crop",
    "resize": "image datasets: test-time shorter side ('none': image size x 256/227)",
    "protocol": "standard (one model) or mlrc (one model per class-disjoint fold of the training classes, "
    "early stopping on the held-out fold's MAP@R, reported per model and concatenated)",
    "num_folds": "mlrc: folds of the training classes",
    "early_stopping_patience": "mlrc: epochs without a better validation MAP@R before a model stops",
    "validation_classes": "standard protocol: hold out this share of the training classes (0 < share < 1), measure their "
    "MAP@R after every epoch and keep the best epoch's weights as output_dir/best.pt (the model tested); 0: none, the "
    "last epoch is tested",
    "recipe": f"the authors' settings for one of {', '.join(RECIPES)} (explicit flags override them; see the README)",
    "backend": "gsp_pool backend: auto, reference, triton or cuda",
    "output_dir": "write output_dir/checkpoint.pt after every epoch (and results.json at the end)",
    "amp": "bf16 autocast",
    "channels_last": "channels-last memory format for the model and the images",
    "compile": "torch.compile the model's forward",
    "num_workers": "DataLoader worker processes (pinned memory on CUDA, persistent workers)",
    "resume": "continue from output_dir/checkpoint.pt if it exists (at the next epoch)",
    "overwrite": "train anew into an output_dir that holds a run's checkpoint, replacing it (without --resume or "
    "--overwrite such a folder is refused)",
    "log": "tensorboard: event files under output_dir/tensorboard (mlrc: output_dir/fold<k>/tensorboard): losses, learning "
    "rate, images/s, validation and test metrics, GSP weight spread and weight maps; none: no log",
}
_CHOICES = {"pooling": ("gsp", "gap"), "pooling_method": POOLING_METHODS, "metric_loss": METRIC_LOSSES,
            "prototype_init": PROTOTYPE_INITS, "dataset": DATASETS, "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS, "protocol": PROTOCOLS, "recipe": tuple(RECIPES), "log": LOGS}
_NOT_FLAGS = {"progress"}
# a dataset's layout or files, a checkpoint, a folder, a setting found wrong on the way: reported without a traceback
_USER_ERRORS = (FileNotFoundError, ImageReadError, LayoutError, RunError)
# The train extra's modules (and their pip names): what every command needs, and what some settings do.
_EXTRA = {"pytorch_metric_learning": "pytorch-metric-learning", "sklearn": "scikit-learn", "tqdm": "tqdm",
          "torchvision": "torchvision", "PIL": "pillow", "timm": "timm", "safetensors": "safetensors", "scipy": "scipy",
          "matplotlib": "matplotlib", "yaml": "PyYAML", "tomli": "tomli", "tensorboard": "tensorboard"}
_ALWAYS_NEEDED = ("pytorch_metric_learning", "sklearn", "tqdm")
_NONE = "none"  # the value of an optional flag that sets the field to None explicitly


class _ExplicitNone:
    """Marks an optional field given as 'none' on the command line (None means 'not given')."""


def _optional(kind):
    """An argparse type for ``int | None`` fields: a number, or 'none'."""

    def parse(text: str):
        return _ExplicitNone if text.lower() == _NONE else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig, skip: set[str] = frozenset()) -> None:
    """One --flag per TrainConfig field (underscores become dashes); ``defaults`` are those
    the help shows. Every flag defaults to None: given or not, ``_config_from_args`` can tell."""
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_FLAGS or field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = _HELP.get(field.name, "")
        help_text = f"{help_text} (default {default})" if help_text else f"default {default}"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": _optional(int), "str | None": str}[field.type]
        parser.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(field.name), help=help_text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


def _explicit_values(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line ('none' -> None)."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = None if value is _ExplicitNone else value
    return values


def _usage_error(args: argparse.Namespace, message: str):
    print(f"gsp-kernels {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _missing_extra(args: argparse.Namespace, exc: ImportError, module: str | None = None):
    """The install hint for a module of the train extra that is not installed (exit 2)."""
    module = module or (exc.name or "").split(".")[0]
    _usage_error(args, f"needs {module} ({_EXTRA.get(module, module)}), which is not installed ({exc}): install the train "
                       f"extra, pip install -e \".[train]\" (or pip install 'gsp-kernels[train]')")


def _require_extra(args: argparse.Namespace, config: TrainConfig | None = None, extra: tuple[str, ...] = ()) -> None:
    """Import what the command will need of the train extra now, before any work: the metric
    learning modules always, torchvision and Pillow for images or a torchvision/timm backbone,
    timm for a timm backbone or --pretrained weights, tensorboard and matplotlib for --log
    tensorboard, and ``extra``."""
    modules = list(_ALWAYS_NEEDED) + list(extra)
    if config is not None:
        if config.dataset != "collage" or config.arch != "smallcnn":
            modules += ["torchvision", "PIL"]
        if config.pretrained is not None or (config.arch != "smallcnn" and resolve_arch(config.arch)[0] == "timm"):
            modules.append("timm")
        if config.log == "tensorboard":
            modules += ["tensorboard", "matplotlib"]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            _missing_extra(args, exc, module)


def _is_extra(exc: ImportError) -> bool:
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in _EXTRA


@contextmanager
def _reported(args: argparse.Namespace, errors: tuple = _USER_ERRORS, writing: object | None = None):
    """Inside, the user's mistakes end in one line with exit 2: ``errors`` (a setting, the data, a
    file), an OSError while ``writing`` that file, and a missing module of the train extra; any
    other exception is a bug and propagates."""
    try:
        yield
    except errors as exc:
        _usage_error(args, str(exc))
    except OSError as exc:
        if writing is None:
            raise
        _usage_error(args, f"cannot write {writing} ({type(exc).__name__}: {exc})")
    except ImportError as exc:
        if not _is_extra(exc):
            raise
        _missing_extra(args, exc)


def _file_values(args: argparse.Namespace) -> dict:
    """The settings of ``--config FILE`` ({} without one); a bad file is a usage error."""
    path = getattr(args, "config", None)
    if path is None:
        return {}
    try:
        return read_config_file(path, _CHOICES)
    except RunError as exc:
        _usage_error(args, str(exc))
    except ImportError as exc:
        _missing_extra(args, exc)


def _config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The run's settings: ``base`` (default: the recipe the flags or the ``--config`` file
    name, under the protocol given, or TrainConfig()) with the file's settings on top, and the
    explicit flags on top of those. A bad setting is a usage error (exit 2) before any data
    is loaded."""
    settings = {**_file_values(args), **_explicit_values(args)}
    try:
        if base is None:
            recipe = settings.get("recipe")
            protocol = settings.get("protocol", "standard")
            if recipe:
                base = recipe_config(recipe, protocol)
            else:  # without a recipe, a real backbone gets the paper's layer sizes unless flags say otherwise
                base = TrainConfig(**layer_defaults(settings.get("arch", TrainConfig.arch)))
        settings["progress"] = not args.no_progress and settings.get("progress", True)
        config = dataclasses.replace(base, **settings)
        validate_config(config)
    except ValueError as exc:
        _usage_error(args, str(exc))
    return config


def _write_results(args: argparse.Namespace, output_dir: str, name: str, record: dict, after: str) -> None:
    """``output_dir/name`` written atomically; a failure is one line saying what was kept."""
    path = Path(output_dir, name)
    try:
        write_json(path, record)
    except OSError as exc:
        _usage_error(args, f"cannot write {path} ({type(exc).__name__}: {exc}); {after}")


def _writable_folder(args: argparse.Namespace, folder: Path, flag: str) -> None:
    try:
        check_writable(folder)
    except OSError as exc:
        _usage_error(args, f"cannot write to {folder} ({type(exc).__name__}: {exc}): pass a folder you can write to in {flag}")


def _check_figure(args: argparse.Namespace, path: Path) -> None:
    """--figure: a format matplotlib writes, in a folder that can be written (before training)."""
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    if path.suffix and path.suffix.lstrip(".").lower() not in kinds:
        _usage_error(args, f"--figure {path}: matplotlib writes no {path.suffix!r} files; end the name in one of "
                           f"{', '.join('.' + kind for kind in sorted(kinds))} (or pass '' for no figure)")
    _writable_folder(args, path.parent, "--figure")


def run_train(args: argparse.Namespace) -> int:
    """Train as configured and print the summary (rank 0 under torchrun); results.json in
    --output-dir."""
    from .distributed import shutdown_distributed
    from .provenance import provenance
    from .report import results_record, summary_table
    from .run import train

    config = _config_from_args(args)
    kind = config_format(args.config) if args.config else "yaml"  # the run's config.yaml or config.toml
    _require_extra(args, config, ("yaml",) if config.output_dir and kind == "yaml" else ())
    with _reported(args):  # the data, a file or a folder, not a bug: the message names it
        result = train(config, config_format=kind)
    shutdown_distributed()  # on success only: a barrier after a failed rank would hang
    if result["metrics"] is None:
        return 0  # not rank 0
    print(summary_table(result))
    if result["config"].output_dir:
        _write_results(args, result["config"].output_dir, "results.json",
                       {**results_record(result), "provenance": provenance(result["device"])},
                       "the metrics are printed above, and the checkpoint saved: gsp-kernels evaluate scores it again")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate saved models on a benchmark's test split without training."""
    from .evaluate import evaluate_checkpoints
    from .provenance import provenance
    from .report import evaluation_table

    _require_extra(args)
    if args.output_dir:
        _writable_folder(args, Path(args.output_dir), "--output-dir")
    overrides = {name: getattr(args, name) for name in ("dataset", "data_root", "device", "num_workers", "eval_batch_size")
                 if getattr(args, name) is not None}
    with _reported(args, errors=(ValueError, *_USER_ERRORS)):
        result = evaluate_checkpoints(args.checkpoint, which=args.which, **overrides)
    print(evaluation_table(result))
    if args.output_dir:
        _write_results(args, args.output_dir, "evaluation.json", {**result, "provenance": provenance(result["device"])},
                       "the metrics are printed above")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Embeddings of a benchmark split or a folder of images by a trained model, to a file."""
    import torch

    from .embed import (
        benchmark_split,
        check_output,
        embed_images,
        image_folder,
        model_transform,
        write_embeddings,
    )
    from .loading import load_model

    _require_extra(args, extra=("torchvision", "PIL") + (("safetensors",) if str(args.output).endswith(".safetensors") else ()))
    if (args.images is None) == (args.dataset is None and args.data_root is None):
        _usage_error(args, "pass --images DIR (a folder of images), or --dataset NAME and --data-root DIR (a benchmark split)")
    if args.images is not None and args.split is not None:
        _usage_error(args, "--split applies to a benchmark (--dataset, --data-root), not to --images")
    if args.batch_size < 1:
        _usage_error(args, f"--batch-size must be >= 1, got {args.batch_size}")
    with _reported(args, errors=(ValueError, *_USER_ERRORS), writing=args.output):
        output = check_output(args.output)
        _writable_folder(args, output.parent, "--output")
        model = load_model(args.checkpoint, which=args.which)
        config, transform = model.config, model_transform(model.config)  # the images as the model was tested on
        if args.images is not None:
            dataset, paths = image_folder(args.images, transform)
        else:
            overrides = {"dataset": args.dataset or config.dataset, "data_root": args.data_root or config.data_root}
            if overrides["dataset"] != "collage" and overrides["data_root"] is None:
                _usage_error(args, f"--dataset {overrides['dataset']} needs --data-root DIR")
            config = dataclasses.replace(config, **overrides)
            dataset, paths = benchmark_split(config, args.split or "test", transform)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        embeddings = embed_images(model, dataset, device, batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last,
                                  num_workers=args.num_workers, progress=not args.no_progress)
        write_embeddings(output, embeddings, dataset.labels, paths)
    print(f"{embeddings.shape[0]} embeddings of {embeddings.shape[1]} dimensions -> {output}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """A trained model as an ONNX or pt2 file that runs without this package (``gsp_kernels.export``)."""
    from ..export import FORMATS, check_opset, export_onnx, export_pt2
    from .files import atomic_path
    from .loading import load_model
    from .models import input_size

    if args.format not in FORMATS:
        _usage_error(args, f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.opset is not None and args.format != "onnx":
        _usage_error(args, f"--opset applies to --format onnx, not {args.format}")
    if args.image_size is not None and args.image_size < 1:
        _usage_error(args, f"--image-size must be >= 1, got {args.image_size}")
    opset = None
    if args.format == "onnx":
        for module in ("onnx", "onnxscript"):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                _usage_error(args, f"--format onnx needs {module}, which is not installed ({exc}): install the export extra, "
                                   f"pip install -e \".[export]\" (or pip install 'gsp-kernels[export]')")
        try:
            opset = None if args.opset is None else int(args.opset)
        except ValueError:
            _usage_error(args, f"--opset must be an integer, got {args.opset!r}")
        try:
            check_opset(opset)
        except ValueError as exc:
            _usage_error(args, f"--opset {args.opset}: {exc}")
    output = Path(args.output).expanduser()
    if output.is_dir():
        _usage_error(args, f"--output {output} is a folder: name the file to write")
    _writable_folder(args, output.parent, "--output")
    with _reported(args, errors=(ValueError, *_USER_ERRORS), writing=output):
        model = load_model(args.checkpoint, which=args.which)
        image_size = args.image_size or input_size(model.config)
        with atomic_path(output) as partial:
            if args.format == "onnx":
                export_onnx(model, partial, image_size=image_size, opset=opset)
            else:
                export_pt2(model, partial, image_size=image_size)
    print(f"{args.format}: images [batch, 3, {image_size}, {image_size}] -> embedding, written to {output}")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    """GAP vs GSP on the embedded collage data over several seeds."""
    from .demo import DEMO_CONFIG, run_demo

    if args.seeds < 1:
        _usage_error(args, f"--seeds must be >= 1 (the seeds 0..seeds-1), got {args.seeds}")
    if args.threads < 0:
        _usage_error(args, f"--threads must be >= 1 (or 0: torch's default), got {args.threads}")
    base = _config_from_args(args, DEMO_CONFIG)
    _require_extra(args, base, ("matplotlib",) if args.figure else ())
    if args.figure:
        _check_figure(args, Path(args.figure).expanduser())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with _reported(args):
        run_demo(seeds=args.seeds, figure_path=args.figure or None, progress=base.progress, base_config=base,
                 learned_mu=args.learned_mu)
    return 0


def register(subparsers) -> None:
    """Add the ``train``, ``evaluate``, ``embed``, ``export`` and ``demo`` subcommands to an argparse subparsers object."""
    train_parser = subparsers.add_parser(
        "train",
        help="metric learning with GSP or the GAP baseline (torchrun-ready)",
        description="Train an embedding with GSP (+ zero-shot loss) or GAP and report Recall@K, MAP@R and "
        "R-Precision on the test classes; --recipe sets the authors' settings for a benchmark.",
    )
    train_parser.add_argument("--config", metavar="FILE",
                              help="settings from a YAML or TOML file (keys: the flags' names, e.g. batch_size: 32); "
                              "flags given here override it, and it overrides the recipe; RUN/config.yaml repeats a run")
    _add_config_flags(train_parser, TrainConfig())
    train_parser.set_defaults(func=run_train)

    evaluate_parser = subparsers.add_parser(
        "evaluate",
        help="retrieval metrics of saved models (no training)",
        description="Rebuild the model(s) from checkpoint(s) written by 'gsp-kernels train' and report the test "
        "split's metrics; several checkpoints (or an mlrc output folder) are also evaluated concatenated.",
    )
    evaluate_parser.add_argument("--checkpoint", nargs="+", required=True,
                                 help="checkpoint.pt file(s), or output folder(s) holding checkpoint.pt or fold*/checkpoint.pt")
    evaluate_parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    evaluate_parser.add_argument("--data-root", help="default: the checkpoint's")
    evaluate_parser.add_argument("--output-dir", help="write output_dir/evaluation.json")
    evaluate_parser.add_argument("--device", help="default: a GPU when there is one")
    evaluate_parser.add_argument("--num-workers", type=int, help="DataLoader workers (default: the checkpoint's)")
    evaluate_parser.add_argument("--eval-batch-size", type=int, help="images per batch (default: the checkpoint's)")
    evaluate_parser.add_argument("--which", choices=MODEL_CHOICES, default="best",
                                 help="a run's weights: best (its best validation epoch when it kept one, else its last) or last")
    evaluate_parser.set_defaults(func=run_evaluate)

    embed_parser = subparsers.add_parser(
        "embed",
        help="embeddings of a benchmark split or a folder of images, to .npz or .safetensors",
        description="Embed a benchmark split (--dataset, --data-root, --split) or every image under a folder (--images) "
        "with a trained model and write embeddings [n, E] float32, labels [n] (-1: unlabelled) and paths [n] "
        "(relative to the root) to FILE.npz or FILE.safetensors.",
    )
    embed_parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt or best.pt file, or a run folder (mlrc: its folds concatenated)")
    embed_parser.add_argument("--which", choices=MODEL_CHOICES, default="best", help="a run's weights: best or last (see evaluate)")
    embed_parser.add_argument("--images", help="a folder of images (searched recursively; unlabelled)")
    embed_parser.add_argument("--dataset", choices=DATASETS, help="a benchmark (default: the checkpoint's)")
    embed_parser.add_argument("--data-root", help="the benchmark's folder (default: the checkpoint's)")
    embed_parser.add_argument("--split", choices=SPLITS, help="test (default), train, or In-Shop's query or gallery")
    embed_parser.add_argument("--output", required=True, help="FILE.npz or FILE.safetensors")
    embed_parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    embed_parser.add_argument("--device", help="default: a GPU when there is one")
    embed_parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    embed_parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                              help="channels-last memory format for the model and the images")
    embed_parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    embed_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed_parser.set_defaults(func=run_embed)

    export_parser = subparsers.add_parser(
        "export",
        help="a trained model as an ONNX or pt2 file that runs without gsp_kernels",
        description="Write a trained model as an ONNX file of standard operators (onnxruntime) or a torch.export pt2 file "
        "(torch.export.load), images [batch, 3, S, S] -> embedding [batch, E] with a dynamic batch; GSP layers solve in a "
        "fixed number of Newton steps (docs/export.md).",
    )
    export_parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt or best.pt file, or a run folder (mlrc: its folds concatenated)")
    export_parser.add_argument("--format", required=True, metavar="{onnx,pt2}", help="onnx or pt2")
    export_parser.add_argument("--output", required=True, help="the file to write (FILE.onnx or FILE.pt2)")
    export_parser.add_argument("--image-size", type=int, help="side S of the images (default: the size the run was tested at)")
    export_parser.add_argument("--opset", help="onnx: the ONNX opset (default: the exporter's, 20; 18 or newer)")
    export_parser.add_argument("--which", choices=MODEL_CHOICES, default="best", help="a run's weights: best or last (see evaluate)")
    export_parser.set_defaults(func=run_export)

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
    from .demo import DEMO_CONFIG, LEARNED_MU_START

    demo_parser.add_argument("--learned-mu", action=argparse.BooleanOptionalAction, default=True,
                             help=f"also train GSP with a learned mu started at {LEARNED_MU_START:g} and report where it settles "
                             "(default: on)")

    _add_config_flags(demo_parser, DEMO_CONFIG, skip={"dataset", "data_root", "pooling", "seed", "resume", "overwrite", "output_dir",
                                                      "learn_transport_ratio",
                                                      "recipe", "protocol", "num_folds", "early_stopping_patience", "log"})
    demo_parser.set_defaults(func=run_demo_command)
