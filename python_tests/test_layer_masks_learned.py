"""GSP with a learned mu and gamma, masks of padded batches (GSP, the GAP head, the warm-up),
old state dicts, timm's NaFlexViT, and the training flags in a tiny collage run."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from gsp_kernels import cli, ops
from gsp_kernels.nn import (
    GSP,
    LEARNED_MINIMUM,
    GlobalAveragePoolHead,
    PatchTokens,
    gamma_ceiling,
)
from gsp_kernels.training.config import TrainConfig
from gsp_kernels.training.loop import build_optimizer

# The op's masks and tensor mu/gamma (gsp_pool(..., mask=...)): the tests that run GSP's transport need them.
needs_masked_op = pytest.mark.skipif("mask" not in inspect.signature(ops.gsp_pool).parameters,
                                     reason="gsp_pool takes no mask (nor tensor mu/gamma) in this tree")
TINY = {"epochs": 2, "width": 4, "embedding_dim": 8, "num_prototypes": 4, "class_embedding_dim": 4, "collages_per_digit": 1,
        "batch_size": 20, "steps_per_epoch": 2, "progress": False}


def _padded(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences [n_i, C] -> zero-padded [B, N, C] and their mask [B, N]."""
    length = max(len(t) for t in tokens)
    batch = torch.zeros(len(tokens), length, tokens[0].shape[1])
    mask = torch.zeros(len(tokens), length, dtype=torch.bool)
    for index, sample in enumerate(tokens):
        batch[index, : len(sample)], mask[index, : len(sample)] = sample, True
    return batch, mask


def test_learned_values_start_where_given_and_stay_in_range():
    layer = GSP(8, 6, 4, transport_ratio=0.3, gamma=5.0, learn_transport_ratio=True, learn_gamma=True)
    assert layer.transport_ratio == pytest.approx(0.3) and layer.gamma == pytest.approx(5.0)
    assert isinstance(layer.transport_ratio, float) and len(layer.pooling_parameters()) == 2
    ceiling = gamma_ceiling("lipschitz", "euclidean")
    for raw in (-1e6, 1e6):  # where any optimizer step may throw them
        with torch.no_grad():
            layer.raw_transport_ratio.fill_(raw)
            layer.raw_gamma.fill_(raw)
        assert LEARNED_MINIMUM * 0.999 <= layer.transport_ratio <= 1.0
        assert LEARNED_MINIMUM * 0.999 <= layer.gamma <= ceiling * (1 + 1e-6)  # float32 rounding
    assert ceiling < 0.1 / (torch.finfo(torch.float32).eps * 2)  # inside the op's logit-resolution bound


def test_learning_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="logit of transport_ratio=1 is infinite"):
        GSP(8, 6, 4, transport_ratio=1.0, learn_transport_ratio=True)
    with pytest.raises(ValueError, match="learn_gamma keeps gamma"):
        GSP(8, 6, 4, gamma=1e6, learn_gamma=True)
    with pytest.raises(TypeError, match="learn_gamma must be a bool"):
        GSP(8, 6, 4, learn_gamma=1)


def test_old_state_dict_loads_and_fixed_layers_have_no_new_parameters():
    torch.manual_seed(0)
    old = {"projection.weight": torch.randn(6, 8), "projection.bias": torch.randn(6), "prototypes": torch.randn(4, 6)}
    layer = GSP(8, 6, 4)
    layer.load_state_dict(old)  # strict: the same keys as before learned mu/gamma existed
    assert set(layer.state_dict()) == set(old) and layer.pooling_parameters() == []
    assert isinstance(layer.transport_ratio, float) and layer.transport_ratio == 0.3
    learned = GSP(8, 6, 4, learn_transport_ratio=True)
    assert set(learned.state_dict()) == {*old, "raw_transport_ratio"}


def test_optimizer_puts_pooling_parameters_in_their_own_group():
    layer = GSP(8, 6, 4, learn_transport_ratio=True, learn_gamma=True)
    config = TrainConfig(lr=1e-3, pooling_params_lr_multiplier=10.0, weight_decay=1e-4)
    optimizer = build_optimizer(config, layer.parameters(), layer.pooling_parameters())
    main, pooling = optimizer.param_groups
    assert pooling["lr"] == pytest.approx(1e-2) and pooling["weight_decay"] == 0.0 and len(pooling["params"]) == 2
    assert main["lr"] == 1e-3 and len(main["params"]) == 3
    assert len(build_optimizer(config, GSP(8, 6, 4).parameters()).param_groups) == 1


def test_gap_head_and_warm_up_pool_padded_samples_as_alone():
    torch.manual_seed(0)
    samples = [torch.randn(5, 8), torch.randn(3, 8)]
    tokens, mask = _padded(samples)
    gap, warming = GlobalAveragePoolHead(8, 6), GSP(8, 6, 4, memory_size=8, augment_max_pool=True)
    for head in (gap, warming):
        out = head(tokens, mask=mask, return_weights=True)
        for index, sample in enumerate(samples):
            alone = head(sample[None])
            torch.testing.assert_close(out.embedding[index], alone.embedding[0])
        torch.testing.assert_close(out.weights.sum(1), torch.ones(2))
        assert (out.weights[~mask] == 0).all()
    # a PatchTokens mask on a grid, as [B, h, w]
    grid_tokens = PatchTokens(torch.randn(2, 4, 8), (2, 2), torch.tensor([[True] * 4, [True, True, False, False]]))
    torch.testing.assert_close(gap(grid_tokens).embedding[1], gap(grid_tokens.tokens[1:, :2]).embedding[0])
    with pytest.raises(ValueError, match="mask must be"):
        gap(tokens, mask=mask[:, :2])
    with pytest.raises(TypeError, match="bool tensor"):
        gap(tokens, mask=mask.float())


@needs_masked_op
@pytest.mark.parametrize("pooling_method", ["sum", "gem", "max"])
def test_masked_tokens_pool_as_each_sample_alone(pooling_method):
    torch.manual_seed(0)
    samples = [torch.randn(7, 8), torch.randn(4, 8), torch.randn(6, 8)]
    tokens, mask = _padded(samples)
    layer = GSP(8, 6, 4, pooling_method=pooling_method, augment_max_pool=True, backend="reference").double()
    out = layer(tokens.double(), mask=mask, return_weights=True)
    for index, sample in enumerate(samples):
        alone = layer(sample[None].double(), return_weights=True)
        torch.testing.assert_close(out.embedding[index], alone.embedding[0])
        torch.testing.assert_close(out.attributes[index], alone.attributes[0])
        torch.testing.assert_close(out.weights[index, : len(sample)], alone.weights[0])
    assert (out.weights[~mask] == 0).all()


@needs_masked_op
def test_gradients_reach_the_raw_parameters_and_steps_keep_forwards_accepted():
    torch.manual_seed(0)
    layer = GSP(8, 6, 4, learn_transport_ratio=True, learn_gamma=True)
    optimizer = torch.optim.SGD(layer.pooling_parameters(), lr=1e6)  # absurd steps
    for _ in range(3):
        out = layer(torch.randn(3, 9, 8))
        loss = out.embedding.square().sum() + out.attributes.square().sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad) for p in layer.pooling_parameters())
        optimizer.step()
    assert LEARNED_MINIMUM * 0.999 <= layer.transport_ratio <= 1 and layer.gamma <= gamma_ceiling("lipschitz", "euclidean") * (1 + 1e-6)
    assert torch.isfinite(layer(torch.randn(3, 9, 8)).embedding).all()


@needs_masked_op
def test_naflexvit_padded_batch_embeds_each_image_as_alone():
    timm = pytest.importorskip("timm")
    pytest.importorskip("timm.models.naflexvit")
    from gsp_kernels.nn import naflex_batch, replace_global_pool

    torch.manual_seed(0)
    vit = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=64)
    model = replace_global_pool(vit, 16, num_prototypes=4, backend="reference").eval()
    images = [torch.randn(3, 32, 48), torch.randn(3, 16, 16), torch.randn(3, 48, 32)]
    with torch.no_grad():
        batch = model(naflex_batch(vit, images)).embedding
        for index, image in enumerate(images):
            alone = model(naflex_batch(vit, [image])).embedding[0]
            torch.testing.assert_close(batch[index], alone, atol=1e-4, rtol=1e-4)
        plain = model(images[0][None]).embedding[0]  # the image tensor path: the same model, its own grid
        torch.testing.assert_close(batch[0], plain, atol=1e-4, rtol=1e-4)


@needs_masked_op
def test_tiny_collage_run_learns_mu_and_gamma(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--width", "4", "--embedding-dim", "8", "--num-prototypes", "4", "--class-embedding-dim", "4",
             "--collages-per-digit", "1", "--batch-size", "20", "--steps-per-epoch", "2", "--epochs", "2", "--no-progress"]
    assert cli.main(["train", *flags, "--learn-transport-ratio", "--learn-gamma", "--pooling-params-lr-multiplier", "50",
                     "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mu learned from 0.3" in printed and "gamma learned from 5" in printed
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["learn_transport_ratio"] and record["config"]["pooling_params_lr_multiplier"] == 50
    assert all({"transport_ratio", "gamma"} <= set(epoch) for epoch in record["epochs"])
    final = record["pooling_values"]
    assert 0 < final["transport_ratio"] <= 1 and final["gamma"] > 0
    assert final["transport_ratio"] != pytest.approx(0.3, abs=1e-6)  # it moved
