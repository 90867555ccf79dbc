"""Prototype initialization helpers of the ``GSP`` layer: greedy k-center selection, and the
gathering of candidate rows from every DistributedDataParallel rank (the warm-up memory)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def kcenter_indices(points: Tensor, k: int, start_index: int = 0, *, covered: Tensor | None = None) -> Tensor:
    """Greedy k-center: repeatedly add the point with the largest Euclidean distance to its
    nearest chosen point. It starts from ``points[start_index]``, or, given ``covered``
    ``[Q, D]`` (centres already placed, as the authors' memory initialization seeds it), from
    the distances to those, and then picks all k from ``points``.

    points: ``[P, D]``; returns ``[k]`` int64 indices into ``points`` (distinct while distinct
    points remain).
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [P, D], got shape {tuple(points.shape)}")
    num_points = points.shape[0]
    if not 1 <= k <= num_points:
        raise ValueError(f"k must be in [1, {num_points}] (the number of points), got {k}")
    if not 0 <= start_index < num_points:
        raise ValueError(f"start_index must be in [0, {num_points}), got {start_index}")
    points = points.detach().float()
    chosen = torch.empty(k, dtype=torch.long, device=points.device)
    if covered is None:
        chosen[0] = start_index
        min_dist = torch.linalg.vector_norm(points - points[start_index], dim=1)  # [P]
        first = 1
    else:
        if covered.dim() != 2 or covered.shape[0] == 0 or covered.shape[1] != points.shape[1]:
            raise ValueError(f"covered must be [Q, {points.shape[1]}] with Q >= 1, got shape {tuple(covered.shape)}")
        min_dist = torch.cdist(points, covered.detach().float().to(points.device)).amin(dim=1)  # [P]
        first = 0
    for step in range(first, k):
        next_index = torch.argmax(min_dist)
        chosen[step] = next_index
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(points - points[next_index], dim=1))
    return chosen


def gathered_across_ranks(rows: Tensor) -> Tensor:
    """``rows`` ``[b, E]`` of every rank, in rank order (``rows`` itself without a process
    group); ranks may hold different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world_size = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(rank_count) for rank_count in counts]
    padded = rows.new_zeros(max(counts), rows.shape[1])  # all_gather needs one shape on every rank
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:rank_count] for part, rank_count in zip(parts, counts, strict=True)])
