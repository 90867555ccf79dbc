"""ZeroShotPredictionLoss: against a straightforward re-implementation (primal ridge),
hand-computable values, autocast, torch.compile, bad input."""

import math

import pytest
import torch

from gsp_kernels.losses import ZeroShotLoss, ZeroShotPredictionLoss, ridge_predict
from gsp_kernels.testing import rel_err


def straightforward_zero_shot_loss(attributes, labels, class_embeddings, ridge=0.05, scale=9.5):
    """Primal ridge (XᵀX + λI)⁻¹ XᵀY per half, explicit cosine logits, mean of both directions."""
    half = attributes.shape[0] // 2
    parts = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    total = 0.0
    for fit, predict in parts:
        x, y = attributes[fit], class_embeddings[labels[fit]]
        m = x.shape[1]
        weights = torch.linalg.inv(x.T @ x + ridge * torch.eye(m, dtype=x.dtype)) @ x.T @ y  # [M, E]
        predicted = attributes[predict] @ weights
        losses = []
        for row, label in zip(predicted, labels[predict]):
            cosines = torch.stack([torch.dot(row, e) / (row.norm() * e.norm()) for e in class_embeddings])
            logits = scale * cosines
            losses.append(torch.logsumexp(logits, 0) - logits[label])
        total = total + torch.stack(losses).mean()
    return total / 2


def test_matches_straightforward_reimplementation_forward_and_gradients():
    torch.manual_seed(0)
    loss_fn = ZeroShotPredictionLoss(5, 7, weight=1.0).double()
    attributes = torch.rand(10, 4, dtype=torch.float64).softmax(1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 4, 2])
    value = loss_fn(attributes, labels)
    attributes_copy = attributes.detach().clone().requires_grad_(True)
    embeddings_copy = loss_fn.class_embeddings.detach().clone().requires_grad_(True)
    expected = straightforward_zero_shot_loss(attributes_copy, labels, embeddings_copy)
    assert abs(value.item() - expected.item()) < 1e-10 * max(1.0, abs(expected.item()))
    value.backward()
    expected.backward()
    assert rel_err(attributes.grad, attributes_copy.grad) < 1e-8
    assert rel_err(loss_fn.class_embeddings.grad, embeddings_copy.grad) < 1e-8


def test_dual_ridge_equals_primal_ridge():
    generator = torch.Generator().manual_seed(1)
    x, y, x_test = (torch.randn(s, generator=generator, dtype=torch.float64) for s in [(6, 9), (6, 3), (4, 9)])
    primal = x_test @ torch.linalg.solve(x.T @ x + 0.05 * torch.eye(9, dtype=x.dtype), x.T @ y)
    torch.testing.assert_close(ridge_predict(x, y, x_test, 0.05), primal)


def test_perfectly_predictable_attributes_reach_the_minimum():
    """One-hot attributes of the class and orthonormal class embeddings: each prediction is
    exactly its class embedding's direction, so logits are 9.5 on the class and 0 elsewhere."""
    classes = 4
    loss_fn = ZeroShotPredictionLoss(classes, classes, weight=1.0).double()
    with torch.no_grad():
        loss_fn.class_embeddings.copy_(torch.eye(classes))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    attributes = torch.eye(classes, dtype=torch.float64)[labels]
    expected = math.log(1 + (classes - 1) * math.exp(-9.5))
    assert abs(loss_fn(attributes, labels).item() - expected) < 1e-9
    # The second half's attributes point at the next class: every prediction is wrong.
    inconsistent = torch.eye(classes, dtype=torch.float64)[torch.cat([labels[:4], (labels[4:] + 1) % classes])]
    assert loss_fn(inconsistent, labels).item() > 9.0


def test_hand_computable_two_class_cases():
    loss_fn = ZeroShotPredictionLoss(2, 2, weight=1.0).double()
    with torch.no_grad():
        loss_fn.class_embeddings.copy_(torch.eye(2))
    labels = torch.tensor([0, 1])
    # Parallel attributes: each half predicts the *other* class's embedding direction -> CE = log(1 + e^9.5).
    parallel = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    assert abs(loss_fn(parallel, labels).item() - math.log1p(math.exp(9.5))) < 1e-9
    # Orthogonal attributes: the predictions are zero vectors -> uniform logits -> CE = log 2.
    orthogonal = torch.eye(2, dtype=torch.float64)
    assert abs(loss_fn(orthogonal, labels).item() - math.log(2)) < 1e-9


def test_weight_default_and_alias():
    assert ZeroShotLoss is ZeroShotPredictionLoss
    torch.manual_seed(0)
    weighted = ZeroShotPredictionLoss(3, 4)
    bare = ZeroShotPredictionLoss(3, 4, weight=1.0)
    bare.load_state_dict(weighted.state_dict())
    attributes, labels = torch.rand(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    assert weighted.weight == 0.1 and weighted.ridge == 0.05 and weighted.scale == 9.5
    torch.testing.assert_close(weighted(attributes, labels), 0.1 * bare(attributes, labels))


def test_bad_input():
    loss_fn = ZeroShotPredictionLoss(3, 4)
    with pytest.raises(ValueError, match="needs B >= 2"):
        loss_fn(torch.rand(1, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="needs B >= 2"):
        loss_fn(torch.rand(0, 5), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss_fn(torch.rand(4, 5), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss_fn(torch.rand(4, 5), torch.tensor([0, -1, 2, 1]))
    with pytest.raises(ValueError, match="labels must be \\[B\\]"):
        loss_fn(torch.rand(4, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="attributes must be"):
        loss_fn(torch.rand(4), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(TypeError, match="integer"):
        loss_fn(torch.rand(4, 5), torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(torch.ones(4, 5, dtype=torch.long), torch.tensor([0, 1, 2, 1]))
    for kwargs in ({"ridge": 0.0}, {"scale": -1.0}, {"weight": -0.1}):
        with pytest.raises(ValueError):
            ZeroShotPredictionLoss(3, 4, **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        ZeroShotPredictionLoss(0, 4)


def test_autocast_bf16_attributes():
    torch.manual_seed(0)
    loss_fn = ZeroShotPredictionLoss(3, 4, weight=1.0)
    attributes = torch.rand(8, 5).softmax(1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(attributes.bfloat16(), labels)
    assert low.dtype == torch.float32
    low.backward()
    assert torch.isfinite(attributes.grad).all()
    assert abs(low.item() - loss_fn(attributes, labels).item()) < 5e-2 * max(1.0, low.item())


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    loss_fn = ZeroShotPredictionLoss(3, 4)
    attributes, labels = torch.rand(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(attributes, labels), loss_fn(attributes, labels))
