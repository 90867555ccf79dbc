"""Embeddings of trained models and their retrieval scores on the test split: one model's
(``compute_embeddings``, ``embed_test_splits``, ``retrieval_scores``), and several models'
embeddings concatenated (``concatenate_embeddings``, ``concatenated_metrics``); and how a batch
of images reaches the model's device (``to_device``, also the training loop's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .datasets import BenchmarkData
from .metrics import retrieval_metrics


def to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch of images ``[B, 3, H, W]`` on ``device`` (asynchronously from pinned memory),
    in the channels-last memory format when ``channels_last``."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def compute_embeddings(model: nn.Module, dataset, device: torch.device, *, batch_size: int = 256, amp: bool = False,
                       num_workers: int = 0, channels_last: bool = False) -> Tensor:
    """Embeddings ``[n, E]`` (float32, on the CPU) of a whole dataset in eval mode."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = []
    for images, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(model(to_device(images, device, channels_last)).embedding.float().cpu())
    return torch.cat(chunks)


def embedding_options(config: TrainConfig) -> dict:
    """``compute_embeddings``'s keyword options as ``config`` sets them."""
    return {"batch_size": config.eval_batch_size, "amp": config.amp, "num_workers": config.num_workers,
            "channels_last": config.channels_last}


def embed_test_splits(model: nn.Module, data: BenchmarkData, config: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(query embeddings ``[Q, E]``, gallery embeddings ``[G, E]`` or None) of one model."""
    options = embedding_options(config)
    query = compute_embeddings(model, data.query, device, **options)
    gallery = None if data.gallery is None else compute_embeddings(model, data.gallery, device, **options)
    return query, gallery


def retrieval_scores(data: BenchmarkData, query: Tensor, gallery: Tensor | None) -> dict:
    """Retrieval metrics of the test split: the queries against the gallery, or all against
    all (each query excluded from its own neighbours) without one."""
    if gallery is None:
        return retrieval_metrics(query, data.query.labels, recall_ks=data.recall_ks)
    return retrieval_metrics(query, data.query.labels, gallery, data.gallery.labels, recall_ks=data.recall_ks)


def concatenate_embeddings(parts: list[Tensor]) -> Tensor:
    """``[n, E_1] ... [n, E_k]`` -> ``[n, E_1 + ... + E_k]``: each part L2-normalized, then
    the concatenation normalized."""
    return F.normalize(torch.cat([F.normalize(part, dim=1) for part in parts], dim=1), dim=1)


def concatenated_metrics(data: BenchmarkData, query_parts: list[Tensor], gallery_parts: list[Tensor | None]) -> tuple[dict, int]:
    """(test metrics, dimension) of the models' concatenated embeddings (``concatenate_embeddings``)."""
    query = concatenate_embeddings(query_parts)
    gallery = None if data.gallery is None else concatenate_embeddings(gallery_parts)
    return retrieval_scores(data, query, gallery), query.shape[1]
