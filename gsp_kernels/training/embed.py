"""Embeddings of a trained model written to a file (``gsp-kernels embed``): a benchmark split
(``benchmark_split``) or a folder of images (``image_folder``), embedded in batches
(``embed_images``) and written as ``.npz`` or ``.safetensors`` (``write_embeddings``).

A file holds ``embeddings`` ``[n, E]`` float32 (the model's output, not normalized; an mlrc
ensemble's is its normalized concatenation), ``labels`` ``[n]`` int64 (the split's 0-based
class labels, −1 for a folder's unlabelled images) and ``paths`` ``[n]`` (each image's path
relative to the data root or the folder; for the embedded collage data, its index in the
split). In ``.safetensors`` the paths and labels are also the metadata (JSON lists).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .config import RunError, TrainConfig, eval_resize
from .datasets.collage import CollageDataset
from .datasets.images import ImageListDataset
from .embeddings import to_device
from .files import atomic_path
from .models import input_size
from .transforms import test_transform

EMBEDDING_FORMATS = (".npz", ".safetensors")
SPLITS = ("test", "train", "query", "gallery")
UNLABELLED = -1


def model_transform(config: TrainConfig):
    """The test-time transform the model was evaluated with (shorter side, centre crop, ImageNet
    normalization), at the size of its training images."""
    size = input_size(config)
    return test_transform(eval_resize(config) if config.dataset != "collage" else size, size)


def benchmark_split(config: TrainConfig, split: str, transform) -> tuple[object, list[str]]:
    """(dataset, paths relative to the data root) of ``split`` of ``config.dataset`` at
    ``config.data_root``, every split with ``transform`` (the model's ``model_transform``). "test"
    is the test split of a benchmark without a gallery; In-Shop's is "query" or "gallery"."""
    from .datasets import load_benchmark

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.dataset == "collage":
        if split in ("query", "gallery"):
            raise RunError(f"--split {split}: the collage data has a train and a test split, no {split} set")
        dataset = CollageDataset(split, config.collages_per_digit if split == "train" else 1, seed=config.data_seed)
        return dataset, [str(index) for index in range(len(dataset))]
    data = load_benchmark(config.dataset, config.data_root, train_transform=transform, test_transform=transform,
                          num_train_classes=config.num_train_classes)
    if data.gallery is None and split == "gallery":
        raise RunError(f"--split gallery: {config.dataset} has no gallery (its test split is searched all against all): pass --split test")
    if data.gallery is not None and split == "test":
        raise RunError(f"--split test: {config.dataset}'s test split is a query set and a gallery: pass --split query or --split gallery")
    dataset = {"train": data.train, "test": data.query, "query": data.query, "gallery": data.gallery}[split]
    root = Path(config.data_root).expanduser().resolve()
    return dataset, [os.path.relpath(path, root) for path in dataset.paths]


def image_folder(folder: str | Path, transform) -> tuple[ImageListDataset, list[str]]:
    """(dataset, paths relative to ``folder``) of every image file under ``folder`` (recursively,
    in sorted order; the extensions PIL reads), unlabelled, with ``transform``."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r} is not a folder")
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in extensions)
    if not files:
        raise RunError(f"--images {folder}: no image files in it (looked for {', '.join(sorted(extensions)[:8])}, ...)")
    dataset = ImageListDataset(files, [UNLABELLED] * len(files), transform, source=str(folder))
    dataset.labels = torch.full((len(files),), UNLABELLED, dtype=torch.long)  # unlabelled, not class 0 of one
    return dataset, [str(path.relative_to(folder)) for path in files]


@torch.no_grad()
def embed_images(model: nn.Module, dataset, device: torch.device, *, batch_size: int = 256, amp: bool = False,
                 channels_last: bool = False, num_workers: int = 0, progress: bool = True) -> Tensor:
    """``model(images).embedding`` of every item of ``dataset`` in order: ``[n, E]`` float32 on
    the CPU; batches of ``batch_size``, bf16 autocast with ``amp``, a tqdm bar with ``progress``."""
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for images, _ in tqdm(loader, desc="embed", disable=not progress, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(model(to_device(images, device, channels_last)).embedding.float().cpu())
    return torch.cat(chunks)


def check_output(path: str | Path) -> Path:
    """The output file's path, its suffix one of ``EMBEDDING_FORMATS`` (RunError otherwise)."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in EMBEDDING_FORMATS:
        raise RunError(f"--output {path}: end the name in {' or '.join(EMBEDDING_FORMATS)} (the file's format)")
    return path


def write_embeddings(path: str | Path, embeddings: Tensor, labels: Tensor, paths: list[str]) -> None:
    """``embeddings`` ``[n, E]``, ``labels`` ``[n]`` and ``paths`` ``[n]`` to ``path`` (.npz or
    .safetensors, by its suffix), atomically."""
    path = check_output(path)
    if not len(paths) == len(labels) == embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings, {len(labels)} labels and {len(paths)} paths")
    embeddings = embeddings.detach().float().cpu().contiguous()
    labels = labels.detach().long().cpu().contiguous()
    with atomic_path(path) as partial:
        if path.suffix.lower() == ".npz":
            with open(partial, "wb") as file:  # a file object: np.savez adds no suffix to it
                np.savez(file, embeddings=embeddings.numpy(), labels=labels.numpy(), paths=np.array(paths, dtype=str))
        else:
            from safetensors.torch import save_file

            metadata = {"paths": json.dumps(paths), "labels": json.dumps(labels.tolist())}
            save_file({"embeddings": embeddings, "labels": labels}, str(partial), metadata=metadata)
