"""Pretrained backbone weights from local files: nothing is ever downloaded.

- ``load_backbone_weights(module, path)``: a torchvision or timm state dict (``.pth``/``.pt``/
  ``.bin`` through ``torch.load(weights_only=True)``, or ``.safetensors``), unwrapped from
  ``{"state_dict": ...}``/``{"model": ...}`` and DDP/compile prefixes by timm's
  ``load_state_dict``, and from this library's ``trunk.``/``model.`` wrapper prefixes (the
  backbone of a ``gsp-kernels train`` checkpoint, an ``EmbeddingModel`` or a ``GSPNet``),
  converted by the timm model's own ``checkpoint_filter_fn`` when it has one (position-embedding
  resampling for another image size, DINOv2/CLIP key names). Missing and unexpected keys are
  reported (returned, and warned about); a checkpoint that matches no tensor of the module, or
  whose shapes differ, is refused.
- ``cached_weights_path(arch)``: the file of an arch's pretrained weights in the local caches,
  the Hugging Face hub cache (timm's ``hf_hub_id``) and torch.hub's ``checkpoints`` directory
  (torchvision, and timm's older URLs), or ``FileNotFoundError`` naming every place looked at.
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .arch import resolve_arch
from .backbones import TimmBackbone, TorchvisionViTBackbone

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the names timm's hub loader tries
_SHOWN_KEYS = 8
_WRAPPER_PREFIXES = ("model.trunk.model.", "model.trunk.", "trunk.model.", "trunk.", "model.")  # longest first
_TRAIN_CHECKPOINT_KEY = "objective"  # where a ``gsp-kernels train`` checkpoint keeps the model's tensors


class LoadReport(NamedTuple):
    """What ``load_backbone_weights`` did: ``path``, the number of ``loaded`` tensors, the module's
    ``missing`` keys (left as initialized) and the checkpoint's ``unexpected`` keys (ignored)."""

    path: str
    loaded: int
    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.path}"
        if self.missing:
            text += f"; {len(self.missing)} missing (left as initialized): {_shorten(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected (ignored): {_shorten(self.unexpected)}"
        return text


def _shorten(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def _numpy_array_globals() -> list:
    """What ``torch.load(weights_only=True)`` needs to rebuild plain numpy arrays (nothing that runs code)."""
    try:
        import numpy
    except ImportError:
        return []
    core = getattr(numpy, "_core", None) or numpy.core
    return [numpy.ndarray, numpy.dtype, core.multiarray._reconstruct, *(type(numpy.dtype(code)) for code in "?bBhHiIlLqQefdgFDG")]


def load_failure_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused or failed to read a file, in one line: the
    global a pickle would call (nothing of it runs), or the error of a file in another format
    or damaged."""
    text = str(exc)
    if "weights_only=True blocked loading" in text and isinstance(exc.__cause__, BaseException):
        return load_failure_reason(exc.__cause__)  # timm's rewording of torch's error: read torch's
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        code = next((line for line in lines if "GLOBAL" in line), None)
        if code is not None:
            code = re.split(r" was not an allowed global| Please use", code.split("WeightsUnpickler error:", 1)[-1].strip())[0]
            return (f"unpickling it would call code ({code.rstrip('.')}), and files are loaded with torch.load(weights_only=True), "
                    "which runs none: only tensors and plain values")
        marked = next((index for index, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
        detail = lines[marked].split("WeightsUnpickler error:", 1)[1].strip() if marked is not None else ""
        if not detail and marked is not None and marked + 1 < len(lines):
            detail = lines[marked + 1]
        return f"another format, or a damaged file (not a pickle torch.save wrote: {detail or 'unreadable'})"
    if "Unsupported globals:" in text:
        detail = text.split("Unsupported globals:", 1)[1].split(". ", 1)[0].strip()
        return (f"unpickling it would call code (unsupported globals: {detail}), and files are loaded with "
                "torch.load(weights_only=True), which runs none: only tensors and plain values")
    first = lines[0] if lines else ""
    return f"another format, or a damaged file ({type(exc).__name__}{f': {first}' if first else ''})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (``.safetensors``, or a ``torch.save`` file loaded with
    ``weights_only=True``), unwrapped and cleaned by ``timm.models.load_state_dict``; of a
    ``gsp-kernels train`` checkpoint, its ``objective`` (model and loss) tensors."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # a train checkpoint's RNG states
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as a state dict (.pth/.pt/.bin saved by torch.save, or .safetensors): "
                         f"{load_failure_reason(exc)}") from exc
    if isinstance(state.get(_TRAIN_CHECKPOINT_KEY), dict):  # a gsp-kernels train checkpoint
        state = state[_TRAIN_CHECKPOINT_KEY]
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{str(path)!r} holds no tensors (keys: {_shorten(list(state))})")
    return tensors


def _timm_filter(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint after the timm model's ``checkpoint_filter_fn``, when its module has one."""
    if not type(module).__module__.startswith("timm."):
        return state
    filter_fn = getattr(sys.modules[type(module).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), module)
    except (AttributeError, KeyError, RuntimeError, ValueError, TypeError, IndexError, AssertionError):  # another layout: compared as is
        return state


def _unwrapped(state: dict[str, torch.Tensor], own: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` without the key prefix of this library's wrappers (the training objective's
    ``model.``, ``EmbeddingModel``/``GSPNet``'s ``trunk.``, ``TimmBackbone``'s ``model.``) when
    its keys match only that way, and the keys left out (the wrapper's other parts, e.g. its
    pooling head); else ``state`` as it is, with no key left out."""
    if any(key in own for key in state):
        return state, []
    for prefix in _WRAPPER_PREFIXES:
        inner = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if any(key in own for key in inner):
            return inner, [key for key in state if not key.startswith(prefix)]
    return state, []


def load_backbone_weights(module: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint into ``module``, non-strictly: a timm or torchvision model, or a
    backbone of ``gsp_kernels.nn.backbones`` (the checkpoint's keys are those of the model it wraps,
    or carry this library's wrapper prefixes: a ``gsp-kernels train`` checkpoint, an
    ``EmbeddingModel`` or ``GSPNet`` state dict, whose other parts are then unexpected keys).

    Returns a ``LoadReport``, and warns when keys are missing or unexpected (a removed
    classifier's keys are unexpected). Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` when no key matches (a checkpoint for another architecture) or shapes differ.
    """
    if isinstance(module, (TimmBackbone, TorchvisionViTBackbone)):
        module = module.model
    own = module.state_dict()
    state, outside = _unwrapped(read_state_dict(path), own)
    state = _timm_filter(module, state)
    mismatched = [key for key in state if key in own and state[key].shape != own[key].shape]
    if mismatched:
        details = "; ".join(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}" for key in mismatched[:_SHOWN_KEYS])
        raise ValueError(f"{str(path)!r} does not fit {type(module).__name__}: {len(mismatched)} shapes differ ({details})")
    matched = {key: value for key, value in state.items() if key in own}
    if not matched:
        raise ValueError(
            f"{str(path)!r} matches none of the {len(own)} tensors of {type(module).__name__}: a checkpoint for another "
            f"architecture? checkpoint keys: {_shorten(list(state))}; model keys: {_shorten(list(own))}"
        )
    result = module.load_state_dict(matched, strict=False)
    report = LoadReport(str(path), len(matched), list(result.missing_keys), outside + [key for key in state if key not in own])
    if report.missing or report.unexpected:
        warnings.warn(str(report), stacklevel=2)
    return report


def _torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub (and so torchvision) keeps the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?")[0]).name


def _timm_cached_file(name: str, looked_at: list[str]) -> Path | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained weights for {name!r} (timm.list_pretrained('{name.split('.')[0]}*') lists them)")
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")  # timm's "repo@revision" spelling
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else _HF_WEIGHT_FILES:
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached)
            looked_at.append(f"{constants.HF_HUB_CACHE}/models--{repo_id.replace('/', '--')}/snapshots/*/{filename}")
    if cfg.url and not cfg.url.endswith(".npz"):  # .npz files need timm's custom loader
        candidate = _torch_hub_checkpoint(cfg.url)
        if candidate.is_file():
            return candidate
        looked_at.append(str(candidate))
    return None


def cached_weights_path(arch: str) -> Path:
    """The locally cached pretrained weights of ``arch`` (a timm name, with its pretrained tag
    or timm's default one, or a torchvision name, with its DEFAULT weights). Never downloads:
    raises ``FileNotFoundError`` naming the paths looked at."""
    library, name = resolve_arch(arch)
    looked_at: list[str] = []
    if library == "timm":
        found = _timm_cached_file(name, looked_at)
    elif library == "torchvision":
        import torchvision

        candidate = _torch_hub_checkpoint(torchvision.models.get_model_weights(name).DEFAULT.url)
        found = candidate if candidate.is_file() else None
        looked_at.append(str(candidate))
    else:
        raise ValueError("smallcnn has no pretrained weights")
    if found is None:
        raise FileNotFoundError(
            f"no cached weights for {arch!r}; looked at: {', '.join(looked_at) or 'nothing (no source in its pretrained config)'}. "
            "Nothing is downloaded at run time: fetch them on a machine with network (timm.create_model(name, pretrained=True) "
            "fills the Hugging Face cache, HF_HOME/HF_HUB_CACHE; torchvision fills TORCH_HOME/hub/checkpoints) or pass a file path"
        )
    return found
