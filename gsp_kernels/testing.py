"""Helpers shared by the tests (python_tests/), the bench scripts (bench/) and the package's own
`gsp-kernels check` and kernel benchmark: the error metric ‖out − ref‖ / ‖ref‖ and the
tolerances of docs/math.md, Accuracy, on it, problem shapes (B x N x D x M) and their parsing, and random inputs."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# docs/math.md, Accuracy: relative-error tolerances by input dtype and product precision,
# at gamma <= GAMMA_SCALE_FROM. Float32 cost errors reach the plan multiplied by gamma, so
# float32/TF32 tolerances grow linearly above it (docs/math.md, Accuracy).
GAMMA_SCALE_FROM = 5.0
TOLERANCES = {
    ("float64", "auto"): 1e-9,
    ("float32", "auto"): 1e-5,
    ("float32", "ieee"): 1e-5,
    ("float32", "tf32x3"): 1e-5,
    ("float32", "tf32"): 1e-2,
    ("bfloat16", "auto"): 2e-2,
    ("float16", "auto"): 2e-2,
}
ZERO_REFERENCE = ("raise", "inf", "absolute")


def tolerance(dtype_name: str, precision: str, gamma: float) -> float:
    """The tolerance (docs/math.md, Accuracy) for this dtype and precision, scaled by gamma for float32 products."""
    base = TOLERANCES[(dtype_name, precision)]
    return base * max(1.0, gamma / GAMMA_SCALE_FROM) if dtype_name == "float32" else base


def rel_err(out: Tensor, ref: Tensor, *, zero_ref: str = "raise") -> float:
    """‖out − ref‖ / ‖ref‖ (docs/math.md, Accuracy) in float64 on ref's device; inf when out has a
    non-finite value (NaN included), so that no tolerance accepts it.

    A reference of norm 0 has no relative error: ``zero_ref="raise"`` (the tests': comparing with
    an all-zero reference is a mistake in the test) raises ValueError; ``"inf"`` (the check's and
    the split guard's) gives 0 for an exact match and inf for any other output, as a relative
    error would; ``"absolute"`` (the sweep's) returns ‖out − ref‖.
    """
    if zero_ref not in ZERO_REFERENCE:
        raise ValueError(f"zero_ref must be one of {ZERO_REFERENCE}, got {zero_ref!r}")
    ref64 = ref.detach().double()
    out64 = out.detach().to(device=ref64.device, dtype=torch.float64)
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    error, norm = (out64 - ref64).norm().item(), ref64.norm().item()
    if norm > 0:
        return error / norm
    if zero_ref == "absolute":
        return error
    if zero_ref == "inf":
        return 0.0 if error == 0 else math.inf
    raise ValueError("never compare against an all-zero reference")


@dataclass(frozen=True)
class Shape:
    """Problem size: batch, features per sample, feature dim, prototypes. Written BxNxDxM
    (``str(shape)``, what ``Shape.parse`` reads); unpacks as (batch, n, d, m)."""

    batch: int
    n: int
    d: int
    m: int

    @property
    def label(self) -> str:
        return f"B{self.batch} N{self.n} D{self.d} M{self.m}"

    def __str__(self) -> str:
        return f"{self.batch}x{self.n}x{self.d}x{self.m}"

    def __iter__(self):
        return iter((self.batch, self.n, self.d, self.m))

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'64x49x512x64' (B x N x D x M); ValueError unless four positive sizes."""
        try:
            parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
        except ValueError:
            parts = []
        if len(parts) != 4 or min(parts) < 1:
            raise ValueError(f"shape must be BxNxDxM with positive sizes, got {text!r}")
        return cls(*parts)


def shape_argument(text: str) -> Shape:
    """``Shape.parse`` as an argparse type: a bad shape ends in the usage error that names the option."""
    try:
        return Shape.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_shapes(text: str) -> list[Shape]:
    """'64x49x512x64,256x196x512x128' -> the shapes (blank items ignored)."""
    return [Shape.parse(item.strip()) for item in text.split(",") if item.strip()]


def random_rows(count: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """`count` random vectors [count, dim] with norms spread over [0.3, 3] (both sides of the
    lipschitz threshold 1)."""
    direction = torch.randn(count, dim, generator=generator, dtype=dtype)
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(1e-6)
    radius = 0.3 + 2.7 * torch.rand(count, 1, generator=generator, dtype=dtype)
    return direction * radius


def random_inputs(batch: int, n: int, m: int, d: int, seed: int, near_fraction: float = 0.3,
                  dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Features [B, N, D] and prototypes [M, D] in `dtype` on the CPU, drawn in `dtype`; a share
    of the features lies close to a prototype (noise 0.05), so a large gamma gives sparse plans."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = random_rows(m, d, generator, dtype)  # [M, D]
    x = random_rows(batch * n, d, generator, dtype)  # [B·N, D]
    near = torch.rand(batch * n, generator=generator) < near_fraction  # [B·N]
    picks = torch.randint(0, m, (batch * n,), generator=generator)  # [B·N]
    jitter = 0.05 * torch.randn(batch * n, d, generator=generator, dtype=dtype)  # [B·N, D]
    x = torch.where(near[:, None], prototypes[picks] + jitter, x)
    return x.reshape(batch, n, d), prototypes
