"""The GSP layer: against a straightforward re-implementation for maps and token sequences, the
authors' variants (GeM, max pooling, max-pool augmentation) against their plain-PyTorch
formulas, the prototype initializations (batch k-center, warm-up memory, class proxies),
autocast, backends, torch.compile, bad input. Real backbones: test_backbones.py."""

import pytest
import torch

from gsp_kernels.backends import available_backends
from gsp_kernels.nn import GSP, GSPOutput, kcenter_indices
from gsp_kernels.nn.backbones import PatchTokens
from gsp_kernels.testing import rel_err


def straightforward_plan(x, prototypes, mu, gamma, iterations=3000):
    """The paper's fixed-point iteration unrolled (float64, differentiable by autograd) on
    projected tokens x [B, N, E]: returns (weights [B, N] summing to 1, attributes [B, M])."""
    n = x.shape[1]
    x_hat = x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)
    z_hat = prototypes / prototypes.norm(dim=-1, keepdim=True).clamp_min(1.0)
    cost = (x_hat[:, :, None, :] - z_hat[None, None, :, :]).norm(dim=-1)  # [B, N, M]
    kernel = torch.exp(-gamma * cost)  # [B, N, M]
    row_mass = kernel.sum(-1)  # [B, N]  s_i
    t = torch.full((x.shape[0], 1), mu, dtype=x.dtype)
    for _ in range(iterations):
        p = (1.0 / n) / (1.0 + t * row_mass)
        t = mu / (p * row_mass).sum(-1, keepdim=True)
    plan = (1.0 / n) / (1.0 + t * row_mass)[..., None] * t[..., None] * kernel  # [B, N, M]
    return plan.sum(-1) / mu, plan.sum(1) / mu


def straightforward_layer(tokens, weight, bias, prototypes, mu, gamma, pooling="sum", power=None, augment_max=False):
    """The layer's formulas in plain PyTorch on backbone tokens [B, N, C]: returns
    (embedding [B, E], attributes [B, M], weights [B, N])."""
    projected = torch.einsum("bnc,ec->bne", tokens, weight) + bias  # [B, N, E]
    weights, attributes = straightforward_plan(projected, prototypes, mu, gamma)
    mixed = tokens * weights[..., None] * tokens.shape[1]  # the authors' mixing weights N·w_i
    if pooling == "sum":
        embedding = torch.einsum("bn,bne->be", weights, projected)
    elif pooling == "gem":
        embedding = (mixed.clamp_min(1e-6) ** power).mean(1) ** (1.0 / power) @ weight.T + bias
    else:
        embedding = mixed.max(dim=1).values @ weight.T + bias
    if augment_max:
        embedding = embedding + tokens.max(dim=1).values @ weight.T
    return embedding, attributes, weights


def _map(batch=3, channels=5, height=3, width=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


def _compare_with_straightforward(layer, features, tokens, **formula):
    """Forward and every gradient of ``layer(features)`` against ``straightforward_layer`` on
    the same tokens (float64)."""
    out = layer(features, return_weights=True)
    weight = layer.projection.weight.detach().clone().requires_grad_(True)
    bias = layer.projection.bias.detach().clone().requires_grad_(True)
    prototypes = layer.prototypes.detach().clone().requires_grad_(True)
    power = layer.gem_power.detach().clone().requires_grad_(True) if layer.gem_power is not None else None
    token_copy = tokens.detach().clone().requires_grad_(True)
    ref = straightforward_layer(token_copy, weight, bias, prototypes, layer.transport_ratio, layer.gamma, power=power, **formula)
    assert rel_err(out.embedding, ref[0]) < 1e-8
    assert rel_err(out.attributes, ref[1]) < 1e-8
    assert rel_err(out.weights.flatten(1), ref[2]) < 1e-8
    probe_e, probe_a = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    ((out.embedding * probe_e).sum() + (out.attributes * probe_a).sum()).backward()
    ((ref[0] * probe_e).sum() + (ref[1] * probe_a).sum()).backward()
    feature_grad = (features.tokens if isinstance(features, PatchTokens) else features).grad
    assert rel_err(feature_grad.flatten(2).transpose(1, 2) if feature_grad.dim() == 4 else feature_grad, token_copy.grad) < 1e-7
    assert rel_err(layer.prototypes.grad, prototypes.grad) < 1e-7
    assert rel_err(layer.projection.weight.grad, weight.grad) < 1e-7
    assert rel_err(layer.projection.bias.grad, bias.grad) < 1e-7
    if power is not None:
        assert rel_err(layer.gem_power.grad, power.grad) < 1e-7
    return out


def test_map_matches_straightforward_reimplementation_forward_and_gradients():
    torch.manual_seed(1)
    layer = GSP(5, 6, num_prototypes=4, transport_ratio=0.4, gamma=3.0, backend="reference").double()
    feature_map = _map().requires_grad_(True)
    out = _compare_with_straightforward(layer, feature_map, feature_map.flatten(2).transpose(1, 2))
    assert out.weights.shape == (3, 3, 4)


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_tokens_match_straightforward_reimplementation(grid):
    torch.manual_seed(2)
    layer = GSP(7, 5, num_prototypes=3, transport_ratio=0.5, gamma=4.0, backend="reference").double()
    tokens = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)  # [B, N, C]
    out = layer(tokens, grid=grid, return_weights=True)
    assert out.weights.shape == ((2, 6) if grid is None else (2, 2, 3))
    layer.zero_grad()
    tokens.grad = None
    _compare_with_straightforward(layer, PatchTokens(tokens, grid) if grid else tokens, tokens)


@pytest.mark.parametrize(
    "options, formula",
    [
        ({"pooling_method": "gem"}, {"pooling": "gem"}),
        ({"pooling_method": "gem", "gem_power": 2.5, "augment_max_pool": True}, {"pooling": "gem", "augment_max": True}),
        ({"pooling_method": "max"}, {"pooling": "max"}),
        ({"augment_max_pool": True}, {"augment_max": True}),
    ],
    ids=["gem", "gem+maxaug", "max", "sum+maxaug"],
)
@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_official_variants_match_their_formulas(options, formula, layout):
    torch.manual_seed(3)
    layer = GSP(5, 6, num_prototypes=4, transport_ratio=0.3, gamma=5.0, backend="reference", **options).double()
    if layer.gem_power is not None:
        assert layer.gem_power.item() == options.get("gem_power", 3.0)  # the authors' initial power 3
        with torch.no_grad():
            layer.gem_power.add_(0.3)  # a learned power, off its initial value
    feature_map = (_map(seed=4) + 0.5).requires_grad_(True)  # mostly positive, some clamped by GeM
    if layout == "map":
        features, tokens = feature_map, feature_map.flatten(2).transpose(1, 2)
    else:
        tokens = feature_map.detach().flatten(2).transpose(1, 2).contiguous().requires_grad_(True)  # [B, 12, 5]
        features = tokens
    _compare_with_straightforward(layer, features, tokens, **formula)


def test_fixed_point_solver_runs_the_authors_iteration_count():
    """solver="fixed_point", max_iter=T is the paper's T steps (+ the final update): at mu 0.9
    100 steps have not converged, and the layer follows the 100-step plan, not the converged one."""
    torch.manual_seed(5)
    layer = GSP(5, 6, num_prototypes=4, transport_ratio=0.9, gamma=5.0, backend="reference", solver="fixed_point", max_iter=100)
    layer = layer.double()
    tokens = torch.randn(2, 9, 5, dtype=torch.float64)
    projected = layer.project(tokens).detach()
    out = layer(tokens, return_weights=True)
    weights_100, _ = straightforward_plan(projected, layer.prototypes.detach(), 0.9, 5.0, iterations=100)
    converged, _ = straightforward_plan(projected, layer.prototypes.detach(), 0.9, 5.0, iterations=5000)
    assert rel_err(out.weights, weights_100) < 1e-10 and rel_err(weights_100, converged) > 1e-6
    assert "solver='fixed_point'" in repr(layer)
    with pytest.raises(ValueError, match="solver must be one of"):
        GSP(5, 4, solver="sinkhorn")
    with pytest.raises(ValueError, match="max_iter"):
        GSP(5, 4, max_iter=0)


def test_output_type_shapes_and_normalization():
    layer = GSP(5, 8, num_prototypes=6)
    out = layer(_map(dtype=torch.float32))
    assert isinstance(out, GSPOutput) and out.weights is None
    assert out.embedding.shape == (3, 8) and out.attributes.shape == (3, 6)
    out = layer(_map(dtype=torch.float32), return_weights=True)
    assert out.weights.shape == (3, 3, 4)
    torch.testing.assert_close(out.weights.sum(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(out.attributes.sum(1), torch.ones(3))
    assert GSP(5, 8).num_prototypes == 64  # the documented default
    assert GSP(5, 8).gem_power is None and GSP(5, 8, pooling_method="gem").gem_power.requires_grad


def straightforward_kcenter(points, k, start=None, covered=()):
    """Greedy k-center in plain Python: from ``points[start]``, or (the authors' memory
    initialization) from the distances to the ``covered`` centres, picking all k from points."""
    centres = [points[start]] if start is not None else list(covered)
    chosen = [start] if start is not None else []
    while len(chosen) < k:
        best, best_distance = None, -1.0
        for candidate in range(points.shape[0]):
            distance = min(float((points[candidate] - centre).norm()) for centre in centres)
            if distance > best_distance:
                best, best_distance = candidate, distance
        chosen.append(best)
        centres.append(points[best])
    return chosen


def _lipschitz(vectors):
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1.0)


def test_kcenter_matches_straightforward_greedy():
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))
    for start in (0, 17):
        assert kcenter_indices(points, 7, start).tolist() == straightforward_kcenter(points, 7, start)
    with pytest.raises(ValueError, match="k must be in"):
        kcenter_indices(points, 41)
    with pytest.raises(ValueError, match="points must be"):
        kcenter_indices(points[0], 1)


def test_init_prototypes_kcenter_from_maps_tokens_and_vectors():
    layer = GSP(5, 4, num_prototypes=6, normalize="none")
    feature_map = _map(dtype=torch.float32)
    indices = layer.init_prototypes_kcenter(feature_map)
    projected = layer.project(feature_map).flatten(2).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(layer.prototypes.detach(), projected[indices])
    assert indices.tolist() == straightforward_kcenter(projected.detach(), 6, 0)
    tokens = torch.randn(2, 5, 5)  # [B, N, C]
    indices = layer.init_prototypes_kcenter(PatchTokens(tokens, (1, 5)), start_index=3)
    projected = (tokens @ layer.projection.weight.T + layer.projection.bias).reshape(-1, 4)
    assert indices.tolist() == straightforward_kcenter(projected.detach(), 6, 3)
    vectors = torch.randn(20, 4)
    indices = layer.init_prototypes_kcenter(vectors, start_index=5)
    assert indices[0] == 5
    torch.testing.assert_close(layer.prototypes.detach(), vectors[indices])
    with pytest.raises(ValueError, match="6 prototypes need at least as many candidate vectors, got 3"):
        layer.init_prototypes_kcenter(torch.randn(3, 4))
    before = layer.prototypes.detach().clone()
    bad_map = feature_map.clone()
    bad_map[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.init_prototypes_kcenter(bad_map)
    assert torch.equal(layer.prototypes.detach(), before)
    with pytest.raises(ValueError, match="expected backbone features"):
        layer.init_prototypes_kcenter(torch.randn(3, 5))


def test_init_prototypes_from_proxies_is_kcenter_over_normalized_proxies():
    layer = GSP(5, 4, num_prototypes=5)  # lipschitz: distances between proxies shrunk to norm <= 1
    proxies = torch.randn(11, 4, generator=torch.Generator().manual_seed(5)) * 3.0  # [classes, E]
    indices = layer.init_prototypes_from_proxies(torch.nn.Parameter(proxies.clone()))
    assert indices.tolist() == straightforward_kcenter(_lipschitz(proxies), 5, 0)
    torch.testing.assert_close(layer.prototypes.detach(), proxies[indices])
    with pytest.raises(ValueError, match=r"proxies must be \[P, 4\]"):
        layer.init_prototypes_from_proxies(torch.randn(11, 3))
    with pytest.raises(ValueError, match=r"5 prototypes need at least as many proxies \(classes\), got 4"):
        layer.init_prototypes_from_proxies(torch.randn(4, 4))


def test_kcenter_seeded_with_covered_centres():
    points = torch.randn(30, 4, generator=torch.Generator().manual_seed(8))
    covered = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    indices = kcenter_indices(points, 6, covered=covered)
    assert indices.tolist() == straightforward_kcenter(points, 6, covered=covered)
    with pytest.raises(ValueError, match=r"covered must be \[Q, 4\]"):
        kcenter_indices(points, 2, covered=torch.randn(5, 3))


def test_memory_warm_up_pools_by_average_then_initializes_as_the_authors_tensorflow():
    """GAP with zero attributes while training forwards after the warm-up step store their
    lipschitz-normalized pooled embeddings (an overflowing batch fills the memory's tail); when
    full, k-center seeded with the first M rows picks M of the others as prototypes."""
    torch.manual_seed(6)
    layer = GSP(5, 4, num_prototypes=3, memory_size=7, warm_up_steps=1, gamma=2.0, backend="reference").double()
    batches = [_map(batch=3, seed=10 + step) * 3.0 for step in range(5)]  # [3, 5, 3, 4] each; embeddings of norm > 1
    weight, bias = layer.projection.weight.detach(), layer.projection.bias.detach()

    def average_embedding(feature_map):  # GAP of the projected map
        return feature_map.mean(dim=(2, 3)) @ weight.T + bias

    layer.eval()
    out = layer(batches[0], return_weights=True)  # eval while warming up: average, nothing stored
    torch.testing.assert_close(out.embedding, average_embedding(batches[0]))
    assert not out.attributes.any() and out.attributes.shape == (3, 3)
    torch.testing.assert_close(out.weights, torch.full((3, 3, 4), 1 / 12, dtype=torch.float64))
    assert int(layer.training_steps) == 0 and int(layer.memory_filled) == 0
    layer.train()
    for step in range(4):  # step 0 is the warm-up step; steps 1-3 store 3 + 3 + 3 embeddings in 7 rows
        out = layer(batches[step])
        torch.testing.assert_close(out.embedding, average_embedding(batches[step]))
        assert not out.attributes.any()
        out.embedding.sum().backward()  # the prototypes take part in the graph, with zero gradient
        assert not layer.prototypes.grad.any()
        assert bool(layer.prototypes_ready) == (step == 3)
    stored = [_lipschitz(average_embedding(batches[step])) for step in (1, 2, 3)]
    assert (stored[0].norm(dim=1) < 1 + 1e-12).all() and (average_embedding(batches[1]).norm(dim=1) > 1).any()
    expected_memory = torch.cat([stored[0], stored[1][:1], stored[2]])  # the third batch overwrote rows 4-6
    torch.testing.assert_close(layer.memory, expected_memory)
    chosen = straightforward_kcenter(expected_memory[3:], 3, covered=expected_memory[:3])
    torch.testing.assert_close(layer.prototypes.detach(), expected_memory[3:][chosen])
    feature_map = batches[4].requires_grad_(True)
    layer.zero_grad()
    _compare_with_straightforward(layer, feature_map, feature_map.flatten(2).transpose(1, 2))

    restored = GSP(5, 4, num_prototypes=3, memory_size=7, warm_up_steps=1, gamma=2.0, backend="reference").double()
    assert bool(restored.prototypes_ready) is False
    restored.load_state_dict(layer.state_dict())  # a resumed run pools with the prototypes at once
    torch.testing.assert_close(restored(batches[4]).embedding, layer(batches[4]).embedding)


def test_memory_with_max_pool_augmentation_stores_the_average_only():
    """During the warm-up the output carries the max-pool term (as theirs), the memory does not."""
    layer = GSP(5, 4, num_prototypes=2, memory_size=6, augment_max_pool=True, backend="reference").double()
    feature_map = _map(batch=3, seed=21)
    weight, bias = layer.projection.weight.detach(), layer.projection.bias.detach()
    average = feature_map.mean(dim=(2, 3)) @ weight.T + bias  # [3, 4]
    out = layer(feature_map)
    torch.testing.assert_close(out.embedding, average + feature_map.amax(dim=(2, 3)) @ weight.T)
    torch.testing.assert_close(layer.memory[:3], _lipschitz(average))


def test_memory_larger_than_a_batch_and_bad_memory():
    layer = GSP(5, 4, num_prototypes=2, memory_size=4, backend="reference").double()
    layer.train()
    layer(_map(batch=9, seed=20))  # one batch larger than the memory: its first 4 embeddings
    assert int(layer.memory_filled) == 4 and bool(layer.prototypes_ready)
    with pytest.raises(ValueError, match="memory_size > 0"):
        GSP(5, 4).init_prototypes_from_memory()
    fresh = GSP(5, 4, num_prototypes=2, memory_size=4)
    fresh.memory[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fresh.init_prototypes_from_memory()
    assert not bool(fresh.prototypes_ready)


def test_explicit_initialization_ends_the_warm_up():
    layer = GSP(5, 4, num_prototypes=3, memory_size=64)
    layer.init_prototypes_kcenter(_map(dtype=torch.float32))
    out = layer(_map(dtype=torch.float32))
    torch.testing.assert_close(out.attributes.sum(1), torch.ones(3))  # GSP attributes, not warm-up zeros
    assert int(layer.memory_filled) == 0


def test_bad_input_and_arguments():
    layer = GSP(5, 4)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or tokens \[B, N, C\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="built for 5 channels"):
        layer(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="built for 5 channels"):
        layer(torch.randn(2, 9, 6))
    with pytest.raises(ValueError, match="10 tokens do not fill a 3x3 grid"):
        layer(torch.randn(2, 10, 5), grid=(3, 3))
    with pytest.raises(ValueError, match="contradicts"):
        layer(PatchTokens(torch.randn(2, 9, 5), (3, 3)), grid=(1, 9))
    with pytest.raises(ValueError, match="grid is for token sequences"):
        layer(torch.randn(2, 5, 3, 3), grid=(3, 3))
    with pytest.raises(TypeError, match="Tensor or PatchTokens"):
        layer([torch.randn(2, 9, 5)])
    with pytest.raises(TypeError, match="augment_max_pool must be a bool"):
        GSP(5, 4, augment_max_pool=1)
    for kwargs, message in [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"transport_ratio": 1.5}, "transport_ratio"),
        ({"gamma": 0.0}, "gamma"),
        ({"normalize": "max"}, "normalize"),
        ({"cost": "cosine"}, "cost"),
        ({"pooling_method": "gmp"}, "pooling_method"),
        ({"gem_power": 0.0}, "gem_power"),
        ({"memory_size": 127}, r"at least 2 \* num_prototypes \(128\)"),
        ({"warm_up_steps": -1}, "warm_up_steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            GSP(5, 4, **kwargs)


def _forward_backward(layer, features):
    """Outputs and the gradients of a fixed random probe of ``layer(features)``: features,
    prototypes, projection weight, GeM power (None where absent)."""
    features = features.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(features)
    probe = torch.Generator().manual_seed(11)
    probe_e = torch.randn(out.embedding.shape, generator=probe).to(out.embedding.dtype)
    probe_a = torch.randn(out.attributes.shape, generator=probe).to(out.attributes.dtype)
    ((out.embedding * probe_e).float().sum() + (out.attributes * probe_a).float().sum()).backward()
    power = layer.gem_power.grad if layer.gem_power is not None else None
    return out, [features.grad, layer.prototypes.grad, layer.projection.weight.grad, power]


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize(
    "options", [{}, {"pooling_method": "gem", "augment_max_pool": True}, {"pooling_method": "max"}], ids=["sum", "gem+maxaug", "max"]
)
def test_every_available_backend_forward_backward_and_autocast(backend, options):
    """Each backend against the reference, forward and every gradient (the variants' gradients
    reach the plan through the pooling weights), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    layer = GSP(6, 8, num_prototypes=5, backend=backend, **options)
    reference = GSP(6, 8, num_prototypes=5, backend="reference", **options)
    reference.load_state_dict(layer.state_dict())
    feature_map = torch.randn(2, 6, 3, 5) + 0.3
    tokens = torch.randn(2, 7, 6) + 0.3  # a prime token count
    for features in (feature_map, tokens):
        out, grads = _forward_backward(layer, features)
        expected, expected_grads = _forward_backward(reference, features)
        assert rel_err(out.embedding, expected.embedding) < 1e-4
        assert rel_err(out.attributes, expected.attributes) < 1e-4
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            if expected_grad is not None:
                assert rel_err(grad, expected_grad) < 1e-4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_grads = _forward_backward(layer, features)
        assert low.embedding.dtype == torch.bfloat16
        assert low_grads[1].dtype == torch.float32 and low_grads[0].dtype == torch.float32
        assert rel_err(low.embedding, expected.embedding) < 3e-2
        for grad, expected_grad in zip(low_grads[:3], expected_grads[:3], strict=True):
            assert rel_err(grad, expected_grad) < 5e-2
        assert low_grads[3] is None or torch.isfinite(low_grads[3])  # a scalar sum of cancelling bf16 terms


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = GSP(6, 8, num_prototypes=5, backend="reference")
    feature_map = torch.randn(2, 6, 4, 4, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = layer(feature_map, return_weights=True), compiled(feature_map, return_weights=True)
    for eager_tensor, compiled_tensor in zip(eager_out, compiled_out, strict=True):
        torch.testing.assert_close(compiled_tensor, eager_tensor)
    compiled_out.embedding.sum().backward()
    compiled_grad = layer.prototypes.grad.clone()
    layer.prototypes.grad = None
    eager_out.embedding.sum().backward()
    torch.testing.assert_close(compiled_grad, layer.prototypes.grad)
