"""Losses for pixel autoencoders: reconstruction, PSNR, LPIPS, a frame GAN (hinge, adaptive weight).

LPIPS uses the `lpips` package. Its linear heads ship inside the package, but the VGG16 backbone
does not and nothing may be downloaded at run time, so the backbone comes from a file given in the
config (`lpips_weights_path`): either a torchvision VGG16 state dict (keys `features.N.*`) or a full
`lpips.LPIPS` state dict (keys `net.sliceK.N.*`, `linK.*`). `random_backbone=True` builds a randomly
initialised backbone for exercising code paths in tests: that is not a perceptual metric.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of per-frame values (N,) with optional per-frame weights (N,) (0 = padding)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def psnr_per_frame(x_hat: Tensor, x: Tensor) -> Tensor:
    """PSNR in dB of frames (N, C, H, W) in [-1, 1], measured after rescaling to [0, 1]."""
    mse = ((x_hat.float().clamp(-1, 1) - x.float()) / 2).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


class LPIPSLoss(nn.Module):
    """LPIPS (VGG) distance between frames (N, 3, H, W) in [-1, 1]; frozen, always in eval mode."""

    def __init__(
        self,
        weights_path: str | None,
        config_key: str = "model.lpips_weights_path",
        random_backbone: bool = False,
    ):
        super().__init__()
        import lpips  # imported here: only needed when the LPIPS term is switched on

        if not random_backbone and not (weights_path and os.path.isfile(weights_path)):
            raise FileNotFoundError(
                f"LPIPS needs VGG16 backbone weights at '{weights_path}' (a torchvision "
                f"vgg16 state dict, e.g. vgg16-397923af.pth, or a full lpips.LPIPS state "
                f"dict); set `{config_key}` to that file, or set the LPIPS weight to 0."
            )
        # pnet_rand=True: build the trunk without torchvision trying to download it.
        self.net = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
        if not random_backbone:
            self._load(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def _load(self, state: dict[str, Tensor]) -> None:
        if any(k.startswith("net.slice") for k in state):  # full LPIPS state dict
            self.net.load_state_dict(state, strict=False)
            return
        # torchvision VGG16: features.N.* lives in whichever lpips slice holds module N.
        slice_of = {}
        for slice_name, block in self.net.net.named_children():
            for idx in block._modules:
                slice_of[idx] = slice_name
        mapped = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and parts[1] in slice_of:
                mapped[".".join([slice_of[parts[1]], *parts[1:]])] = value
        if not mapped:
            raise ValueError("LPIPS weights file has neither `features.N.*` nor `net.slice*` keys")
        missing, _ = self.net.net.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"LPIPS backbone weights incomplete, missing {missing[:4]}")

    def train(self, mode: bool = True) -> LPIPSLoss:
        # The backbone stays in eval mode (dropout off) whatever the parent does.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Per-frame distances (N,)."""
        return self.net(x_hat, x).flatten()


class FrameDiscriminator(nn.Module):
    """A small PatchGAN-style 2D discriminator applied to single frames (N, C, H, W)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for _ in range(num_layers - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, stride=2, padding=1),
                nn.GroupNorm(32 if width * 2 % 32 == 0 else 1, width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, frames: Tensor) -> Tensor:
        """Patch logits (N, 1, h, w)."""
        return self.net(frames)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.float().mean()


def adaptive_gan_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """VQGAN's balance: ||d nll / d W_last|| / ||d g / d W_last||, detached and clamped."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
