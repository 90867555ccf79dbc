"""GSP on real backbones (timm ViT, distilled DeiT, ViT with registers, timm CNNs, torchvision
ResNet and ViT; randomly initialized, small configs): the pooling swap, forward and backward
through every backend that runs here, weights on the patch grid, features checked against the
libraries' own feature extractors; arch names; pretrained weights from local files and caches."""

import copy
import re

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from gsp_kernels.backends import available_backends
from gsp_kernels.nn import GSPNet, replace_global_pool
from gsp_kernels.nn.arch import resolve_arch
from gsp_kernels.nn.backbones import PatchTokens, check_image_size
from gsp_kernels.nn.pretrained import cached_weights_path, load_backbone_weights
from gsp_kernels.testing import rel_err
from gsp_kernels.training.models import build_model


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _torchvision_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


def _timm_intermediates(model, images):  # timm's own patch-token map, prefix tokens removed
    return model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]


def _timm_own_head_per_local_feature(model, images):
    """The unmodified model's own ``forward_head(pre_logits=True)`` (with its global pooling) on
    each local feature alone: every 1x1 crop of a CNN's map, or the prefix tokens with one patch
    token of an average-pooling transformer; ``[B, C', h, w]``."""
    features = model.forward_features(images)
    if features.dim() == 4:  # [B, C, h, w]
        rows = [
            torch.stack([model.forward_head(features[:, :, i : i + 1, j : j + 1], pre_logits=True) for j in range(features.shape[3])], -1)
            for i in range(features.shape[2])
        ]
        return torch.stack(rows, -2)
    prefix = model.num_prefix_tokens
    per_token = [model.forward_head(torch.cat([features[:, :prefix], features[:, i : i + 1]], 1), pre_logits=True) for i in range(prefix, features.shape[1])]
    side = int(len(per_token) ** 0.5)
    return torch.stack(per_token, -1).reshape(features.shape[0], -1, side, side)


def _torchvision_nodes(node):  # torchvision's FX feature extractor: an independent forward
    def extract(model, images):
        features = create_feature_extractor(model, {node: "out"})(images)["out"]
        if features.dim() == 3:  # ViT encoder output: drop the class token, tokens -> grid
            side = int((features.shape[1] - 1) ** 0.5)
            return features[:, 1:].transpose(1, 2).reshape(features.shape[0], -1, side, side)
        return features

    return extract


# id: (factory, image height, width, expected grid, reference local features)
MODELS = {
    "timm-vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, depth=2), 32, 32, (2, 2), _timm_intermediates),
    "timm-deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, depth=1), 32, 32, (2, 2), _timm_intermediates),
    "timm-vit_reg4_dinov2": (_timm("vit_small_patch14_reg4_dinov2", img_size=42, depth=1), 42, 42, (3, 3), _timm_intermediates),
    "timm-vit_dynamic_other_size": (
        _timm("vit_tiny_patch16_224", img_size=32, depth=1, reg_tokens=2, dynamic_img_size=True),
        48,
        64,
        (3, 4),
        _timm_intermediates,
    ),
    "timm-resnet10t": (_timm("resnet10t"), 64, 64, (2, 2), _timm_intermediates),
    "timm-swin_nhwc": (
        _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
        64,
        64,
        (2, 2),
        _timm_intermediates,
    ),
    "timm-vit_avg_fc_norm": (_timm("vit_tiny_patch16_224", img_size=32, depth=1, global_pool="avg"), 32, 32, (2, 2), _timm_own_head_per_local_feature),
    "timm-convnext_atto": (_timm("convnext_atto"), 64, 64, (2, 2), _timm_own_head_per_local_feature),  # head.norm
    "timm-convnext_hidden_head": (_timm("convnext_atto", head_hidden_size=48), 64, 64, (2, 2), _timm_own_head_per_local_feature),
    "timm-mobilenetv3": (_timm("mobilenetv3_small_050"), 64, 64, (2, 2), _timm_own_head_per_local_feature),  # conv_head
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), 64, 64, (2, 2), _timm_own_head_per_local_feature),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(weights=None), 64, 64, (2, 2), _torchvision_nodes("layer4")),
    "torchvision-googlenet_aux": (
        lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True), 64, 64, (2, 2), _torchvision_nodes("inception5b")
    ),
    "torchvision-efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), 64, 64, (2, 2), _torchvision_nodes("features")),
    "torchvision-vit": (_torchvision_vit, 32, 32, (4, 4), _torchvision_nodes("encoder")),
}


def _timm_set_input_size_intermediates(model, images):
    """timm's own resize of a fixed-size model (``set_input_size``: the position embedding
    resampled once), then its own patch-token map at the images' size, through its ``fc_norm``
    (an identity but for average-pooling models, EVA's)."""
    model.set_input_size(img_size=tuple(images.shape[-2:]))
    return model.fc_norm(_timm_intermediates(model, images).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _torchvision_own_head_per_local_feature(model, images):
    """The unmodified torchvision model's own ``avgpool`` and classifier without its final Linear
    on each 1x1 crop of its ``features`` map (flattened first unless the classifier has a Flatten,
    as its forward does): ``[B, C', h, w]``."""
    features = model.features(images)
    layers = list(model.classifier)[:-1]
    flattens = any(isinstance(layer, nn.Flatten) for layer in layers)

    def head(crop):
        pooled = model.avgpool(crop)
        pooled = pooled if flattens else torch.flatten(pooled, 1)
        for layer in layers:
            pooled = layer(pooled)
        return pooled

    rows = [torch.stack([head(features[:, :, i : i + 1, j : j + 1]) for j in range(features.shape[3])], -1) for i in range(features.shape[2])]
    return torch.stack(rows, -2)


def _torchvision_vit_pre_logits(model, images):  # the encoder's patch tokens through heads' pre_logits + Tanh, per token
    tokens = _torchvision_nodes("encoder")(model, images)  # [B, C, h, w]
    return model.heads.act(model.heads.pre_logits(tokens.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


MODELS.update(
    {
        "timm-vit_fixed_size_other_size": (_timm("vit_tiny_patch16_224", img_size=32, depth=1), 48, 64, (3, 4), _timm_set_input_size_intermediates),
        "timm-deit_distilled_fixed_other_size": (
            _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=1), 64, 48, (4, 3), _timm_set_input_size_intermediates
        ),
        "timm-eva_fixed_other_size": (
            _timm("eva_giant_patch14_224", img_size=28, depth=1, embed_dim=64, num_heads=2), 42, 56, (3, 4), _timm_set_input_size_intermediates
        ),
        "torchvision-convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None), 64, 64, (2, 2), _torchvision_own_head_per_local_feature),
        "torchvision-mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 64, 64, (2, 2), _torchvision_own_head_per_local_feature),
        "torchvision-vit_representation": (
            lambda: torchvision.models.VisionTransformer(
                image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128, representation_size=48
            ),
            32,
            32,
            (4, 4),
            _torchvision_vit_pre_logits,
        ),
    }
)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("model_id", list(MODELS))
def test_swap_forward_backward_weights_on_the_patch_grid(model_id, backend):
    factory, height, width, grid, _ = MODELS[model_id]
    torch.manual_seed(0)
    model = factory()
    net = replace_global_pool(model, 16, num_prototypes=4, backend=backend)
    assert isinstance(net, GSPNet)
    assert not any(isinstance(module, nn.Linear) and module.out_features == 1000 for module in net.modules())  # classifier gone
    images = torch.randn(2, 3, height, width)
    out = net(images, return_weights=True)
    assert out.embedding.shape == (2, 16) and out.attributes.shape == (2, 4)
    assert out.weights.shape == (2, *grid)  # patches only: no weight for prefix tokens
    torch.testing.assert_close(out.weights.sum(dim=(1, 2)), torch.ones(2))
    (out.embedding.square().sum() + out.attributes.square().sum()).backward()
    unused = [name for name, parameter in net.named_parameters() if parameter.grad is None]
    assert unused == []  # DistributedDataParallel (without find_unused_parameters) needs every one used
    assert all(torch.isfinite(parameter.grad).all() for parameter in net.parameters())
    for parameter in (next(net.trunk.parameters()), net.gsp.prototypes, net.gsp.projection.weight):
        assert parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("model_id", list(MODELS))
def test_pooled_features_are_the_libraries_own_local_features(model_id):
    """GSP on the swapped model equals GSP on the patch-token map extracted by timm's
    ``forward_intermediates`` / torchvision's FX feature extractor: same tokens, same grid order."""
    factory, height, width, grid, reference_features = MODELS[model_id]
    torch.manual_seed(1)
    model = factory().eval()
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        reference_map = reference_features(copy.deepcopy(model), images)  # [B, C, h, w]
        net = replace_global_pool(model, 12, num_prototypes=3, backend="reference").eval()
        out = net(images, return_weights=True)
        expected = net.gsp(reference_map, return_weights=True)
    assert reference_map.shape[2:] == grid
    assert rel_err(out.embedding, expected.embedding) < 1e-5
    assert rel_err(out.attributes, expected.attributes) < 1e-5
    assert rel_err(out.weights, expected.weights) < 1e-5


def test_efficientnet_features_average_to_timms_own_pre_logits():
    """With transport_ratio 1, GSP is GAP: the embedding is the projection of timm's own pooled features."""
    torch.manual_seed(2)
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)  # [B, 1280]
        net = replace_global_pool(model, 8, num_prototypes=2, transport_ratio=1.0).eval()
        torch.testing.assert_close(net(images).embedding, net.gsp.projection(pooled), rtol=1e-5, atol=1e-5)


def test_backbone_errors_are_clear():
    with pytest.raises(ValueError, match="looked for a timm model .*VisionTransformer.*'avgpool'"):
        replace_global_pool(nn.Sequential(nn.Conv2d(3, 4, 1)), 8)
    with pytest.raises(TypeError, match="nn.Module"):
        replace_global_pool("resnet18", 8)
    with pytest.raises(ValueError, match=r"AlexNet's 'avgpool' is AdaptiveAvgPool2d\(output_size=\(6, 6\)\), not a global"):
        replace_global_pool(torchvision.models.alexnet(weights=None), 8)
    with pytest.raises(ValueError, match="transform_input=True"):
        replace_global_pool(torchvision.models.googlenet(weights=None, transform_input=True, init_weights=False), 8)
    net = replace_global_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1), 8, num_prototypes=2)
    net.trunk.num_prefix_tokens = 0  # as if the class token were counted as a patch
    with pytest.raises(ValueError, match="5 patch tokens for a 2x2 patch grid"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or tokens"):
        net.gsp(torch.randn(2, 192))


def test_the_issues_first_batch_at_full_size():
    """The report that opened the issue: a default timm ViT, swapped, on a 224x224 batch."""
    net = replace_global_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False), 64)
    out = net(torch.randn(1, 3, 224, 224), return_weights=True)
    assert out.embedding.shape == (1, 64) and out.attributes.shape == (1, 64) and out.weights.shape == (1, 14, 14)
    torch.testing.assert_close(out.weights.sum(), torch.tensor(1.0))


def test_finding_a_parametric_head_keeps_every_modules_mode():
    model = timm.create_model("convnext_atto", pretrained=False)
    model.stages[0].eval()  # e.g. a frozen stage
    net = replace_global_pool(model, 8, num_prototypes=2)
    assert net.trunk.head_per_position and net.trunk.num_features == 320
    assert model.training and model.head.norm.training and not model.stages[0].training
    assert not any(module.training for module in model.stages[0].modules())


def test_patch_tokens_of_a_swapped_vit_pool_like_plain_tokens_with_a_grid():
    net = replace_global_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1), 8, num_prototypes=2)
    features = net.features(torch.randn(2, 3, 32, 32))
    assert isinstance(features, PatchTokens) and features.grid == (2, 2) and features.tokens.shape == (2, 4, 192)
    from_tokens = net.gsp(features.tokens, grid=(2, 2), return_weights=True)
    torch.testing.assert_close(net.gsp(features, return_weights=True).weights, from_tokens.weights)
    assert net.gsp(features.tokens, return_weights=True).weights.shape == (2, 4)  # no grid known: [B, N]


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("smallcnn", ("smallcnn", "smallcnn")),
        ("resnet50", ("torchvision", "resnet50")),
        ("vit_b_16", ("torchvision", "vit_b_16")),
        ("googlenet", ("torchvision", "googlenet")),
        ("efficientnet_b0", ("timm", "efficientnet_b0")),  # both libraries have it: timm's
        ("hf-hub:timm/convnext_atto.d2_in1k", ("timm", "convnext_atto.d2_in1k")),
        ("timm:resnet50", ("timm", "resnet50")),
        ("timm/vit_small_patch14_dinov2.lvd142m", ("timm", "vit_small_patch14_dinov2.lvd142m")),
        ("vit_tiny_patch16_224", ("timm", "vit_tiny_patch16_224")),
        ("deit_small_distilled_patch16_224", ("timm", "deit_small_distilled_patch16_224")),
    ],
)
def test_arch_names(arch, expected):
    assert resolve_arch(arch) == expected


def test_bad_arch_names():
    with pytest.raises(ValueError, match="unknown arch 'vit_nonexistent'"):
        resolve_arch("vit_nonexistent")
    with pytest.raises(ValueError, match="timm has no model 'not_a_model'"):
        resolve_arch("timm:not_a_model")


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_build_model_sizes_the_head_from_the_backbone(pooling):
    model = build_model("timm:vit_tiny_patch16_224", pooling, 16, num_prototypes=4, backbone_kwargs={"depth": 1})
    assert model.head.projection.in_features == 192
    out = model(torch.randn(2, 3, 48, 32), return_weights=True)  # dynamic image size: a 3x2 grid
    assert out.embedding.shape == (2, 16) and out.weights.shape == (2, 3, 2)
    torch.testing.assert_close(out.weights.sum(dim=(1, 2)), torch.ones(2))
    assert (out.attributes is None) == (pooling == "gap")
    if pooling == "gsp":
        parity = build_model("timm:vit_tiny_patch16_224", "gsp", 16, solver="fixed_point", max_iter=100, backbone_kwargs={"depth": 1})
        assert (parity.head.solver, parity.head.max_iter) == ("fixed_point", 100)


def test_gsp_with_transport_ratio_one_is_the_gap_baseline_on_a_head_per_position_backbone():
    """Both heads pool the same local features (ConvNeXt's head norm at every position)."""
    torch.manual_seed(4)
    gap = build_model("timm:convnext_atto", "gap", 8)
    gsp = build_model("timm:convnext_atto", "gsp", 8, num_prototypes=2, transport_ratio=1.0)
    gsp.trunk.load_state_dict(gap.trunk.state_dict())
    gsp.head.projection.load_state_dict(gap.head.projection.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gsp.eval()(images).embedding, gap.eval()(images).embedding, rtol=1e-5, atol=1e-5)


TINY_VIT = {"img_size": 32, "depth": 1}


def _save_safetensors(module, path) -> None:
    """``module``'s state dict as a .safetensors file (contiguous tensors, as the format needs)."""
    save_file({key: value.contiguous() for key, value in module.state_dict().items()}, str(path))


def _assert_trunk_holds(module, state):
    own = module.state_dict()
    for key, value in state.items():
        if key in own:
            assert torch.equal(own[key], value), key


def test_pretrained_safetensors_timm_checkpoint(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    path = tmp_path / "vit.safetensors"
    _save_safetensors(source, path)
    with pytest.warns(UserWarning, match="2 unexpected"):
        model = build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=str(path), backbone_kwargs=TINY_VIT)
    report = model.pretrained_report
    assert report.missing == [] and sorted(report.unexpected) == ["head.bias", "head.weight"]  # the removed classifier
    assert report.loaded == len(source.state_dict()) - 2
    _assert_trunk_holds(model.trunk.model, source.state_dict())


def test_pretrained_torchvision_checkpoint_wrapped_by_ddp_and_resampled_timm_vit(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {"module." + key: value for key, value in source.state_dict().items()}}, path)
    with pytest.warns(UserWarning, match="fc.weight"):
        model = build_model("resnet18", "gsp", 16, pretrained=path)
    _assert_trunk_holds(model.trunk, source.state_dict())
    assert model.pretrained_report.missing == []
    # A ViT checkpoint at 32 px loaded into a model built for 48 px: timm's filter resamples pos_embed.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    vit_path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), vit_path)
    with pytest.warns(UserWarning):
        bigger = build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=vit_path, backbone_kwargs={"img_size": 48, "depth": 1})
    assert bigger.trunk.model.pos_embed.shape == (1, 10, 192)
    torch.testing.assert_close(bigger.trunk.model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_pretrained_refuses_checkpoints_of_other_architectures(tmp_path):
    resnet_path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet_path)
    with pytest.raises(ValueError, match="matches none of the .* tensors of VisionTransformer"):
        build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=resnet_path, backbone_kwargs=TINY_VIT)
    small_path = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_VIT).state_dict(), small_path)
    with pytest.raises(ValueError, match="shapes differ"):
        build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=small_path, backbone_kwargs=TINY_VIT)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at .*missing.pth.*'cache'"):
        build_model("resnet18", "gsp", 16, pretrained=tmp_path / "missing.pth")
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone_weights(torchvision.models.resnet18(weights=None), not_a_checkpoint)
    with pytest.raises(ValueError, match="smallcnn has no pretrained weights"):
        build_model("smallcnn", pretrained=resnet_path)


def test_cached_weights_are_found_offline_in_the_hugging_face_and_torch_hub_caches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"looked at: .*hf/models--timm--vit_tiny_patch16_224\.augreg_in21k_ft_in1k"):
        build_model("timm:vit_tiny_patch16_224", pretrained="cache", backbone_kwargs=TINY_VIT)
    with pytest.raises(FileNotFoundError, match=r"torch/hub/checkpoints/resnet18-f37072fd\.pth"):
        cached_weights_path("resnet18")

    # A cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<revision>/).
    repo = tmp_path / "hf" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    _save_safetensors(source, repo / "snapshots" / "0123abcd" / "model.safetensors")
    with pytest.warns(UserWarning, match="unexpected"):
        model = build_model("timm:vit_tiny_patch16_224", pretrained="cache", backbone_kwargs=TINY_VIT)
    _assert_trunk_holds(model.trunk.model, source.state_dict())

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    with pytest.warns(UserWarning, match="fc.bias"):
        model = build_model("resnet18", pretrained=True)
    _assert_trunk_holds(model.trunk, resnet.state_dict())


def test_train_cli_loads_a_pretrained_timm_checkpoint(tmp_path, capsys):
    from gsp_kernels.cli import main

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit.safetensors"
    _save_safetensors(source, path)
    loaded = len(source.state_dict()) - 2  # all but the classifier
    flags = ["--arch", "timm:vit_tiny_patch16_224", "--pretrained", str(path), "--epochs", "1", "--steps-per-epoch", "1",
             "--batch-size", "20", "--no-progress", "--pooling-method", "gem", "--augment-max-pool", "--output-dir", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match=re.escape(f"loaded {loaded} tensors from {path}; 2 unexpected (ignored): head.bias, head.weight")):
        assert main(["train", *flags]) == 0
    assert "recall@1" in capsys.readouterr().out

    # The trained run's checkpoint loads back as pretrained backbone weights (its head and loss ignored).
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    trained = torch.load(checkpoint, weights_only=False)["objective"]  # written by this test
    with pytest.warns(UserWarning, match=r"unexpected \(ignored\): .*head\.prototypes"):
        model = build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=checkpoint)
    assert model.pretrained_report.loaded == loaded and model.pretrained_report.missing == []
    torch.testing.assert_close(model.trunk.model.blocks[0].attn.qkv.weight, trained["model.trunk.model.blocks.0.attn.qkv.weight"])
    assert not torch.equal(trained["model.trunk.model.blocks.0.attn.qkv.weight"], source.blocks[0].attn.qkv.weight)  # it trained


def test_train_with_memory_and_proxy_prototype_initialization(monkeypatch, capsys):
    from gsp_kernels.cli import main
    from gsp_kernels.nn import GSP

    seen = []
    original_kcenter, original_memory = GSP.init_prototypes_kcenter, GSP.init_prototypes_from_memory

    def spy_kcenter(self, features, start_index=0):
        seen.append(tuple(features.shape))
        return original_kcenter(self, features, start_index)

    def spy_memory(self):
        seen.append(("memory", int(self.memory_filled)))
        return original_memory(self)

    monkeypatch.setattr(GSP, "init_prototypes_kcenter", spy_kcenter)
    monkeypatch.setattr(GSP, "init_prototypes_from_memory", spy_memory)
    common = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "20", "--width", "8", "--no-progress", "--num-prototypes", "4"]
    assert main(["train", *common, "--prototype-init", "memory", "--prototype-memory", "30"]) == 0
    assert seen == [("memory", 30)]  # k-center over the full memory, once (the second batch filled it)
    seen.clear()
    assert main(["train", *common, "--metric-loss", "proxyanchor", "--prototype-init", "proxies"]) == 0
    assert seen == [(5, 64)]  # the 5 training classes' proxies
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arch", "timm:not_a_model"], "timm has no model 'not_a_model'"),
        (["--arch", "resnet18", "--pretrained", "missing.pth"], "no such file"),
        (["--pretrained", "cache"], "smallcnn has no pretrained weights"),
        (["--prototype-init", "proxies"], "proxyanchor"),
    ],
)
def test_train_cli_rejects_bad_backbone_settings(flags, message, capsys):
    from gsp_kernels.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags, "--no-progress"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_compile_channels_last_and_autocast_through_the_wrappers():
    """torch.compile (fullgraph) of a swapped ViT (PatchTokens) and of a ConvNeXt (head per
    position) gives eager's outputs and gradients; channels_last images and model give the same
    results; bf16 autocast runs forward and backward."""
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, dynamic_img_size=True)
    for model, size in ((vit, 32), (timm.create_model("convnext_atto", pretrained=False), 64)):
        net = replace_global_pool(model, 8, num_prototypes=3, backend="reference").eval()
        images = torch.randn(2, 3, size, size)
        eager = net(images, return_weights=True)
        eager.embedding.square().sum().backward()
        eager_grad = net.gsp.projection.weight.grad.clone()
        net.zero_grad()
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)(images, return_weights=True)
        for compiled_tensor, eager_tensor in zip(compiled, eager, strict=True):
            torch.testing.assert_close(compiled_tensor, eager_tensor)
        compiled.embedding.square().sum().backward()
        torch.testing.assert_close(net.gsp.projection.weight.grad, eager_grad)
        with torch.no_grad():
            channels_last = net.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last), return_weights=True)
        for tensor, eager_tensor in zip(channels_last, eager, strict=True):
            torch.testing.assert_close(tensor, eager_tensor, rtol=1e-4, atol=1e-5)
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(images)
        assert low.embedding.dtype == torch.bfloat16 and rel_err(low.embedding, eager.embedding) < 5e-2
        low.embedding.float().square().sum().backward()
        assert all(torch.isfinite(parameter.grad).all() for parameter in net.parameters() if parameter.grad is not None)


def test_pretrained_torchvision_vit_partial_checkpoint_and_wrapped_gspnet(tmp_path):
    """A torchvision ViT state dict (its heads unexpected), one with a tensor dropped (reported
    missing, left as initialized), and a saved GSPNet (its trunk loads, its GSP head is unexpected)."""
    from gsp_kernels.nn.backbones import TorchvisionViTBackbone

    source = _torchvision_vit()
    state = source.state_dict()
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    target = TorchvisionViTBackbone(_torchvision_vit())
    with pytest.warns(UserWarning, match="2 unexpected"):
        report = load_backbone_weights(target, path)
    assert sorted(report.unexpected) == ["heads.head.bias", "heads.head.weight"] and report.missing == []
    _assert_trunk_holds(target.model, state)

    partial = {key: value for key, value in state.items() if key != "encoder.layers.encoder_layer_0.mlp.0.weight"}
    torch.save(partial, path)
    fresh = TorchvisionViTBackbone(_torchvision_vit())
    initial = fresh.model.encoder.layers[0].mlp[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"1 missing \(left as initialized\): encoder\.layers\.encoder_layer_0\.mlp\.0\.weight"):
        report = load_backbone_weights(fresh, path)
    assert report.missing == ["encoder.layers.encoder_layer_0.mlp.0.weight"]
    torch.testing.assert_close(fresh.model.encoder.layers[0].mlp[0].weight, initial)

    net = replace_global_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT), 8, num_prototypes=2)
    gspnet_path = tmp_path / "gspnet.safetensors"
    _save_safetensors(net, gspnet_path)
    with pytest.warns(UserWarning, match=r"unexpected \(ignored\): gsp\."):
        model = build_model("timm:vit_tiny_patch16_224", "gsp", 16, pretrained=gspnet_path, backbone_kwargs=TINY_VIT)
    assert model.pretrained_report.missing == []
    _assert_trunk_holds(model.trunk.model, net.trunk.model.state_dict())


# Image sizes: a timm ViT built for one size takes any size its patch size divides; the rest say how.

FIXED_SIZE_TIMM_VITS = {
    "vit": (_timm("vit_tiny_patch16_224", img_size=32, depth=1), 16),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, depth=1), 16),
    "dinov2_reg4": (_timm("vit_small_patch14_reg4_dinov2", img_size=42, depth=1), 14),
    "eva": (_timm("eva_giant_patch14_224", img_size=28, depth=1, embed_dim=64, num_heads=2), 14),
}


@pytest.mark.parametrize("model_id", list(FIXED_SIZE_TIMM_VITS))
def test_a_fixed_size_timm_vit_takes_any_size_its_patch_size_divides(model_id):
    """The swapped model equals timm's own ``dynamic_img_size=True`` model (same weights) at
    other sizes; a size the patch size does not divide is a ValueError naming both."""
    factory, patch = FIXED_SIZE_TIMM_VITS[model_id]
    torch.manual_seed(5)
    model = factory().eval()
    dynamic = copy.deepcopy(model)
    net = replace_global_pool(model, 8, num_prototypes=2, backend="reference").eval()
    assert model.dynamic_img_size  # timm's own mode, set in place
    for height, width in ((2 * patch, 2 * patch), (3 * patch, 5 * patch), (4 * patch, 2 * patch)):
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            features = net.features(images)
            expected = _timm_set_input_size_intermediates(copy.deepcopy(dynamic), images)  # timm's own resize of the unmodified model
            out = net(images, return_weights=True)
        assert features.grid == (height // patch, width // patch) and out.weights.shape == (2, height // patch, width // patch)
        torch.testing.assert_close(features.tokens.transpose(1, 2).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
        check_image_size(net, height) if height == width else None
    bad = 2 * patch + 3
    message = rf"image size {bad}x{bad} is not a multiple of {type(model).__name__}'s patch size {patch}x{patch}"
    with pytest.raises(ValueError, match=message):
        net(torch.randn(1, 3, bad, bad))
    with pytest.raises(ValueError, match=message):
        check_image_size(net, bad)
    with pytest.raises(ValueError, match=rf"image size {2 * patch}x{bad} is not a multiple"):
        net(torch.randn(1, 3, 2 * patch, bad))


def test_the_docs_dinov2_example_runs_at_224():
    """docs/layer.md's ``replace_global_pool(timm.create_model("vit_small_patch14_dinov2"), ...)``
    (built for 518 px) on 224 px images: a 16x16 grid."""
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1)
    net = replace_global_pool(model, 32, num_prototypes=4)
    check_image_size(net, 224)
    out = net(torch.randn(1, 3, 224, 224), return_weights=True)
    assert out.embedding.shape == (1, 32) and out.weights.shape == (1, 16, 16)
    assert net(torch.randn(1, 3, 518, 518), return_weights=True).weights.shape == (1, 37, 37)


@pytest.mark.parametrize(
    "factory, built",
    [
        (_timm("beit_base_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2), 32),  # relative position bias
        (_timm("eva02_tiny_patch14_224", img_size=28, depth=1), 28),  # rotary embedding cached for its grid
    ],
    ids=["beit", "eva02_rope"],
)
def test_timm_transformers_that_cannot_switch_size_say_how(factory, built):
    """Before timm's assertion: a ValueError naming the built size and what to call; doing what it
    says (``set_input_size`` before the swap) works."""
    model = factory()
    net = replace_global_pool(model, 8, num_prototypes=2)
    other = built + (16 if built % 16 == 0 else 14)
    message = rf"takes {built}x{built} images only .* got {other}x{other}: .*img_size={other}.*set_input_size\(img_size=\({other}, {other}\)\)"
    with pytest.raises(ValueError, match=message):
        net(torch.randn(1, 3, other, other))
    with pytest.raises(ValueError, match=message):
        check_image_size(net, other)
    check_image_size(net, built)
    resized = factory()
    resized.set_input_size(img_size=(other, other))
    assert replace_global_pool(resized, 8, num_prototypes=2)(torch.randn(1, 3, other, other)).embedding.shape == (1, 8)


def test_torchvision_vit_at_another_size_says_how_to_build_one():
    """torchvision has no way to run a ViT at another size than its image_size: a ValueError at
    the forward (before torchvision's assertion) and from check_image_size; its advice works."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    model = _torchvision_vit()
    state = copy.deepcopy(model.state_dict())
    net = replace_global_pool(model, 8, num_prototypes=2)
    message = r"VisionTransformer takes 32x32 images only .* got 48x48: use 32 px images, .*patch size 8\).*image_size=SIZE.*interpolate_embeddings"
    with pytest.raises(ValueError, match=message):
        net(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=message):
        check_image_size(net, 48)
    with pytest.raises(ValueError, match="got 32x40"):
        net(torch.randn(1, 3, 32, 40))
    check_image_size(net, 32)
    bigger = torchvision.models.VisionTransformer(image_size=48, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    bigger.load_state_dict(interpolate_embeddings(48, 8, state))
    bigger_net = replace_global_pool(bigger, 8, num_prototypes=2)
    check_image_size(bigger_net, 48)
    assert bigger_net(torch.randn(1, 3, 48, 48), return_weights=True).weights.shape == (1, 6, 6)


def test_check_image_size_contract():
    """Nothing for backbones that take any size (CNNs, dynamic ViTs); a ValueError for a size a
    backbone refuses and for a size that is not a positive integer; GSPNet/EmbeddingModel (their
    trunk), wrapped backbones and unwrapped models alike."""
    from gsp_kernels.nn import check_image_size as exported
    from gsp_kernels.nn.backbones import backbone_from_model

    assert exported is check_image_size
    for factory in (lambda: torchvision.models.resnet18(weights=None), _timm("resnet10t"), _timm("convnext_atto")):
        net = replace_global_pool(factory(), 8, num_prototypes=2)
        for size in (1, 17, 64, 1000):
            assert check_image_size(net, size) is None and check_image_size(net.trunk, size) is None
    gap = build_model("timm:vit_tiny_patch16_224", "gap", 8, backbone_kwargs=TINY_VIT)
    check_image_size(gap, 48)
    with pytest.raises(ValueError, match="not a multiple of VisionTransformer's patch size 16x16: use a multiple of it \\(e.g. 32x32 or 48x48\\)"):
        check_image_size(gap, 40)
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)  # unwrapped: as it is, strict
    with pytest.raises(ValueError, match="takes 32x32 images only"):
        check_image_size(fixed, 48)
    check_image_size(backbone_from_model(fixed), 48)  # wrapped: switched to any size
    with pytest.raises(ValueError, match="takes 32x32 images only"):
        check_image_size(_torchvision_vit(), 48)
    for bad in (0, -32, 2.5, True, "32", None):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            check_image_size(gap, bad)
    import numpy as np

    check_image_size(gap, np.int64(48))


# Head layers: applied at every position or named.


def test_torchvision_convnext_and_mobilenet_heads_apply_at_every_position():
    """ConvNeXt's LayerNorm2d (+ Flatten) and MobileNetV3's Linear + Hardswish (+ Dropout) run at
    every position: the trunk's features are the model's own pre-logits of each 1x1 crop, their
    parameters are the trunk's (under the model's names, so checkpoints load) and get gradients."""
    for factory, channels, head_keys in (
        (lambda: torchvision.models.convnext_tiny(weights=None), 768, ["classifier.0.bias", "classifier.0.weight"]),
        (lambda: torchvision.models.mobilenet_v3_small(weights=None), 1024, ["classifier.0.bias", "classifier.0.weight"]),
    ):
        torch.manual_seed(6)
        model = factory()
        original = copy.deepcopy(model).eval()
        net = replace_global_pool(model, 8, num_prototypes=2)
        assert net.trunk.num_features == channels and net.gsp.projection.in_features == channels
        assert sorted(key for key in net.trunk.state_dict() if key.startswith("classifier")) == head_keys
        images = torch.randn(2, 3, 96, 64)
        with torch.no_grad():
            torch.testing.assert_close(net.eval().features(images), _torchvision_own_head_per_local_feature(original, images), rtol=1e-5, atol=1e-5)
        net.train()(images).embedding.square().sum().backward()
        assert model.classifier[0].weight.grad is not None and model.classifier[0].weight.grad.abs().sum() > 0


def test_a_head_layer_that_cannot_be_applied_is_named():
    class Classifier(nn.Module):  # torchvision-style: features, avgpool, classifier (a Linear, then a Softmax)
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 10), nn.Softmax(dim=1))

        def forward(self, images):
            return self.classifier(torch.flatten(self.avgpool(self.features(images)), 1))

    model = Classifier()
    with pytest.warns(UserWarning, match=r"Classifier: GSP replaces the classifier classifier\.2; .* not applied: classifier\.3 \(Softmax\)"):
        net = replace_global_pool(model, 4, num_prototypes=2)
    assert net.trunk.num_features == 6 and net(torch.randn(2, 3, 16, 16)).embedding.shape == (2, 4)  # Linear + GELU applied
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 6)  # in place: the model's forward gives what its classifier read

    siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=1, embed_dim=64, num_heads=2)
    with pytest.warns(UserWarning, match=r"attention pooling attn_pool \(AttentionPoolLatent\) is removed"):
        net = replace_global_pool(siglip, 4, num_prototypes=2)
    assert net(torch.randn(1, 3, 48, 48), return_weights=True).weights.shape == (1, 3, 3)


# timm and torchvision models alike: changed in place, their modules the GSPNet's.


IN_PLACE_MODELS = {
    "timm-vit": (_timm("vit_tiny_patch16_224", **TINY_VIT), 32),
    "timm-convnext": (_timm("convnext_atto"), 64),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(weights=None), 64),
    "torchvision-convnext": (lambda: torchvision.models.convnext_tiny(weights=None), 64),
    "torchvision-mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(weights=None), 64),
    "torchvision-vit": (_torchvision_vit, 32),
}


@pytest.mark.parametrize("model_id", list(IN_PLACE_MODELS))
def test_the_model_passed_in_is_changed_in_place_alike(model_id):
    """After ``replace_global_pool(model)``: no classifier left in ``model``; its forward returns
    the features its classifier read (the pooled local features; timm transformers: all tokens);
    every parameter of the GSPNet's trunk is one of ``model``'s; wrapping it again works."""
    factory, size = IN_PLACE_MODELS[model_id]
    torch.manual_seed(7)
    model = factory().eval()
    logits_width = model(torch.randn(1, 3, size, size)).shape[-1]
    net = replace_global_pool(model, 8, num_prototypes=2, transport_ratio=1.0).eval()
    assert logits_width == 1000
    assert not any(isinstance(module, nn.Linear) and module.out_features == 1000 for module in model.modules())
    model_parameters = {id(parameter) for parameter in model.parameters()}
    assert all(id(parameter) in model_parameters for parameter in net.trunk.parameters())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        output = model(images)
        features = net.features(images)
    if isinstance(features, PatchTokens):
        if model_id.startswith("timm"):  # every token: the prefix tokens, then the patch tokens GSP pools
            assert output.shape == (2, model.num_prefix_tokens + features.tokens.shape[1], net.trunk.num_features)
            torch.testing.assert_close(output[:, model.num_prefix_tokens :], features.tokens)
        else:  # torchvision's ViT: its class token, as its heads read it
            assert output.shape == (2, net.trunk.num_features)
    elif model_id in ("torchvision-resnet18", "timm-convnext"):  # the pooled map (ConvNeXt: its head norm of it)
        assert output.shape == (2, net.trunk.num_features)
        if model_id == "torchvision-resnet18":
            torch.testing.assert_close(output, features.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    else:
        assert output.shape == (2, net.trunk.num_features)
    again = replace_global_pool(model, 8, num_prototypes=2)  # a second wrap of the same model
    assert again.trunk.num_features == net.trunk.num_features
