"""End-to-end cost of GSP in training: one forward + backward + optimizer step of a
torchvision ResNet-50 (random init, bf16 autocast) with GAP and with GSP per backend.

Run ``python -m gsp_kernels.bench.training_step --json PATH`` (GPU; about a minute), or call
``training_step_rows`` (the CLI's ``gsp-kernels bench --training-step``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from ..backends import available_backends
from ..nn import GSP, EmbeddingModel, GlobalAveragePoolHead, GSPOutput


def require_torchvision():
    """torchvision, or a RuntimeError saying that the training-step benchmark needs it (imported
    lazily: optional, and broken with some torch builds)."""
    try:
        import torchvision
    except Exception as exc:
        raise RuntimeError(f"the training-step benchmark needs torchvision's ResNet-50: {exc}") from exc
    return torchvision


def _resnet50_trunk() -> tuple[nn.Module, int]:
    resnet = require_torchvision().models.resnet50(weights=None)
    trunk = nn.Sequential(*(module for name, module in resnet.named_children() if name not in ("avgpool", "fc")))
    return trunk, resnet.fc.in_features


def _step_ms(model: nn.Module, images: torch.Tensor, steps: int, warmup: int) -> list[float]:
    """Milliseconds of each timed training step (forward, embedding loss, backward, SGD step)."""
    device = images.device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output: GSPOutput = model(images)
            loss = output.embedding.float().square().mean()
            if output.attributes is not None:
                loss = loss + output.attributes.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - started))
    return times


def training_step_rows(
    device: str | torch.device,
    backends: list[str] | None = None,
    batch: int = 128,
    image_size: int = 224,
    steps: int = 10,
    *,
    warmup: int = 3,
    embedding_dim: int = 512,
    num_prototypes: int = 64,
    trunk_factory=None,
) -> list[dict]:
    """Median step time of ResNet-50 + GAP and + GSP on each backend, and GSP's overhead.

    Rows: {"model", "pooling", "backend", "batch", "image_size", "step_ms_median",
    "step_ms_min", "overhead_pct"} (overhead vs the GAP row; None for GAP). ``backends``
    defaults to those available on ``device``. ``trunk_factory`` (-> (trunk, channels))
    replaces the ResNet-50 trunk, e.g. for tests without torchvision.
    """
    device = torch.device(device)
    if backends is None:
        backends = available_backends(device)
    if not backends:
        raise ValueError(f"no gsp_pool backend runs on {device}")
    trunk_factory = trunk_factory or _resnet50_trunk
    torch.manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    trunk, channels = trunk_factory()
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    heads = [("gap", "-", GlobalAveragePoolHead(channels, embedding_dim))]
    heads += [("gsp", name, GSP(channels, embedding_dim, num_prototypes, backend=name)) for name in backends]
    rows, gap_ms = [], None
    for pooling, backend, head in heads:
        model = EmbeddingModel(trunk, head.to(device))
        times = _step_ms(model, images, steps, warmup)
        median = statistics.median(times)
        if pooling == "gap":
            gap_ms = median
        rows.append(
            {
                "model": "resnet50" if trunk_factory is _resnet50_trunk else "custom",
                "pooling": pooling,
                "backend": backend,
                "batch": batch,
                "image_size": image_size,
                "step_ms_median": median,
                "step_ms_min": min(times),
                "overhead_pct": None if pooling == "gap" else 100.0 * (median - gap_ms) / gap_ms,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the rows and optionally write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="*", default=None, help="default: every backend available on the device")
    parser.add_argument("--batch", type=int, default=None, help="default 128 on a GPU, 2 on a CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 on a GPU, 64 on a CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    torch.backends.cudnn.benchmark = on_gpu
    batch = args.batch or (128 if on_gpu else 2)
    image_size = args.image_size or (224 if on_gpu else 64)
    rows = training_step_rows(args.device, args.backends, batch, image_size, args.steps)
    for row in rows:
        overhead = "" if row["overhead_pct"] is None else f"  overhead {row['overhead_pct']:+.1f}%"
        print(f"{row['model']} B={row['batch']} {row['image_size']}px {row['pooling']:>3} {row['backend']:>9}: {row['step_ms_median']:.2f} ms{overhead}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(args.device), "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
