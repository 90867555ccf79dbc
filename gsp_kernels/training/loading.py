"""Trained models back from their files: ``load_model(path)`` (``gsp_kernels.load_model``) gives
the embedding model a ``gsp-kernels train`` run saved, in eval mode with its settings at
``model.config``; an mlrc run folder gives its folds as one ``EnsembleEmbeddingModel``, whose
embedding is their concatenation as the protocol evaluates it. Files load with
``torch.load(weights_only=True)`` (``checkpoint.load_trained_weights``): no code from them runs.
``evaluate``, ``embed`` and ``export`` take their models from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..nn import GSPOutput
from .checkpoint import (
    CHECKPOINT_NAME,
    MODEL_CHOICES,
    load_trained_weights,
    run_checkpoints,
)
from .config import RunError, TrainConfig, validate_config
from .embeddings import concatenate_embeddings
from .models import build_model_for, check_image_fits


class EnsembleEmbeddingModel(nn.Module):
    """Several embedding models (an mlrc run's folds) as one: images ``[B, 3, H, W]`` ->
    ``GSPOutput(embedding [B, E_1 + ... + E_k], None, None)``, each model's embedding
    L2-normalized and the concatenation normalized again (``embeddings.concatenate_embeddings``).
    ``config`` is the first model's settings (an mlrc run's own: fold 1 trains with its seed),
    ``configs`` every model's."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.configs = [model.config for model in models]
        self.config = self.configs[0]

    def forward(self, images: Tensor, return_weights: bool = False) -> GSPOutput:
        """Images -> the concatenated embedding (no attributes or weights: each model has its own)."""
        if return_weights:
            raise ValueError("an ensemble has no single map of pooling weights: call one of its .models with return_weights=True")
        return GSPOutput(concatenate_embeddings([model(images).embedding for model in self.models]), None, None)


def config_from_saved(saved: dict, path: str | Path = "the checkpoint", *, need_data: bool = True, **overrides) -> TrainConfig:
    """The TrainConfig a run was trained with (fields the file lacks take their defaults), with
    ``overrides`` (where to find the data, which device) on top. ``pretrained`` is dropped: the
    file holds every weight, and the one it named need not be here. With ``need_data``, a saved
    data root that is no folder here (moved, or relative to another directory) is a RunError
    asking for ``--data-root``."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in known}
    config = TrainConfig(**{**values, **overrides, "resume": False, "overwrite": False, "output_dir": None, "pretrained": None})
    if need_data and "data_root" not in overrides and config.dataset != "collage" and not Path(config.data_root or "").expanduser().is_dir():
        raise RunError(f"{path} was trained on {config.dataset} at data root {config.data_root!r}, which is not a folder here "
                       f"(moved, or relative to the directory it was trained from): pass --data-root")
    validate_config(config)
    return config


def run_parts(paths) -> list[Path]:
    """What each of ``paths`` names, as ``checkpoint.load_trained_weights`` takes it: a file as
    given; a run folder holding checkpoint.pt as itself; an mlrc run folder as its fold<k>/
    folders in fold order (other folders, such as a stray fold_old/, are not the run's)."""
    parts = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if path.is_file():
            parts.append(path)
        elif path.is_dir() and (found := run_checkpoints(path)):
            parts.extend([path] if found[0] == path / CHECKPOINT_NAME else [file.parent for file in found])
        else:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r} (a file, or a folder with {CHECKPOINT_NAME} or fold<k>/{CHECKPOINT_NAME})")
    return parts


def model_from_weights(weights: dict, config: TrainConfig) -> nn.Module:
    """The model ``config`` describes with ``weights``' state dict (``load_trained_weights``), on
    the CPU in eval mode, checked to take the run's images; its ``config``, ``weights_path``,
    ``epoch`` (0-based) and ``which`` ("best" or "last") set. RunError when the weights do not fit."""
    model = build_model_for(config, load_pretrained=False)  # the file has every weight
    try:
        model.load_state_dict(weights["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{weights['path']}: its weights do not fit the model its settings describe ({first})") from exc
    check_image_fits(model, config)
    model.config, model.weights_path, model.epoch, model.which = config, weights["path"], weights["epoch"], weights["which"]
    return model.eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", *, which: str = "best") -> nn.Module:
    """The trained embedding model of a ``gsp-kernels train`` run, in eval mode on ``device``.

    ``path``: a checkpoint.pt or best.pt file, or a run folder; an mlrc run folder gives an
    ``EnsembleEmbeddingModel`` of its folds. ``which``: "best" (the epoch of the best validation
    MAP@R when the run kept one, ``--validation-classes`` or mlrc; else the last) or "last".
    ``model(images [B, 3, H, W])`` returns what training used, a ``GSPOutput`` whose
    ``.embedding`` is ``[B, E]``; ``model.config`` holds the run's ``TrainConfig``. Nothing in the
    files runs (``torch.load(weights_only=True)``); a file that is no such checkpoint, or whose
    weights do not fit its settings, is a ``RunError`` saying so.
    """
    if which not in MODEL_CHOICES:
        raise ValueError(f"which must be one of {MODEL_CHOICES}, got {which!r}")
    models = []
    for part in run_parts(path):
        weights = load_trained_weights(part, which)
        models.append(model_from_weights(weights, config_from_saved(weights["config"], weights["path"], need_data=False)))
    model = models[0] if len(models) == 1 else EnsembleEmbeddingModel(models).eval()
    return model.to(device)
