"""The paper's zero-shot prediction regularizer on GSP attribute vectors.

Each class has a learnable embedding. The batch is split into two halves; a ridge
regression fitted on one half maps attribute vectors to the embeddings of their classes and
predicts the embeddings of the other half (and back). The predictions are classified by
scaled cosine similarity to every class embedding with a softmax cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_ZERO_SHOT_WEIGHT = 0.1


def ridge_predict(train_inputs: Tensor, train_targets: Tensor, test_inputs: Tensor, ridge: float) -> Tensor:
    """Ridge regression in its dual (per-sample) form, fitted on one set, applied to another.

    W = Xᵀ (X Xᵀ + λI)⁻¹ Y with X = train_inputs ``[n, M]``, Y = train_targets ``[n, E]``;
    returns test_inputs @ W ``[m, E]``. Computed in float32 (or float64) even under autocast.
    """
    dtype = torch.promote_types(train_inputs.dtype, torch.float32)
    with torch.autocast(train_inputs.device.type, enabled=False):
        x_train, y_train, x_test = train_inputs.to(dtype), train_targets.to(dtype), test_inputs.to(dtype)
        gram = x_train @ x_train.T  # [n, n]
        eye = torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
        dual_coefficients = torch.linalg.solve(gram + ridge * eye, y_train)  # [n, E]
        return (x_test @ x_train.T) @ dual_coefficients  # [m, E]


class ZeroShotPredictionLoss(nn.Module):
    """Zero-shot prediction loss (GSP paper): predict class embeddings from attributes.

    Args:
        num_classes: number of training classes (labels are in [0, num_classes)).
        class_embedding_dim: size E of the learnable class embeddings ``[num_classes, E]``.
        ridge: ridge regularizer lambda of the regression (paper: 0.05).
        scale: multiplier of the cosine similarities before the softmax (paper: 9.5).
        weight: factor applied to the returned loss, its weight next to the metric loss
            (paper: 0.1); use 1.0 for the bare loss.

    forward(attributes ``[B, M]``, labels ``[B]``) -> scalar: ``weight`` times the mean of
    the two cross-entropies (first half -> second half, and back). The halves are the first
    ``B // 2`` samples and the rest; with a class-grouped batch (as a class-balanced sampler
    gives) the two halves hold different classes, the zero-shot setting.
    """

    def __init__(
        self,
        num_classes: int,
        class_embedding_dim: int = 128,
        *,
        ridge: float = 0.05,
        scale: float = 9.5,
        weight: float = DEFAULT_ZERO_SHOT_WEIGHT,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("class_embedding_dim", class_embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.ridge = float(ridge)
        self.scale = float(scale)
        self.weight = float(weight)
        self.class_embeddings = nn.Parameter(torch.randn(num_classes, class_embedding_dim))

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_embedding_dim={self.class_embeddings.shape[1]}, "
            f"ridge={self.ridge}, scale={self.scale}, weight={self.weight}"
        )

    def _check(self, attributes: Tensor, labels: Tensor) -> None:
        if not isinstance(attributes, Tensor) or not isinstance(labels, Tensor):
            raise TypeError("attributes and labels must be torch.Tensors")
        if not attributes.is_floating_point():
            raise TypeError(f"attributes must be a floating-point tensor, got {attributes.dtype}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if attributes.dim() != 2:
            raise ValueError(f"attributes must be [B, M], got shape {tuple(attributes.shape)}")
        if labels.dim() != 1 or labels.shape[0] != attributes.shape[0]:
            raise ValueError(
                f"labels must be [B] with B = {attributes.shape[0]} (the attributes' batch), got shape {tuple(labels.shape)}"
            )
        batch = attributes.shape[0]
        if batch < 2 or batch // 2 == 0 or batch - batch // 2 == 0:
            raise ValueError(f"the zero-shot loss splits the batch into two halves and needs B >= 2, got B = {batch}")
        if torch.compiler.is_compiling():
            return  # reading label values would break the graph; indexing still fails on bad labels
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got values in [{low}, {high}]")

    def _half_loss(self, train_attr: Tensor, train_labels: Tensor, test_attr: Tensor, test_labels: Tensor) -> Tensor:
        """Fit on one half, predict the other, cross-entropy of its cosine logits."""
        targets = self.class_embeddings[train_labels]  # [n, E]
        predicted = ridge_predict(train_attr, targets, test_attr, self.ridge)  # [m, E]
        logits = self.scale * F.normalize(predicted, dim=1) @ F.normalize(self.class_embeddings.to(predicted.dtype), dim=1).T
        return F.cross_entropy(logits, test_labels)  # logits [m, num_classes]

    def forward(self, attributes: Tensor, labels: Tensor) -> Tensor:
        """attributes [B, M], labels [B] -> weight · mean of the two halves' cross-entropies."""
        self._check(attributes, labels)
        half = attributes.shape[0] // 2
        first_attr, second_attr = attributes[:half], attributes[half:]
        first_labels, second_labels = labels[:half], labels[half:]
        loss = 0.5 * (
            self._half_loss(first_attr, first_labels, second_attr, second_labels)
            + self._half_loss(second_attr, second_labels, first_attr, first_labels)
        )
        return self.weight * loss


ZeroShotLoss = ZeroShotPredictionLoss
