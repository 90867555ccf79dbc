"""What makes a run repeatable and resumable: the seeds and states of the random-number
generators, and the checkpoint file ``fit`` writes after every epoch (saved atomically,
loaded, checked against the settings of the run that resumes it, and the weights it stands
for).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"

# Settings a run may change when it resumes: where and how fast it runs, and how long (not
# under the cosine schedule, which spans the epochs the run started with).
RESUMABLE_CHANGES = ("epochs", "resume", "progress", "output_dir", "device", "num_workers", "eval_batch_size", "compile", "backend")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states: torch (and CUDA once initialized), NumPy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states from ``rng_state``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write keeps the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by ``fit`` (our own file: RNG states need ``weights_only=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location=device, weights_only=False)


def model_state(checkpoint: dict) -> dict:
    """The model weights a checkpoint stands for: the early-stopping best when it kept one,
    else the last epoch's."""
    best = checkpoint.get("early_stopping") or {}
    if best.get("model") is not None:
        return best["model"]
    prefix = "model."
    return {key[len(prefix):]: value for key, value in checkpoint["objective"].items() if key.startswith(prefix)}


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """ValueError naming the settings a checkpoint was trained with that ``config`` changes
    (beyond ``RESUMABLE_CHANGES``): resuming them would not continue the same run."""
    current = dataclasses.asdict(config)
    changed = [name for name, value in saved.items() if name in current and name not in RESUMABLE_CHANGES and current[name] != value]
    if config.scheduler == "cosine" and saved.get("epochs") != config.epochs:
        changed.append("epochs")  # the saved cosine schedule ends at the saved epochs: more would raise the lr again
    if changed:
        details = ", ".join(f"{name} {saved[name]!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"cannot resume {path} with other settings: {details} (use another output_dir, or the saved settings; "
                         f"the number of epochs can change under the plateau and constant schedules only)")
