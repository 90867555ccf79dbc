"""Per-device tuned launch settings of the Triton backend: one JSON file per GPU model and Triton
version, the pattern of vLLM's fused-MoE configurations.

``bench/sweep_triton.py --write-config`` measures on a GPU and writes
``gsp_kernels/backends/triton/tuned_configs/<GPU name>__triton-<major.minor>.json``; the backend
loads the file that matches the current GPU and Triton version on first use (once per device) and
falls back to its built-in rules (``fused.tile_config``, the fused strategy) for every call that no
entry covers. ``GSP_TRITON_TUNED_CONFIG=PATH`` forces one file for every device (also the
interpreter's CPU), ``GSP_TRITON_TUNED_CONFIG=none`` disables the lookup; both are read on first
use.

A file (schema 1)::

    {"schema": 1, "device_name": "NVIDIA H200", "triton": "3.6",
     "produced_by": {"date": ..., "commit": ..., "gpu": ..., "driver": ..., "torch": ...,
                     "triton": ..., "cuda": ..., "command": ...},
     "entries": [{"dtype": "bfloat16", "prototype_dtype": "bfloat16", "precision": "auto",
                  "batch": 256, "n": 256, "m": 128, "d": 512,
                  "strategy": "gemm",
                  "forward": {"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
                  "backward": null, "coef_x": null, "measured": {...}}]}

An entry covers calls with its dtypes and precision (ignored for half inputs with prototypes of the
same dtype, whose products are exact whatever it says) whose N, M and D round up to its ``n``,
``m``, ``d`` (powers of two, the buckets of ``fused.tile_config``); among those, the entry whose batch
bucket is nearest (in powers of two) wins. ``forward``/``backward`` are the fused kernels'
tiles, ``coef_x`` the backward's split-K GEMM; null keeps the built-in choice.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...contract import DTYPE_NAMES, HALF_DTYPES
from ..specs import TRITON_STRATEGIES as STRATEGIES
from .launch import next_pow2

SCHEMA = 1
TUNED_CONFIG_DIR = Path(__file__).resolve().parent / "tuned_configs"
ENV_VAR = "GSP_TRITON_TUNED_CONFIG"
TILE_KEYS = ("BLOCK_N", "BLOCK_M", "BLOCK_D", "num_warps", "num_stages")
GEMM_KEYS = ("BLOCK_K", "BLOCK_M", "BLOCK_D", "num_warps", "num_stages", "programs_wanted")
KERNEL_KEYS = {"forward": TILE_KEYS, "backward": TILE_KEYS, "coef_x": GEMM_KEYS}
BUCKET_KEYS = ("batch", "n", "m", "d")
# The dtypes a tuned entry may name (the backend computes float64 by the reference).
TUNED_DTYPE_NAMES = {dtype: DTYPE_NAMES[dtype] for dtype in (torch.float32, *HALF_DTYPES)}
_HALF_NAMES = tuple(DTYPE_NAMES[dtype] for dtype in HALF_DTYPES)


def bucket(size: int) -> int:
    """The power of two at or above ``size`` (>= 1): the shape buckets of entries."""
    return next_pow2(int(size))


def config_filename(device_name: str, triton_version: str) -> str:
    """'NVIDIA H200', '3.6.0' -> 'NVIDIA_H200__triton-3.6.json' (the Triton major.minor)."""
    safe_name = re.sub(r"[^A-Za-z0-9.-]+", "_", device_name.strip()).strip("_")
    return f"{safe_name}__triton-{triton_minor(triton_version)}.json"


def triton_minor(version: str) -> str:
    """'3.6.0' -> '3.6': register allocation and code generation change between minor versions."""
    return ".".join(version.split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class TunedConfig:
    """One loaded file: where it came from, how it was produced, and its entries."""

    path: Path
    device_name: str
    triton: str
    produced_by: dict
    entries: tuple[dict, ...] = field(default_factory=tuple)

    def lookup(self, dtype: str, prototype_dtype: str, precision: str, batch: int, n: int, m: int, d: int) -> dict | None:
        """The entry covering this call (see the module docstring), or None."""
        native_half = dtype == prototype_dtype and dtype in _HALF_NAMES
        shape = (bucket(n), bucket(m), bucket(d))
        matches = [
            entry for entry in self.entries
            if entry["dtype"] == dtype and entry["prototype_dtype"] == prototype_dtype
            and (native_half or entry["precision"] == precision)
            and (entry["n"], entry["m"], entry["d"]) == shape
        ]
        if not matches:
            return None
        log_batch = math.log2(bucket(batch))
        # Nearest batch bucket; on a tie the larger one (its tiles assume more programs, not fewer).
        return min(matches, key=lambda entry: (abs(math.log2(entry["batch"]) - log_batch), -entry["batch"]))

    def describe(self) -> str:
        """One line: the file, and what produced it."""
        made = self.produced_by
        return (f"{self.path} ({len(self.entries)} entries; produced {made.get('date', '?')} on "
                f"{made.get('gpu', self.device_name)}, driver {made.get('driver', '?')}, torch {made.get('torch', '?')}, "
                f"triton {made.get('triton', self.triton)}, commit {made.get('commit', '?')})")


def _check_entry(entry, where: str) -> dict:
    """A validated copy of one entry; ValueError naming the file and the entry otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "prototype_dtype", "precision", "strategy", *BUCKET_KEYS):
        if key not in entry:
            raise ValueError(f"{where}: entry {entry} lacks {key!r}")
    for key in ("dtype", "prototype_dtype"):
        if entry[key] not in TUNED_DTYPE_NAMES.values():
            raise ValueError(f"{where}: {key} must be one of {tuple(TUNED_DTYPE_NAMES.values())}, got {entry[key]!r}")
    if entry["strategy"] not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {entry['strategy']!r}")
    for key in BUCKET_KEYS:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{where}: {key} must be a power of two (a shape bucket), got {value!r}")
    checked = dict(entry)
    for kernel, keys in KERNEL_KEYS.items():
        tiles = entry.get(kernel)
        if tiles is None:
            checked[kernel] = None
            continue
        if not isinstance(tiles, dict) or set(tiles) != set(keys):
            raise ValueError(f"{where}: {kernel} must be null or an object with exactly {keys}, got {tiles!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tiles.values()):
            raise ValueError(f"{where}: {kernel} values must be positive ints, got {tiles!r}")
        checked[kernel] = dict(tiles)
    return checked


def load(path: str | os.PathLike) -> TunedConfig:
    """Read and validate a tuned-configuration file (ValueError naming the file if malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"tuned configuration {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"tuned configuration {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"tuned configuration {str(path)!r}: expected an object with schema {SCHEMA}")
    for key in ("device_name", "triton", "entries"):
        if key not in data:
            raise ValueError(f"tuned configuration {str(path)!r} lacks {key!r}")
    if not isinstance(data["entries"], list):
        raise ValueError(f"tuned configuration {str(path)!r}: entries must be a list")
    entries = tuple(_check_entry(entry, f"tuned configuration {str(path)!r}") for entry in data["entries"])
    return TunedConfig(path, str(data["device_name"]), str(data["triton"]), dict(data.get("produced_by") or {}), entries)


def _device_key(device: torch.device) -> tuple[str, str] | None:
    """(GPU name, Triton version) of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    import triton

    return torch.cuda.get_device_name(device), triton.__version__


def expected_path(device: torch.device) -> Path | None:
    """Where the shipped file for this device and the installed Triton would be (None off CUDA)."""
    key = _device_key(device)
    return None if key is None else TUNED_CONFIG_DIR / config_filename(*key)


@functools.lru_cache(maxsize=16)
def _active_for(device: torch.device) -> TunedConfig | None:
    forced = os.environ.get(ENV_VAR)
    if forced:
        return None if forced.lower() == "none" else load(forced)
    path = expected_path(device)
    return load(path) if path is not None and path.is_file() else None


def active(device: torch.device | str) -> TunedConfig | None:
    """The tuned configuration in force on ``device`` (loaded once per device), or None."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _active_for(device)


def clear_cache() -> None:
    """Forget loaded files (after changing ``GSP_TRITON_TUNED_CONFIG`` or the files)."""
    _active_for.cache_clear()
    lookup.cache_clear()


@functools.lru_cache(maxsize=1024)
def lookup(device: torch.device, dtype: torch.dtype, prototype_dtype: torch.dtype, precision: str,
           batch: int, n: int, m: int, d: int) -> dict | None:
    """The tuned entry for one call of the Triton backend, or None (built-in rules). Cached: the
    per-call cost is one dictionary hit."""
    config = active(device)
    if config is None or dtype not in TUNED_DTYPE_NAMES or prototype_dtype not in TUNED_DTYPE_NAMES:
        return None
    return config.lookup(TUNED_DTYPE_NAMES[dtype], TUNED_DTYPE_NAMES[prototype_dtype], precision, batch, n, m, d)


def describe(device: torch.device | str) -> str:
    """For ``gsp-kernels info``: the file in force on ``device``, or why there is none."""
    device = torch.device(device)
    forced = os.environ.get(ENV_VAR)
    try:
        config = active(device)
    except (OSError, ValueError) as exc:
        return f"error: {exc}"
    if config is not None:
        return config.describe() + (f" (forced by {ENV_VAR})" if forced else "")
    if forced:
        return f"none ({ENV_VAR}={forced})"
    path = expected_path(device)
    if path is None:
        return f"none (tuned configurations are per GPU; {device} is not a CUDA device)"
    shipped = sorted(p.name for p in TUNED_CONFIG_DIR.glob("*.json"))
    return (f"none for this GPU and Triton (looked for {path}; built-in rules apply); shipped: "
            + (", ".join(shipped) if shipped else "none"))


def write(path: str | os.PathLike, device_name: str, triton_version: str, produced_by: dict, entries: list[dict]) -> TunedConfig:
    """Write a tuned-configuration file, replacing the entries of an existing one that have the
    same key (dtypes, precision, buckets) and keeping its others; returns what was written.
    ``path``: the file, or a folder (existing, or named with a trailing separator) that gets the
    standard name (``config_filename``)."""
    folder = os.fspath(path).endswith(("/", os.sep))
    path = Path(path)
    if folder or path.is_dir():
        path = path / config_filename(device_name, triton_version)
    merged: dict[tuple, dict] = {}
    if path.is_file():
        previous = load(path)
        if (previous.device_name, triton_minor(previous.triton)) != (device_name, triton_minor(triton_version)):
            raise ValueError(f"{path} holds entries for {previous.device_name} / Triton {previous.triton}, "
                             f"not {device_name} / Triton {triton_version}: write to another file")
        merged = {_entry_key(entry): entry for entry in previous.entries}
    where = f"new entries for {path}"
    for entry in entries:
        checked = _check_entry(entry, where)
        merged[_entry_key(checked)] = checked
    payload = {
        "schema": SCHEMA, "device_name": device_name, "triton": triton_minor(triton_version),
        "produced_by": produced_by, "entries": sorted(merged.values(), key=_entry_key),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return load(path)


def _entry_key(entry: dict) -> tuple:
    return (entry["dtype"], entry["prototype_dtype"], entry["precision"], *(entry[key] for key in BUCKET_KEYS))
