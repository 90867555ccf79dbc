"""The `gsp-kernels` command (also `python -m gsp_kernels`): check, bench, info, train, demo."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .backends import (
    BACKENDS,
    backend_status,
    parse_spec,
    split_spec,
    triton_tuned_config,
)
from .backends.native import build_info
from .contract import DTYPES
from .testing import parse_shapes
from .version import __version__


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _arg_type(convert):
    """An argparse type from a converter raising ValueError: a bad value then ends in
    "gsp-kernels bench: error: argument --shapes: ..." (exit 2), not a traceback."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__.lstrip("_")
    return parse


def _known(items: list[str], allowed, what: str) -> list[str]:
    """`items`, or a ValueError naming those not in `allowed`."""
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return items


def _backend_specs(text: str) -> list[str]:
    """'cuda,cuda@tf32x3,triton:gemm' -> the specs, each a known backend (parse_spec checks
    the precision and strategy)."""
    specs = _csv(text)
    _known([parse_spec(spec)[0] for spec in specs], BACKENDS, "backend(s)")
    return specs


def _backend_names(text: str) -> list[str]:
    """'reference,triton:gemm' -> the names, each a known backend (triton may name a strategy)."""
    names = _csv(text)
    _known([split_spec(name)[0] for name in names], BACKENDS, "backend(s)")
    return names


def _dtypes(text: str) -> list[str]:
    return _known(_csv(text), DTYPES, "dtype(s)")


def _baselines(text: str) -> list[str]:
    from .bench import BASELINES

    return _known(_csv(text), BASELINES, "baseline(s)")


def _variants(text: str) -> list[str]:
    from .bench.candidates import VARIANTS

    return _known(_csv(text), VARIANTS, "variant(s)")


def _peaks(text: str) -> list[float]:
    peaks = [float(item) for item in _csv(text)]
    if not 1 <= len(peaks) <= 3 or min(peaks) <= 0:
        raise ValueError(f"expected FP32[,TF32[,BF16]] positive TFLOP/s, got {text!r}")
    return peaks


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _write_json(path: str, payload) -> None:
    """JSON to `path`, or to stdout for '-'."""
    text = json.dumps(payload, indent=2, default=str)
    if path == "-":
        print(text)
        return
    with open(path, "w") as handle:
        handle.write(text + "\n")


def cmd_check(args) -> int:
    """Compare every available backend with the float64 reference; 1 if any comparison fails."""
    from .check import check_table, rows_as_dicts, run_check

    rows = run_check(backends=args.backends or None, dtypes=args.dtypes or None, device=_device(args), seed=args.seed)
    failed = [row for row in rows if row.status == "FAIL"]
    if args.json:
        _write_json(args.json, {"passed": not failed, "rows": rows_as_dicts(rows)})
    if args.json != "-":
        print(check_table(rows))
        skipped = sum(row.status == "skipped" for row in rows)
        print(f"\n{len(rows) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    """Time backends and baselines; table on stdout, JSON report with --json, PNG with --plot.

    With --from-json, no measuring: the tables (and --plot's PNG) of a saved report."""
    from .bench import BASELINES, DEFAULT_SHAPES, QUICK_SHAPES, run_bench

    if args.plot:
        from .bench.plot import require_matplotlib

        try:
            require_matplotlib()  # before measuring, not after minutes of it
        except ImportError as exc:
            print(f"gsp-kernels bench --plot: {exc}", file=sys.stderr)
            return 2
    if args.from_json:
        with open(args.from_json) as handle:
            report = json.load(handle)
        return _bench_output(report, args)
    shapes = tuple(args.shapes or ()) or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    # torch.compile costs tens of seconds per graph on a CPU: --quick leaves it out unless asked.
    baselines = args.baselines if args.baselines is not None else (["paper"] if args.quick else BASELINES)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_bench(
        shapes=shapes,
        dtypes=args.dtypes or None,
        backends=args.backends or None,
        baselines=tuple(baselines),
        device=_device(args),
        warmup=2,
        repeats=args.repeats or (5 if args.quick else 9),
        newton_iterations=args.newton_iterations,
        peak_tflops=args.peak_tflops,
        peak_gbps=args.peak_gbps,
        training_step=args.training_step,
        **({"variants": tuple(args.variants)} if args.variants else {}),
    )
    if args.json:
        _write_json(args.json, report)
    return _bench_output(report, args)


def _bench_output(report: dict, args) -> int:
    """The bench tables on stdout, and the PNG for --plot."""
    from .bench import format_report

    print(format_report(report))
    if args.plot:
        from .bench.plot import plot_report

        plot_report(report, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


def cmd_info(args) -> int:
    """Versions, GPU, native build, backend availability and the Triton tuned configuration in force."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    device = _device(args)
    info = {
        "gsp_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "build_info": build_info(),
        "device": str(device),
        "backends": {name: {"available": s.available, "reason": s.reason} for name, s in backend_status(device).items()},
        "triton_tuned_config": triton_tuned_config(device),
    }
    if args.json:
        _write_json(args.json, info)
        return 0
    for key in ("gsp_kernels", "python", "torch", "torch_cuda", "triton", "gpu"):
        print(f"{key:12} {info[key] if info[key] is not None else 'none'}")
    print("build_info   " + ", ".join(f"{k}={v}" for k, v in info["build_info"].items()))
    print(f"backends on {device}:")
    for name in BACKENDS:
        status = info["backends"][name]
        print(f"  {name:10} {'available' if status['available'] else 'unavailable'}: {status['reason']}")
    print(f"triton tuned configuration: {info['triton_tuned_config']}")
    return 0


def _add_training_commands(subparsers) -> None:
    """`train`, `evaluate`, `embed`, `export` and `demo` from gsp_kernels.training.cli, or stubs that say why they are missing."""
    try:
        from .training.cli import register
    except ImportError as exc:
        reason = (
            f"unavailable: {exc}. Install the training extra: pip install -e \".[train]\" "
            "(or pip install 'gsp-kernels[train]')"
        )

        def unavailable(args) -> int:
            print(f"gsp-kernels {args.command}: {reason}", file=sys.stderr)
            return 2

        for name, help_text in (("train", "train a metric-learning model with GSP"), ("evaluate", "evaluate saved models"),
                                ("embed", "embeddings of a trained model"), ("export", "export a trained model to ONNX or pt2"),
                                ("demo", "end-to-end demo")):
            stub = subparsers.add_parser(name, help=f"{help_text} ({reason})")
            stub.set_defaults(func=unavailable)
        return
    register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="gsp-kernels", description="Generalized Sum Pooling kernels: checks, benchmarks, demo.")
    parser.add_argument("--version", action="version", version=f"gsp-kernels {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)

    check = subparsers.add_parser("check", help="compare every available backend with the float64 reference")
    check.add_argument("--backends", type=_arg_type(_backend_names),
                       help="comma-separated backends (default: all available here; triton checks both strategies, "
                       "triton:fused or triton:gemm one)")
    check.add_argument("--dtypes", type=_arg_type(_dtypes),
                       help="comma-separated dtypes (default: float64,float32,bfloat16,float16)")
    check.add_argument("--device", help="device to run the backends on (default: cuda if present, else cpu)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-' for stdout only)")
    check.set_defaults(func=cmd_check)

    bench = subparsers.add_parser("bench", help="time backends against the paper's algorithm and torch.compile")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats, no torch.compile baseline")
    bench.add_argument("--shapes", type=_arg_type(parse_shapes), help="comma-separated BxNxDxM (default: 64x49x512x64,256x196x512x128)")
    bench.add_argument("--backends", type=_arg_type(_backend_specs), help="comma-separated backends (default: all available here); "
                       "name@precision times a product precision, e.g. cuda,cuda@tf32x3; triton:fused or triton:gemm forces "
                       "that Triton strategy, e.g. triton:gemm@ieee")
    bench.add_argument("--baselines", type=_arg_type(_baselines), help="comma-separated from paper,compile (default: both; --quick: paper)")
    bench.add_argument("--dtypes", type=_arg_type(_dtypes), help="comma-separated dtypes (default: float32, plus bfloat16 on a GPU)")
    bench.add_argument("--device", help="device (default: cuda if present, else cpu)")
    bench.add_argument("--threads", type=_arg_type(_positive_int), help="CPU intra-op threads (default: torch's); 1 is steadier on a busy machine")
    bench.add_argument("--repeats", type=_arg_type(_positive_int), help="timed repeats per measurement on the CPU (default 9; --quick 5)")
    bench.add_argument("--newton-iterations", type=_arg_type(_positive_int), default=20,
                       help="fixed Newton steps of the torch.compile baseline (default 20)")
    bench.add_argument("--peak-tflops", type=_arg_type(_peaks), help="FP32[,TF32[,BF16]] peaks for the roofline floor (default: H200 "
                       "67,495,990 on an H200, else measured)")
    bench.add_argument("--peak-gbps", type=_arg_type(_positive_float), help="memory bandwidth for the floor (H200 default 4300)")
    bench.add_argument("--variants", type=_arg_type(_variants),
                       help="comma-separated calls of each backend, timed side by side: plain (float mu and gamma), masked "
                       "(a padded batch), learned (mu and gamma as tensors taking gradients); default: all three")
    bench.add_argument("--training-step", action="store_true",
                       help="also time a training step (gsp_kernels.bench.training_step)")
    bench.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    bench.add_argument("--plot", metavar="PATH", help="also draw the forward+backward times as a PNG (needs matplotlib)")
    bench.add_argument("--from-json", metavar="PATH",
                       help="measure nothing: print the tables (and --plot) of a report saved with --json; "
                       "the measuring options are ignored")
    bench.set_defaults(func=cmd_bench)

    info = subparsers.add_parser("info", help="versions, GPU, native build, backend availability")
    info.add_argument("--device", help="device whose backends to report (default: cuda if present, else cpu)")
    info.add_argument("--json", metavar="PATH", help="write as JSON ('-' for stdout)")
    info.set_defaults(func=cmd_info)

    _add_training_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gsp-kernels` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
