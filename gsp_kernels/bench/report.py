"""The kernel benchmark's readable tables, from its report (as ``run_bench`` returns it or
``--json`` saved it): timings per row, the per-call overhead, the training step."""

from __future__ import annotations

from ..table import format_table
from ..testing import Shape
from .candidates import PHASES
from .timing import GRAPH_PHASES

_SPLIT_TEXT = {True: "; triton: samples split across programs",
               False: "; triton: one program per sample (GSP_TRITON_SPLIT=0)"}


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_cell(value) -> str:
    return _fmt(value) if isinstance(value, float) else ("-" if value is None else str(value))


def format_report(report: dict) -> str:
    """The readable tables: timings per row, overhead, training step."""
    headers = ["impl", "shape", "dtype", "fwd ms", "bwd ms", "f+b ms", "f+b min ms", "x plain f+b", "host f+b ms", "graph fwd ms",
               "graph f+b ms", "x paper f+b", "peak MB",
               "TFLOP/s f+b", "GB/s f+b", "floor f+b ms fp32/tc", "note"]
    lines = []
    for row in report["rows"]:
        shape = Shape(**row["shape"]).label
        floor = row["floor_ms"].get("fwd_bwd")
        floor_text = f"{floor['fp32']:.3g}/{floor['tensor_core']:.3g}" if floor else "-"
        lines.append([
            row["name"], shape, row["dtype"], *(_fmt(row["ms"][p]) for p in PHASES), _fmt(row["ms_min"].get("fwd_bwd")),
            _fmt(row.get("vs_plain", {}).get("fwd_bwd"), ".2f") if row.get("variant", "plain") != "plain" else "-",
            _fmt(row.get("host_ms")), *(_fmt(row.get("graph_ms", {}).get(p)) for p in GRAPH_PHASES),
            _fmt(row["speedup_vs_paper"].get("fwd_bwd"), ".2f"), _fmt(row["peak_memory_mb"], ".1f"),
            _fmt(row["tflops"].get("fwd_bwd")), _fmt(row["gbps"].get("fwd_bwd")), floor_text, row["note"],
        ])
    has_triton = any(row["name"].startswith("triton") for row in report["rows"])
    parts = [
        f"device: {report['device']}, torch {report['torch']}, {report['cpu_threads']} CPU threads "
        f"(load average {report['load_average']:.1f}), "
        f"timer: {report['timer']}; mu={report['params']['transport_ratio']}, gamma={report['params']['gamma']}"
        + (_SPLIT_TEXT.get(report.get("triton_split_samples"), "") if has_triton else ""),
        f"peaks: {report['peaks']['source']}; fwd = forward of a training step (inputs require grad), "
        "x paper = paper's time / this time; x plain = this time / the same backend's plain call "
        "(masked: a padded batch, N down to N/2 valid per sample; learned: mu and gamma as tensors taking gradients)",
        *([f"triton tuned configuration: {report.get('triton_tuned_config', 'not recorded')}; "
           "triton:fused / triton:gemm rows force that strategy, plain triton rows let the backend choose"]
          if has_triton else []),
        format_table(headers, lines),
        "",
        "per-call overhead on a 1x1x1x1 input (gsp_pool vs the backend's functions called directly):",
        format_table(
            ["backend", "gsp_pool µs", "backend.forward µs", "overhead µs", "gsp_pool f+b µs", "backend f+b µs",
             "overhead f+b µs"],
            [[o["backend"], *(_fmt(o.get(key), ".1f") for key in (
                "gsp_pool_us", "backend_forward_us", "overhead_us", "gsp_pool_fwd_bwd_us", "backend_fwd_bwd_us",
                "overhead_fwd_bwd_us"))]
             for o in report["overhead"]],
        ),
    ]
    step = report.get("training_step")
    if isinstance(step, dict):  # a report of a run without torchvision: {"unavailable": reason}
        parts += ["", f"training step: unavailable: {step.get('unavailable')}"]
    elif step:
        keys = list(dict.fromkeys(k for row in step for k in row))
        parts += ["", "training step:", format_table(keys, [[_fmt_cell(row.get(k)) for k in keys] for row in step])]
    return "\n".join(parts)
