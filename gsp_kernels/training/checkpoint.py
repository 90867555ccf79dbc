"""What makes a run repeatable and resumable: the seeds and states of the random-number
generators, the checkpoint file ``fit`` writes after every epoch (saved atomically; loaded
without running code from it, ``torch.load(weights_only=True)``, and checked to be one),
checked against the settings of the run that resumes it, and the weights it stands for; and
the output folder of a run, checked before any data is read (``prepare_output_dir``).

A checkpoint holds tensors and plain values only (the NumPy and Python RNG states as tensors,
ints and tuples), so that it loads so; files written before that kept NumPy arrays, which
load with exactly the NumPy globals a plain array needs (``nn.pretrained``'s).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..nn.pretrained import _numpy_array_globals, load_failure_reason
from .config import RunError, TrainConfig
from .files import atomic_path, check_writable

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # beside a checkpoint: the weights of the best validation epoch
BEST_KIND = "best"
BEST_KEYS = ("model", "epoch", "val_map_at_r", "config")
MODEL_CHOICES = ("best", "last")  # which weights of a run a loader takes
# What fit writes; a file without these keys is not one of its checkpoints.
CHECKPOINT_KEYS = ("objective", "optimizer", "scheduler", "history", "epoch", "stopped", "early_stopping", "rng", "config")
_CONFIG_KEYS = ("dataset", "pooling", "arch", "embedding_dim", "epochs")  # settings every version of fit has saved
_FOLD_FOLDER = re.compile(r"fold([1-9][0-9]*)")

# Settings a run may change when it resumes: where and how fast it runs, what it logs, and how
# long (not under the cosine schedule, which spans the epochs the run started with).
RESUMABLE_CHANGES = ("epochs", "resume", "overwrite", "progress", "output_dir", "device", "num_workers", "eval_batch_size",
                     "compile", "backend", "log")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values: torch (and CUDA once
    initialized), NumPy's legacy global generator ({"bit_generator", "keys" (int64 tensor),
    "pos", "has_gauss", "cached_gaussian"}), Python's ``random.getstate()`` (a tuple of ints)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states from ``rng_state`` (or from a checkpoint of earlier versions, whose
    NumPy state is ``np.random.get_state()``'s tuple)."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].cpu().numpy().astype(np.uint32)
        numpy_state = (numpy_state["bit_generator"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([value.cpu() for value in state["cuda"]])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a crash or a full disk mid-write keeps the
    previous file and leaves no partial one. A write that fails is a ``RunError`` naming the
    folder."""
    path = Path(path)
    try:
        with atomic_path(path) as partial:
            torch.save(state, partial)
    except (OSError, RuntimeError) as exc:  # torch.save's "[enforce fail at inline_container.cc] unexpected pos" is a RuntimeError
        kept = f"the previous checkpoint {path} is intact" if path.is_file() else "no checkpoint was written"
        raise RunError(f"cannot write the checkpoint to {path.parent} ({_one_line(exc)}): is the disk full? {kept}; "
                       f"free space there, or pass another --output-dir (--resume continues from the last checkpoint)") from exc


def _load_safely(path: Path, device, mmap: bool, what: str):
    """``torch.load(weights_only=True)`` of ``path`` (no code from the file runs; the NumPy
    globals of a plain array allowed for older checkpoints): ``FileNotFoundError`` for no file,
    ``RunError`` for a file that cannot be loaded so."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # torch.load's errors have no common type: unpickling, zip, EOF, legacy-format KeyError
        raise RunError(f"refused to load {path} as a {what}: {load_failure_reason(exc)}") from exc


def _missing_keys(state, keys: tuple[str, ...]) -> list[str]:
    """The keys of ``keys`` (and of ``_CONFIG_KEYS`` in its "config") that ``state`` lacks."""
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if not missing:
        config = state["config"]
        missing = [f"config[{key!r}]" for key in _CONFIG_KEYS if key not in config] if isinstance(config, dict) else ["a config dict"]
    return missing


def _held(state) -> str:
    if not isinstance(state, dict):
        return type(state).__name__
    return f"keys {', '.join(map(str, list(state)[:6]))}{', ...' if len(state) > 6 else ''}"


def load_checkpoint(path, device: torch.device | str = "cpu", *, mmap: bool = False) -> dict:
    """A checkpoint written by ``fit``, loaded with ``torch.load(weights_only=True)`` (no code
    from the file runs; a file written before the RNG states were stored as tensors needs,
    and gets, the NumPy globals of a plain array). ``mmap``: map the tensors instead of
    reading them. ``FileNotFoundError`` for no file; ``RunError`` for a file that cannot be
    loaded so, or is not such a checkpoint."""
    path = Path(path)
    state = _load_safely(path, device, mmap, "checkpoint")
    missing = _missing_keys(state, CHECKPOINT_KEYS)
    if missing:
        raise RunError(f"{path} is not a checkpoint written by gsp-kernels train: it lacks {', '.join(missing)} "
                       f"(it holds {_held(state)}); backbone weights go to --pretrained")
    return state


def save_best(path: Path, model: dict, epoch: int, score: float, config: TrainConfig) -> None:
    """``best.pt``: the weights of the epoch with the best validation MAP@R so far (atomically)."""
    save_checkpoint(path, {"kind": BEST_KIND, "model": model, "epoch": epoch, "val_map_at_r": score,
                           "config": dataclasses.asdict(config)})


def load_trained_weights(path, which: str = "best", device: torch.device | str = "cpu") -> dict:
    """The trained weights a file or a run folder stands for, loaded safely: {"path" (the file
    read), "config" (the settings dict), "epoch" (0-based), "model" (state dict), "which"
    ("best": the epoch of the best validation MAP@R; "last": the last epoch trained)}.

    A folder: ``which="best"`` reads its best.pt when the run kept one (``--validation-classes``,
    mlrc folds), else the checkpoint (its early-stopping best, or its last epoch);
    ``which="last"`` reads the checkpoint's last epoch. A checkpoint file: as its folder would,
    without best.pt. A best.pt file: its weights (``which="last"`` then is a RunError).
    ``FileNotFoundError`` for nothing there, ``RunError`` for a file that is neither."""
    if which not in MODEL_CHOICES:
        raise ValueError(f"which must be one of {MODEL_CHOICES}, got {which!r}")
    path = Path(path)
    if path.is_dir():
        best = path / BEST_NAME
        path = best if which == "best" and best.is_file() else path / CHECKPOINT_NAME
    state = _load_safely(path, device, False, "checkpoint")
    if isinstance(state, dict) and state.get("kind") == BEST_KIND:
        missing = _missing_keys(state, BEST_KEYS)
        if missing:
            raise RunError(f"{path} is not a best-validation file written by gsp-kernels train: it lacks {', '.join(missing)}")
        if which == "last":
            raise RunError(f"{path} holds the best validation epoch's weights; the last epoch's are in "
                           f"{path.with_name(CHECKPOINT_NAME)} (pass that file, or the run folder)")
        return {"path": path, "config": state["config"], "epoch": state["epoch"], "model": state["model"], "which": "best"}
    missing = _missing_keys(state, CHECKPOINT_KEYS)
    if missing:
        raise RunError(f"{path} is not a checkpoint written by gsp-kernels train: it lacks {', '.join(missing)} "
                       f"(it holds {_held(state)}); backbone weights go to --pretrained")
    best = (state.get("early_stopping") or {}) if which == "best" else {}
    if best.get("model") is not None:
        return {"path": path, "config": state["config"], "epoch": best["epoch"], "model": best["model"], "which": "best"}
    return {"path": path, "config": state["config"], "epoch": state["epoch"], "model": last_epoch_state(state), "which": "last"}


def last_epoch_state(checkpoint: dict) -> dict:
    """The model weights of a checkpoint's last epoch."""
    prefix = "model."
    return {key[len(prefix):]: value for key, value in checkpoint["objective"].items() if key.startswith(prefix)}


def _flag(name: str, value) -> str:
    """The command-line spelling of a setting: ``--lr 0.001``, ``--freeze-bn``/``--no-freeze-bn``, ``--resize none``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {'none' if value is None else value}"


def _same_setting(name: str, saved, current) -> bool:
    if name == "data_root" and saved is not None and current is not None:  # where the data is, however it was spelt
        return Path(saved).expanduser().resolve() == Path(current).expanduser().resolve()
    return saved == current


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """RunError naming the settings a checkpoint was trained with that ``config`` changes
    (beyond ``RESUMABLE_CHANGES``; a setting the checkpoint predates counts as its default):
    resuming them would not continue the same run."""
    current, defaults = dataclasses.asdict(config), dataclasses.asdict(TrainConfig())
    before = {name: saved.get(name, defaults[name]) for name in current}
    changed = [name for name in current if name not in RESUMABLE_CHANGES and not _same_setting(name, before[name], current[name])]
    if config.scheduler == "cosine" and before["epochs"] != config.epochs:
        changed.append("epochs")  # the saved cosine schedule ends at the saved epochs: more would raise the lr again
    if changed:
        details = ", ".join(f"{name} {before[name]!r} -> {current[name]!r}" for name in changed)
        raise RunError(f"cannot resume {path} with other settings: {details} (give the saved ones, "
                       f"{' '.join(_flag(name, before[name]) for name in changed)}, or pass --overwrite to train anew, or another "
                       f"--output-dir; the number of epochs can change under the plateau and constant schedules only)")


def fold_checkpoint(output_dir: str | Path, fold: int) -> Path:
    """Where fold ``fold`` (1-based) of an mlrc run checkpoints."""
    return Path(output_dir) / f"fold{fold}" / CHECKPOINT_NAME


def fold_config(config: TrainConfig, fold: int) -> TrainConfig:
    """The settings fold ``fold`` (1-based) of an mlrc run trains with: seed ``seed + fold - 1``."""
    return dataclasses.replace(config, seed=config.seed + fold - 1)


def planned_checkpoints(config: TrainConfig) -> dict[Path, TrainConfig]:
    """The checkpoint files a run writes in ``config.output_dir``, with the settings of the
    model each holds: ``checkpoint.pt``, or an mlrc run's ``fold<k>/checkpoint.pt``."""
    if config.protocol == "mlrc":
        return {fold_checkpoint(config.output_dir, fold): fold_config(config, fold) for fold in range(1, config.num_folds + 1)}
    return {Path(config.output_dir) / CHECKPOINT_NAME: config}


def run_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint files of the run in ``folder``: its checkpoint.pt, then an mlrc run's
    fold<k>/checkpoint.pt in fold order (other folders, a stray ``fold_old/``, are not the run's)."""
    folder = Path(folder)
    files = [folder / CHECKPOINT_NAME] if (folder / CHECKPOINT_NAME).is_file() else []
    folds = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _FOLD_FOLDER.fullmatch(child.name)
            if match and (child / CHECKPOINT_NAME).is_file():
                folds.append((int(match[1]), child / CHECKPOINT_NAME))
    return files + [path for _, path in sorted(folds)]


def prepare_output_dir(config: TrainConfig) -> None:
    """Check ``config.output_dir`` before any data is read (``RunError`` saying what to change):
    it can be written (created, a probe file written and removed); if it holds a run's
    checkpoints, the run either resumes them (``resume``: every one loads and was trained with
    these settings) or replaces them (``overwrite``), else it is refused: one forgotten
    ``--resume`` must not overwrite a run."""
    if not config.output_dir:
        return
    folder = Path(config.output_dir)
    try:
        check_writable(folder)
    except OSError as exc:
        raise RunError(f"cannot write to the output folder {folder} ({_one_line(exc)}): pass a folder you can write to "
                       f"as --output-dir") from exc
    found = run_checkpoints(folder)
    if not found or config.overwrite:
        return
    if not config.resume:
        raise RunError(f"{folder} holds a run's checkpoint ({found[0].relative_to(folder)}): pass --resume to continue it, "
                       f"--overwrite to train anew and replace it, or another --output-dir")
    planned = planned_checkpoints(config)
    for path in found:
        if path not in planned:
            expected = ", ".join(str(planned_path.relative_to(folder)) for planned_path in planned)
            raise RunError(f"cannot resume {path}: a {config.protocol} run with these settings continues {expected}, not it "
                           f"(pass the saved --protocol/--num-folds, or --overwrite to train anew, or another --output-dir)")
        try:
            saved = load_checkpoint(path, mmap=True)["config"]
        except RunError as exc:
            raise RunError(f"cannot resume: {exc}; pass --overwrite to train anew, or another --output-dir") from exc
        check_resumable(saved, planned[path], path)


def discard_run_checkpoints(folder: str | Path) -> None:
    """Remove the checkpoints of the run in ``folder`` and their best.pt files (``overwrite``: a
    fold left from the replaced run must not be resumed, nor its best weights loaded, as part
    of the new one)."""
    for path in run_checkpoints(folder):
        path.unlink(missing_ok=True)
        path.with_name(BEST_NAME).unlink(missing_ok=True)
