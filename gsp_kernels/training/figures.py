"""Figures of pooling weights: ``draw_weight_maps(images, weights)`` lays images (top row) and
their pooling weight maps over them (bottom row) in a matplotlib ``Figure`` built without
pyplot (no backend chosen, no window). The demo saves one; ``--log tensorboard`` logs one per
epoch."""

from __future__ import annotations

from torch import Tensor


def displayable(images: Tensor) -> Tensor:
    """``images`` ``[n, 3, H, W]`` scaled to [0, 1] per image (normalized benchmark images
    included), for ``imshow``."""
    flat = images.float().flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scaled = (flat - low[:, None]) / (high - low).clamp_min(1e-12)[:, None]
    return scaled.view_as(images)


def draw_weight_maps(images: Tensor, weights: Tensor):
    """-> (figure, axes ``[2, n]``): ``images`` ``[n, 3, H, W]`` in [0, 1] on top, below each
    its grey image under its weight map ``weights[i]`` ``[h, w]`` stretched over it."""
    from matplotlib.figure import Figure

    count = len(images)
    figure = Figure(figsize=(1.6 * count, 4.0))
    axes = figure.subplots(2, count, squeeze=False)
    height, width = images.shape[-2:]
    for column in range(count):
        image = images[column].permute(1, 2, 0).float().numpy()
        axes[0, column].imshow(image, interpolation="nearest")
        axes[1, column].imshow(image.mean(axis=2), cmap="gray", interpolation="nearest")
        axes[1, column].imshow(weights[column].float().numpy(), cmap="inferno", alpha=0.6,
                               extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        for row in range(2):
            axes[row, column].axis("off")
    return figure, axes
