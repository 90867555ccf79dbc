"""``--log tensorboard``: event files of a run under ``output_dir/tensorboard/`` (an mlrc
run's fold k under ``output_dir/fold<k>/tensorboard/``), written by rank 0 through
``torch.utils.tensorboard.SummaryWriter``. The x axis of every tag is the optimizer step.

- ``step/loss``, ``step/metric_loss``, ``step/zero_shot_loss``, ``step/lr``: rank 0's batch
  after every step (read from the device every ``FLUSH_STEPS`` steps, not at each one).
- ``epoch/loss``, ``epoch/metric_loss``, ``epoch/zero_shot_loss``, ``epoch/lr``,
  ``epoch/images_per_second``: the epoch's record (results.json's "epochs"), at its last step;
  ``validation/map_at_r`` where the run validates.
- GSP runs, after every epoch, on ``FIXED_IMAGES`` fixed test images: ``weights/top30_share``
  (the mean share of the pooling weight on the top 30% positions; 0.3 for uniform weights),
  ``weights/pooling`` (histogram of the weights) and ``weights/maps`` (a figure of
  ``FIGURE_IMAGES`` images and their weight maps, ``figures.draw_weight_maps``).
- ``test/<metric>``: the test metrics once the model is trained.

A resumed run continues the same files: events after the checkpoint's last epoch are purged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .config import TrainConfig
from .datasets import BenchmarkData
from .embeddings import to_device
from .figures import displayable, draw_weight_maps

LOG_FOLDER = "tensorboard"
FIXED_IMAGES = 32  # test images whose pooling weights are measured after every epoch
FIGURE_IMAGES = 6  # of those, the images of the weight-map figure
TOP_SHARE = 0.3  # weights/top30_share: the share of the weight on this fraction of the positions
FLUSH_STEPS = 50  # per-step values are read from the device this often
_STEP_TAGS = ("step/loss", "step/metric_loss", "step/zero_shot_loss")
_EPOCH_TAGS = {"loss": "epoch/loss", "metric": "epoch/metric_loss", "zero_shot": "epoch/zero_shot_loss", "lr": "epoch/lr",
               "images_per_second": "epoch/images_per_second", "val_map_at_r": "validation/map_at_r",
               "transport_ratio": "pooling/transport_ratio", "gamma": "pooling/gamma"}


def evenly_spaced(dataset, count: int) -> Tensor:
    """``count`` images ``[n, 3, H, W]`` spread evenly over ``dataset`` (all of a smaller one)."""
    indices = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().unique()
    return torch.stack([dataset[int(index)][0] for index in indices])


def top_share(weights: Tensor, share: float = TOP_SHARE) -> float:
    """Mean over the images of the pooling weight on their top ``share`` of positions."""
    flat = weights.float().flatten(1)
    count = max(1, math.ceil(round(share * flat.shape[1], 6)))  # 0.3 * 10 positions: 3, not 4 by a rounding error
    top = flat.topk(count, dim=1).values.sum(dim=1)
    return float((top / flat.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)).mean())


@torch.no_grad()
def pooling_weights(model: nn.Module, images: Tensor, config: TrainConfig, device: torch.device) -> Tensor:
    """The model's pooling weights of ``images`` in eval mode, on the CPU (training mode restored)."""
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
        weights = model(to_device(images, device, config.channels_last), return_weights=True).weights
    model.train(was_training)
    return weights.float().cpu()


def _figure_pixels(images: Tensor, weights: Tensor, title: str) -> np.ndarray:
    """The weight-map figure rendered to RGB pixels ``[H, W, 3]`` (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure, _ = draw_weight_maps(displayable(images), weights)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class TensorBoardLog:
    """The event files of one model's training in ``folder``; ``images``: the fixed images
    whose pooling weights are logged (None: a GAP model, no weights)."""

    def __init__(self, folder: Path, images: Tensor | None):
        self.folder, self.images = Path(folder), images
        self.writer = None
        self.last_step = 0
        self._pending: list[tuple[int, Tensor, float]] = []

    def open(self, done_steps: int) -> None:
        """Start writing after ``done_steps`` steps (those of a resumed checkpoint): events of
        later steps in the folder (an interrupted epoch, a replaced run) are purged."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder), purge_step=done_steps + 1)
        self.last_step = done_steps

    def step(self, step: int, loss: Tensor, metric: Tensor, zero_shot: Tensor, lr: float) -> None:
        """Step ``step``'s losses (detached device tensors) and learning rate."""
        self._pending.append((step, torch.stack([loss.float(), metric.float(), zero_shot.float()]), lr))
        if len(self._pending) >= FLUSH_STEPS:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if not self._pending:
            return
        values = torch.stack([losses for _, losses, _ in self._pending]).tolist()  # one read from the device
        for (step, _, lr), losses in zip(self._pending, values):
            for tag, value in zip(_STEP_TAGS, losses):
                self.writer.add_scalar(tag, value, step)
            self.writer.add_scalar("step/lr", lr, step)
        self._pending.clear()

    def epoch(self, step: int, epoch: int, record: dict, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        """The epoch's record (``loop._train_epoch``'s, with validation) at its last step
        ``step``, and the pooling weights of the fixed images (``epoch`` is 1-based)."""
        self._flush_steps()
        for key, tag in _EPOCH_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        if self.images is not None:
            weights = pooling_weights(model, self.images, config, device)
            self.writer.add_scalar(f"weights/top{round(100 * TOP_SHARE)}_share", top_share(weights), step)
            self.writer.add_histogram("weights/pooling", weights.flatten(), step)
            if weights.dim() == 3:  # a map per image (tokens without a grid have none to draw)
                pick = torch.linspace(0, len(weights) - 1, min(FIGURE_IMAGES, len(weights))).round().long().unique()
                pixels = _figure_pixels(self.images[pick], weights[pick], f"pooling weights after epoch {epoch}")
                self.writer.add_image("weights/maps", pixels, step, dataformats="HWC")
        self.writer.flush()
        self.last_step = step

    def finish(self, metrics: dict | None) -> None:
        """The test metrics (at the last step), then close the files."""
        self._flush_steps()
        for name, value in (metrics or {}).items():
            self.writer.add_scalar(f"test/{name}", value, self.last_step)
        self.writer.close()


def training_log(config: TrainConfig, folder: str | Path, data: BenchmarkData, rank: int) -> TensorBoardLog | None:
    """The log of a model trained into ``folder`` (``folder/tensorboard``) when ``config.log``
    asks for one, on rank 0; else None. Its fixed images are spread over the test queries."""
    if config.log != "tensorboard" or rank != 0:
        return None
    images = evenly_spaced(data.query, FIXED_IMAGES) if config.pooling == "gsp" else None
    return TensorBoardLog(Path(folder) / LOG_FOLDER, images)
