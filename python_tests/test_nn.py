"""The GSP layer: against a straightforward re-implementation, k-center init, the pooling
swap for torchvision/timm-style models, autocast, backends, torch.compile, bad input."""

import pytest
import torch
from conftest import rel_err
from torch import nn

from gsp_kernels.backends import available_backends
from gsp_kernels.nn import GSP, GSPNet, GSPOutput, kcenter_indices, replace_global_pool


def straightforward_gsp_layer(feature_map, weight, bias, prototypes, mu, gamma, iterations=3000):
    """Projection as an einsum, then the paper's fixed-point iteration unrolled (float64,
    differentiable by autograd): returns (embedding [B, E], attributes [B, M], weights [B, N])."""
    projected = torch.einsum("bchw,ec->bhwe", feature_map, weight) + bias  # [B, H, W, E]
    x = projected.flatten(1, 2)  # [B, N, E]
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
    transported = plan.sum(-1)  # [B, N]
    weights = transported / mu
    embedding = torch.einsum("bn,bne->be", weights, x)
    attributes = plan.sum(1) / mu
    return embedding, attributes, weights


def _inputs(batch=3, channels=5, height=3, width=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


def test_layer_matches_straightforward_reimplementation_forward_and_gradients():
    torch.manual_seed(1)
    layer = GSP(5, 6, num_prototypes=4, transport_ratio=0.4, gamma=3.0, backend="reference").double()
    feature_map = _inputs().requires_grad_(True)
    out = layer(feature_map, return_weights=True)
    weight = layer.projection.weight.detach().clone().requires_grad_(True)
    bias = layer.projection.bias.detach().clone().requires_grad_(True)
    prototypes = layer.prototypes.detach().clone().requires_grad_(True)
    map_copy = feature_map.detach().clone().requires_grad_(True)
    ref = straightforward_gsp_layer(map_copy, weight, bias, prototypes, 0.4, 3.0)
    assert rel_err(out.embedding, ref[0]) < 1e-8
    assert rel_err(out.attributes, ref[1]) < 1e-8
    assert rel_err(out.weights.flatten(1), ref[2]) < 1e-8
    probe_e, probe_a = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    ((out.embedding * probe_e).sum() + (out.attributes * probe_a).sum()).backward()
    ((ref[0] * probe_e).sum() + (ref[1] * probe_a).sum()).backward()
    assert rel_err(feature_map.grad, map_copy.grad) < 1e-7
    assert rel_err(layer.prototypes.grad, prototypes.grad) < 1e-7
    assert rel_err(layer.projection.weight.grad, weight.grad) < 1e-7
    assert rel_err(layer.projection.bias.grad, bias.grad) < 1e-7


def test_output_type_shapes_and_normalization():
    layer = GSP(5, 8, num_prototypes=6)
    out = layer(_inputs(dtype=torch.float32))
    assert isinstance(out, GSPOutput) and out.weights is None
    assert out.embedding.shape == (3, 8) and out.attributes.shape == (3, 6)
    out = layer(_inputs(dtype=torch.float32), return_weights=True)
    assert out.weights.shape == (3, 3, 4)
    torch.testing.assert_close(out.weights.sum(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(out.attributes.sum(1), torch.ones(3))
    assert GSP(5, 8).num_prototypes == 64  # the documented default


def straightforward_kcenter(points, k, start):
    chosen = [start]
    while len(chosen) < k:
        best, best_distance = None, -1.0
        for candidate in range(points.shape[0]):
            distance = min(float((points[candidate] - points[c]).norm()) for c in chosen)
            if distance > best_distance:
                best, best_distance = candidate, distance
        chosen.append(best)
    return chosen


def test_kcenter_matches_straightforward_greedy():
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))
    for start in (0, 17):
        assert kcenter_indices(points, 7, start).tolist() == straightforward_kcenter(points, 7, start)
    with pytest.raises(ValueError, match="k must be in"):
        kcenter_indices(points, 41)
    with pytest.raises(ValueError, match="points must be"):
        kcenter_indices(points[0], 1)


def test_init_prototypes_kcenter_from_maps_and_vectors():
    layer = GSP(5, 4, num_prototypes=6, normalize="none")
    feature_map = _inputs(dtype=torch.float32)
    indices = layer.init_prototypes_kcenter(feature_map)
    projected = layer.project(feature_map).flatten(2).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(layer.prototypes.detach(), projected[indices])
    assert indices.tolist() == straightforward_kcenter(projected.detach(), 6, 0)
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
    with pytest.raises(ValueError, match="expected backbone maps"):
        layer.init_prototypes_kcenter(torch.randn(3, 5))


def test_bad_input_and_arguments():
    layer = GSP(5, 4)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="built for 5 channels"):
        layer(torch.randn(2, 6, 3, 3))
    for kwargs, message in [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"transport_ratio": 1.5}, "transport_ratio"),
        ({"gamma": 0.0}, "gamma"),
        ({"normalize": "max"}, "normalize"),
        ({"cost": "cosine"}, "cost"),
    ]:
        with pytest.raises(ValueError, match=message):
            GSP(5, 4, **kwargs)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_every_available_backend_float32_and_autocast(backend):
    torch.manual_seed(0)
    layer = GSP(6, 8, num_prototypes=5, backend=backend)
    feature_map = torch.randn(4, 6, 3, 5, requires_grad=True)
    out = layer(feature_map)
    reference = GSP(6, 8, num_prototypes=5, backend="reference")
    reference.load_state_dict(layer.state_dict())
    expected = reference(feature_map)
    assert rel_err(out.embedding, expected.embedding) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(feature_map)
    assert low.embedding.dtype == torch.bfloat16
    (low.embedding.float().square().sum() + low.attributes.float().square().sum()).backward()
    assert layer.prototypes.grad.dtype == torch.float32 and torch.isfinite(layer.prototypes.grad).all()
    assert rel_err(low.embedding, expected.embedding) < 3e-2


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = GSP(6, 8, num_prototypes=5, backend="reference")
    feature_map = torch.randn(2, 6, 4, 4, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = layer(feature_map, return_weights=True), compiled(feature_map, return_weights=True)
    for eager_tensor, compiled_tensor in zip(eager_out, compiled_out):
        torch.testing.assert_close(compiled_tensor, eager_tensor)
    compiled_out.embedding.sum().backward()
    compiled_grad = layer.prototypes.grad.clone()
    layer.prototypes.grad = None
    eager_out.embedding.sum().backward()
    torch.testing.assert_close(compiled_grad, layer.prototypes.grad)


class TorchvisionLikeNet(nn.Module):
    """Mimics a torchvision ResNet: children run in order, then avgpool, flatten, fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.relu(self.conv1(x)))), 1))


class TimmLikeNet(nn.Module):
    """Mimics a timm model: forward_features, global_pool, forward_head, reset_classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.num_features = 12
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward_features(self, x):
        return self.stem(x)

    def forward_head(self, x, pre_logits=False):
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes, global_pool="avg"):
        self.fc = nn.Identity()

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("make_model", [TorchvisionLikeNet, TimmLikeNet])
def test_replace_global_pool_with_stand_ins(make_model):
    model = make_model()
    net = replace_global_pool(model, 16, num_prototypes=4, transport_ratio=0.5)
    assert isinstance(net, GSPNet) and net.gsp.in_channels == 12 and net.gsp.transport_ratio == 0.5
    images = torch.randn(2, 3, 8, 8)
    features = model.layer1(model.relu(model.conv1(images))) if make_model is TorchvisionLikeNet else model.stem(images)
    out = net(images, return_weights=True)
    expected = net.gsp(features, return_weights=True)
    torch.testing.assert_close(out.embedding, expected.embedding)
    assert out.weights.shape == (2, 4, 4)
    assert not any(isinstance(module, nn.Linear) and module.out_features == 10 for module in net.modules())
    with pytest.raises(ValueError, match="neither an 'avgpool'"):
        replace_global_pool(nn.Sequential(nn.Conv2d(3, 4, 1)), 8)


def _import_or_skip(name):
    try:
        return __import__(name)
    except Exception as exc:  # noqa: BLE001 - torchvision may be installed but unusable with this torch build
        pytest.skip(f"{name} unavailable: {exc}")


def test_replace_global_pool_real_torchvision_resnet():
    torchvision = _import_or_skip("torchvision")
    net = replace_global_pool(torchvision.models.resnet18(weights=None), 32, num_prototypes=8)
    out = net(torch.randn(2, 3, 64, 64), return_weights=True)
    assert out.embedding.shape == (2, 32) and out.weights.shape == (2, 2, 2)


def test_replace_global_pool_real_timm_model():
    timm = _import_or_skip("timm")
    net = replace_global_pool(timm.create_model("resnet18", pretrained=False), 32, num_prototypes=8)
    out = net(torch.randn(2, 3, 64, 64))
    assert out.embedding.shape == (2, 32) and out.attributes.shape == (2, 8)
