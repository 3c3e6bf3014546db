"""PaDiM's embedding: backbone features at three scales, on one grid, on a fixed channel subset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..backbones import Backbone

# Channels kept per patch. resnet18 and wide_resnet50_2: the PaDiM paper's (of 448 and 1792).
# efficientnet_lite0 has only 24 + 40 + 112 = 176: keeping 100 gives the same Gaussian size as
# the paper's resnet18 setting (fit state P x 100^2 float64, 0.33 GB at 256 px instead of
# 1.0 GB for all 176, and a 3x cheaper Mahalanobis), and the paper found a random ~100-channel
# subset loses little against all channels.
DEFAULT_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550, "efficientnet_lite0": 100}


def channel_subset(total: int, n_features: int, seed: int) -> torch.Tensor:
    """Sorted random channel indices [n_features] from a seeded generator (same seed, same set).

    Sorted, so each backbone map contributes a contiguous run and can be sliced before its
    upsampling; the Mahalanobis distance does not depend on the channel order.
    """
    if not 0 < n_features <= total:
        raise InputError(f"n_features must be in 1..{total} for this backbone; got {n_features}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n_features].sort().values


class PadimEmbedding(nn.Module):
    """Backbone + embedding: features [B, n_features, h, w] of the backbone-normalised input.

    The coarser maps are upsampled (nearest, as the PaDiM reference's unfold/fold concat and
    anomalib do) to the finest map's grid and concatenated; only the channels in `idx` are kept.

    Args:
        backbone: a Backbone from `build_backbone`.
        n_features: channels kept (default DEFAULT_N_FEATURES[backbone.name]).
        seed: seed of the channel subset.
        dtype: backbone compute dtype (float16/bfloat16 for GPU inference); the embedding
            is always returned in float32.
    """

    def __init__(self, backbone: Backbone, n_features: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        # channels_last: the layout oneDNN (CPU) and cuDNN convolutions run fastest in, and
        # each patch's channels end up contiguous for the Mahalanobis step.
        self.backbone = backbone.to(dtype=dtype, memory_format=torch.channels_last)
        self.dtype = dtype
        n_features = DEFAULT_N_FEATURES[backbone.name] if n_features is None else int(n_features)
        self.register_buffer("idx", channel_subset(sum(backbone.channels), n_features, seed))
        # The normalisation the backbone's weights expect (not the same for every backbone).
        self.register_buffer("mean", torch.tensor(backbone.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.input_std).view(1, 3, 1, 1), persistent=False)
        self._split_idx()
        self.register_load_state_dict_post_hook(lambda module, _: module._split_idx())

    def _split_idx(self) -> None:
        """Per backbone map, the local indices of its kept channels (buffers local0..2)."""
        start = 0
        for i, c in enumerate(self.backbone.channels):
            local = self.idx[(self.idx >= start) & (self.idx < start + c)] - start
            self.register_buffer(f"local{i}", local, persistent=False)
            start += c

    @property
    def n_features(self) -> int:
        return self.idx.numel()

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the embedding for a [.., height, width] input (from a tiny dry run)."""
        param = next(self.backbone.parameters())
        with torch.inference_mode():
            probe = torch.zeros(1, 3, height, width, device=param.device, dtype=self.dtype)
            return tuple(self.backbone(probe)[0].shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1] -> embedding [B, n_features, h, w] float32, channels_last.

        Built in [B, h, w, C] layout: each map's kept channels are gathered once and written
        straight into their slice of the output at the finest grid (nearest upsampling as
        index lookups), so no full-width map is upsampled or concatenated.
        """
        x = ((x - self.mean) / self.std).to(self.dtype)
        maps = self.backbone(x.contiguous(memory_format=torch.channels_last))
        if torch.compiler.is_exporting():
            return self._concat(maps)
        out = maps[0].new_empty(x.shape[0], *maps[0].shape[-2:], self.n_features, dtype=torch.float32)
        self._gather(maps, out)
        return out.permute(0, 3, 1, 2)

    def _concat(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The same embedding as select + nearest upsampling + concatenation, for export.

        Graph exporters turn `_gather`'s writes into a slice output into scatters and
        transposes, which ONNX Runtime ran at a quarter of its resnet18 time; this form
        becomes Gather, Resize and Concat. Same values: nearest upsampling picks floor(i *
        in / out), as `_nearest` does.
        """
        size = maps[0].shape[-2:]
        parts = []
        for i, feature in enumerate(maps):
            local = getattr(self, f"local{i}")
            if local.numel():
                kept = feature.index_select(1, local)
                parts.append(kept if kept.shape[-2:] == size else F.interpolate(kept, size=size, mode="nearest"))
        return torch.cat(parts, 1).float()

    def _gather(self, maps: list[torch.Tensor], out: torch.Tensor) -> None:
        """Writes the kept channels of the three maps into out [b, h, w, n_features]."""
        height, width = out.shape[1:3]
        start = 0
        for i, feature in enumerate(maps):
            local = getattr(self, f"local{i}")
            if local.numel() == 0:
                continue
            rows = feature.permute(0, 2, 3, 1)                            # [b, h_i, w_i, C_i]
            # index_select on a 2-D [pixels, C_i] view is the fast gather (a view for the
            # channels_last maps the backbone returns).
            kept = rows.reshape(-1, rows.shape[-1]).index_select(1, local)
            kept = kept.view(*rows.shape[:3], -1)                          # [b, h_i, w_i, k]
            if kept.shape[1:3] != (height, width):
                kept = kept[:, _nearest(height, kept.shape[1], kept.device)]
                kept = kept[:, :, _nearest(width, kept.shape[2], kept.device)]
            out[..., start:start + local.numel()] = kept
            start += local.numel()


def _nearest(out_size: int, in_size: int, device) -> torch.Tensor:
    """Source indices of F.interpolate(mode="nearest"): floor(i * in / out)."""
    return (torch.arange(out_size, device=device) * in_size // out_size).clamp_max(in_size - 1)
