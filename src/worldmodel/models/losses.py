"""Losses for pixel autoencoders: reconstruction, LPIPS, a frame GAN (hinge, adaptive weight).

PSNR and the LPIPS network come from `worldmodel.metrics` (one implementation for training and
evaluation). LPIPS here uses the VGG16 backbone, whose weights are not packaged and are never
downloaded at run time: they come from a file given in the config (`lpips_weights_path`), either
a torchvision VGG16 state dict (keys `features.N.*`) or a full `lpips.LPIPS` state dict (keys
`net.sliceK.N.*`, `linK.*`), loaded strictly. `random_backbone=True` builds a randomly
initialised backbone for exercising code paths in tests: that is not a perceptual metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.metrics import load_lpips_network, load_lpips_weights, psnr


def masked_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of per-frame values (N,) with optional per-frame weights (N,) (0 = padding)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def psnr_per_frame(x_hat: Tensor, x: Tensor) -> Tensor:
    """PSNR in dB (N,) of frames (N, C, H, W) in [-1, 1]: `worldmodel.metrics.psnr` per frame."""
    return psnr(x_hat, x, reduction="none")


class LPIPSLoss(nn.Module):
    """LPIPS (VGG) distance between frames (N, 3, H, W) in [-1, 1]; frozen, always in eval mode.

    Raises FileNotFoundError naming the file and `config_key` when the weights are missing, and
    refuses a weights file that does not fill the network exactly.
    """

    def __init__(
        self,
        weights_path: str | None,
        config_key: str = "model.lpips_weights_path",
        random_backbone: bool = False,
    ):
        super().__init__()
        # Imports lpips only here: only needed when the LPIPS term is switched on.
        self.net = load_lpips_network("vgg", weights_path, random_backbone, config_key)

    def _load(self, state: dict[str, Tensor]) -> None:
        load_lpips_weights(self.net, state)

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
