"""Inverse-dynamics model (IDM): which action led from frame t to frame t+1.

Used to measure control: trained on real transitions of the data, it reads the action back from
a world model's generated transitions (`worldmodel.eval.control`). If the world model draws the
commanded action into its frames, the IDM recovers it; if it ignores the action, the IDM can do
no better than chance.

A small CNN over the two frames and their difference (3C channels): three stride-2 stages and
one at stride 1, average-pooled to a 4x4 grid (adaptive, so any resolution works and coarse
position survives), then an MLP to logits over the actions. About 0.2M parameters: a few
hundred steps on 64x64 CoinRun frames train in a CPU minute or two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out),
        nn.SiLU(),
    )


class InverseDynamicsModel(nn.Module):
    """Frame pair (frame t, frame t+1) in [-1, 1] -> logits over `num_actions` actions.

    Args:
        num_actions: size of the action set.
        in_channels: channels of one frame.
        channels: width of the first stage (doubled after the second).
        hidden: width of the MLP head.
        pooled_size: side of the grid the features are pooled to before the head.
    """

    def __init__(
        self,
        num_actions: int,
        in_channels: int = 3,
        channels: int = 32,
        hidden: int = 128,
        pooled_size: int = 4,
    ) -> None:
        super().__init__()
        if num_actions < 2:
            raise ValueError(f"num_actions must be >= 2, got {num_actions}")
        self.num_actions = num_actions
        self.in_channels = in_channels
        wide = 2 * channels
        self.features = nn.Sequential(
            _stage(3 * in_channels, channels, 2),
            _stage(channels, channels, 2),
            _stage(channels, wide, 2),
            _stage(wide, wide, 1),
            nn.AdaptiveAvgPool2d(pooled_size),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(wide * pooled_size * pooled_size, hidden),
            nn.SiLU(),
            nn.Linear(hidden, num_actions),
        )

    def forward(self, frames: Tensor) -> Tensor:
        """Logits (B, num_actions) of frame pairs (B, C, 2, H, W) or (B, 2C, H, W) (frame t's
        channels first)."""
        if frames.ndim == 5:
            if frames.shape[2] != 2:
                raise ValueError(f"expected 2 frames on axis 2, got {tuple(frames.shape)}")
            first, second = frames[:, :, 0], frames[:, :, 1]
        elif frames.ndim == 4 and frames.shape[1] == 2 * self.in_channels:
            first, second = frames.chunk(2, dim=1)
        else:
            raise ValueError(
                f"expected (B, {self.in_channels}, 2, H, W) or (B, {2 * self.in_channels}, H, W), "
                f"got {tuple(frames.shape)}"
            )
        x = torch.cat([first, second, second - first], dim=1).float()  # (B, 3C, H, W)
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, frames_t: Tensor, frames_t1: Tensor) -> Tensor:
        """Most likely action ids (B,) long of transitions frames_t -> frames_t1 (B, C, H, W)."""
        return self(torch.cat([frames_t, frames_t1], dim=1)).argmax(dim=-1)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over every transition t -> t+1 of the clips.

        batch: video (B, C, T, H, W) in [-1, 1]; actions (B, T) long, actions[:, t] leading from
        frame t to t+1 (the last one leaves the clip and is unused); optional mask (B, T) bool.
        Transitions with an unknown action (< 0) or a padding frame are left out.
        """
        video, actions = batch["video"], batch["actions"]
        first = rearrange(video[:, :, :-1], "B C T H W -> (B T) C H W")
        second = rearrange(video[:, :, 1:], "B C T H W -> (B T) C H W")
        labels = actions[:, :-1]  # (B, T-1)
        valid = labels >= 0
        mask = batch.get("mask")
        if mask is not None:
            valid = valid & mask[:, :-1] & mask[:, 1:]
        labels, valid = labels.reshape(-1), valid.reshape(-1)  # (B (T-1),)
        logits = self(torch.cat([first[valid], second[valid]], dim=1))  # (N, A)
        if logits.shape[0] == 0:
            zero = logits.sum() * 0.0  # keeps the graph for a batch without labels
            return zero, {"ce": zero.detach(), "accuracy": zero.detach()}
        target = labels[valid].long()
        ce = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(dim=-1) == target).float().mean()
        return ce, {"ce": ce.detach(), "accuracy": accuracy.detach()}

    def extra_repr(self) -> str:
        return f"num_actions={self.num_actions}, in_channels={self.in_channels}"
