"""timm's NaFlexViT (``timm.models.naflexvit``, the ``naflexvit_*`` models): images of several
sizes in one batch, as patches padded to one length.

A NaFlex batch is a dict: ``patches`` ``[B, N, P*P*3]`` (each image's patches in row-major order,
then padding), ``patch_coord`` ``[B, N, 2]`` (each patch's (y, x) on its image's grid) and
``patch_valid`` ``[B, N]`` (bool, False at padding), as timm's NaFlex loader gives it, or
``naflex_batch`` builds it from a list of images. ``naflex_patch_tokens`` runs the model on it
(attention masked by ``patch_valid``); ``backbones.TimmBackbone`` hands the patch tokens and
that mask on to the pooling head, so each image pools as if alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NAFLEX_KEYS = ("patches", "patch_coord")  # what a NaFlex batch must hold (patch_valid: all valid without it)


def is_naflex(model: nn.Module) -> bool:
    """Whether ``model`` is timm's ``NaFlexVit``."""
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:  # pragma: no cover - timm without NaFlexViT
        return False
    return isinstance(model, NaFlexVit)


def naflex_patch_tokens(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor | None]:
    """The NaFlexViT ``model``'s output tokens ``[B, prefix + N, C]`` on the NaFlex ``batch`` and
    their patches' mask ``[B, N]`` (bool; gathered through patch dropout; None: all valid)."""
    if not is_naflex(model):
        raise TypeError(f"a dict of patches is a NaFlex batch, for timm's NaFlexVit models; {type(model).__name__} takes images")
    missing = [key for key in NAFLEX_KEYS if key not in batch]
    if missing:
        raise ValueError(f"a NaFlex batch needs {', '.join(NAFLEX_KEYS)} (and patch_valid for padding); it lacks {', '.join(missing)}")
    valid = batch.get("patch_valid")
    output = model.forward_features(batch["patches"], patch_coord=batch["patch_coord"],
                                    patch_valid=None if valid is None else valid.bool(), attn_mask=batch.get("attn_mask"))
    valid = output.get("patch_valid")
    return output["patches"], None if valid is None else valid.bool()


def naflex_batch(model: nn.Module, images: list[Tensor]) -> dict:
    """A NaFlex batch of ``images`` (each ``[3, H, W]``, sizes the patch size divides, any
    mixture) for the NaFlexViT ``model``: its patches in the model's layout, zero-padded to the
    longest image's, with their coordinates and ``patch_valid``."""
    from timm.models.naflexvit import batch_patchify

    embeds = model.embeds
    patch_h, patch_w = embeds.patch_size
    patches, coords = [], []
    for image in images:
        if image.dim() != 3 or image.shape[1] % patch_h or image.shape[2] % patch_w:
            raise ValueError(f"each image must be [3, H, W] with H, W multiples of the patch size {patch_h}x{patch_w}, "
                             f"got shape {tuple(image.shape)}")
        flat, (rows, columns) = batch_patchify(image[None], (patch_h, patch_w), pad=False, channels_last=embeds.channels_last)
        patches.append(flat[0])  # [n, P*P*3]
        grid = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
        coords.append(torch.stack(grid, dim=-1).reshape(-1, 2).to(image.device))  # [n, 2] (y, x), row-major
    length = max(flat.shape[0] for flat in patches)
    batch = {
        "patches": images[0].new_zeros(len(images), length, patches[0].shape[1]),
        "patch_coord": torch.zeros(len(images), length, 2, dtype=torch.long, device=images[0].device),
        "patch_valid": torch.zeros(len(images), length, dtype=torch.bool, device=images[0].device),
    }
    for index, (flat, coord) in enumerate(zip(patches, coords)):
        batch["patches"][index, : len(flat)] = flat
        batch["patch_coord"][index, : len(coord)] = coord
        batch["patch_valid"][index, : len(flat)] = True
    return batch
