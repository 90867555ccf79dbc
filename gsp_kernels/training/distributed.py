"""Where a run computes: the process group of torchrun's ranks (started and torn down),
this rank's device (and the check that it, and the GSP backend asked for, are here), and what
the ranks exchange (every rank's objects gathered, rank 0's decision broadcast).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..backends import backend_status
from .config import RunError, TrainConfig


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initializes the process group from torchrun's env vars
    (WORLD_SIZE > 1): nccl with CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def shutdown_distributed() -> None:
    """Tear down the process group ``init_distributed`` started, after every rank is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(config: TrainConfig, local_rank: int = 0) -> torch.device:
    """``config.device``, or this rank's GPU when there is one, else the CPU."""
    if config.device != "auto":
        try:
            return torch.device(config.device)
        except RuntimeError as exc:
            raise RunError(f"--device {config.device!r} is no device torch knows: use auto, cpu, cuda or cuda:N") from exc
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def check_device(config: TrainConfig, device: torch.device) -> None:
    """RunError when ``device`` is not on this machine, or ``config.backend`` does not run on it."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RunError(f"--device {config.device}: no CUDA device here (torch.cuda.is_available() is False): use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise RunError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if config.backend != "auto":
        status = backend_status(device)[config.backend]
        if not status.available:
            raise RunError(f"--backend {config.backend} does not run on {device}: {status.reason}; use --backend auto (the "
                           f"fastest that runs there) or another --device")


def gather_objects(value, world_size: int) -> list:
    """Every rank's ``value`` (rank order); ``[value]`` in a single process."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_float(value: float | None, device: torch.device, world_size: int) -> float:
    """Rank 0's ``value`` on every rank (DDP ranks must take the same early-stopping decision)."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value if value is not None else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor)
