"""Masks of padded batches for the pooling heads: True at a sample's real local features, False at
padding, so that each sample pools as if it were alone in the batch.

``checked_mask`` brings a mask to ``[B, N]`` (tokens ``[B, N]``; a map's or a known grid's
``[B, h, w]``); ``masked_mean``, ``masked_max`` and ``valid_counts`` are the averages and maxima
over the valid positions that the heads' own poolings (GAP, a warm-up's average, the max-pool
branch, GeM) use in place of a plain ``mean``/``amax``. A sample without any valid position
averages to zeros (its count is taken as 1) and has a max of -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor


def checked_mask(mask, tokens: Tensor, grid: tuple[int, int] | None) -> Tensor | None:
    """``mask`` as a bool ``[B, N]`` for ``tokens`` ``[B, N, C]``: given as ``[B, N]``, or as
    ``[B, h, w]`` on ``grid``; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True at valid positions), got {kind}")
    batch, count = tokens.shape[:2]
    shapes = [(batch, count)] + ([(batch, *grid)] if grid is not None else [])
    if tuple(mask.shape) not in shapes:
        wanted = " or ".join(str(list(shape)) for shape in shapes)
        raise ValueError(f"mask must be {wanted} for features of {count} positions per sample, got shape {tuple(mask.shape)}")
    if mask.device != tokens.device:
        raise ValueError(f"mask is on {mask.device} but the features are on {tokens.device}")
    return mask.reshape(batch, count)


def combined_masks(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """Valid where both masks say so (either may be None)."""
    if first is None or second is None:
        return second if first is None else first
    return first & second


def valid_counts(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, 1]`` valid positions per sample of ``mask`` ``[B, N]`` (at least 1), in ``dtype``."""
    return mask.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` ``[B, N, C]`` over the valid positions of ``mask`` ``[B, N]`` (all
    without one): ``[B, C]``."""
    if mask is None:
        return values.mean(dim=1)
    weights = mask.to(values.dtype).unsqueeze(-1)  # [B, N, 1]
    return (values * weights).sum(dim=1) / valid_counts(mask, values.dtype)


def masked_max(values: Tensor, mask: Tensor | None) -> Tensor:
    """Max of ``values`` ``[B, N, C]`` over the valid positions of ``mask`` ``[B, N]``: ``[B, C]``."""
    if mask is None:
        return values.amax(dim=1)
    return values.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
