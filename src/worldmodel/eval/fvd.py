"""Fréchet Video Distance with a pluggable feature network.

FVD (Unterthiner et al., 2019) is the Fréchet distance between Gaussians fitted to features of
real and generated videos. The number is only comparable to published FVDs when the features
come from the Kinetics-400 I3D network: `load_i3d` loads the standard TorchScript export
(`i3d_torchscript.pt`, as used by StyleGAN-V and later video papers) from a configured path.
Without it, `RandomVideoFeatures` (a seeded random 3D CNN) still ranks models against each other
within one study, but its distances are on their own scale: every feature network carries a
`metric_name`, and for the random one it is `fvd_random_features`, never `fvd`.

A feature network here is any module mapping videos (B, C, T, H, W) in [-1, 1] to (B, D).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FVD_WEIGHTS_KEY = "eval.fvd_weights"
I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


def _as_float64(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu().to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a positive semi-definite matrix by eigen-decomposition."""
    matrix = (matrix + matrix.T) / 2.0  # remove asymmetry left by rounding
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    # Tiny negative eigenvalues are rounding error of a PSD covariance; they have no square root.
    return (eigvecs * eigvals.clamp_min(0.0).sqrt()) @ eigvecs.T


def frechet_distance(
    mu1: Tensor | np.ndarray,
    sigma1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    sigma2: Tensor | np.ndarray,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

    The trace term uses tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the inner matrix
    is symmetric PSD (same eigenvalues as S1 S2), so two `eigh` calls replace scipy's general
    `sqrtm` and no complex parts or singular-matrix offsets arise. The result is clamped at 0.
    """
    mu1, mu2 = _as_float64(mu1).flatten(), _as_float64(mu2).flatten()
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    if sigma1.ndim == 0:  # 1-D Gaussians given by their variances
        sigma1, sigma2 = sigma1.reshape(1, 1), sigma2.reshape(1, 1)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two Gaussians must have the same dimension")
    if sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"covariance {tuple(sigma1.shape)} does not match mean {mu1.numel()}")
    sqrt1 = _sqrt_psd(sigma1)
    inner = sqrt1 @ sigma2 @ sqrt1
    inner = (inner + inner.T) / 2.0
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    dist = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2.0 * tr_covmean
    return max(float(dist), 0.0)


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64.

    The covariance is the unbiased sample covariance (divides by n - 1, like `np.cov`).
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum: Tensor | None = None  # (D,)
        self._outer: Tensor | None = None  # (D, D) sum of x x^T

    def update(self, features: Tensor | np.ndarray) -> None:
        """Add a batch of features (N, D)."""
        feats = _as_float64(features)
        if feats.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(feats.shape)}")
        if self._sum is None:
            dim = feats.shape[1]
            self._sum = torch.zeros(dim, dtype=torch.float64)
            self._outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.n += feats.shape[0]
        self._sum += feats.sum(dim=0)
        self._outer += feats.T @ feats

    @property
    def mean(self) -> Tensor:
        if self._sum is None or self.n == 0:
            raise ValueError("no features accumulated")
        return self._sum / self.n

    @property
    def cov(self) -> Tensor:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.n}")
        mean = self.mean
        return (self._outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


def _batches(videos: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    """Yield (b, C, T, H, W) chunks of at most batch_size from a tensor or iterable of tensors."""
    if isinstance(videos, Tensor):
        videos = [videos]
    for chunk in videos:
        yield from chunk.split(batch_size)


@torch.no_grad()
def feature_stats(
    videos: Tensor | Iterable[Tensor], feature_net: nn.Module, batch_size: int = 16
) -> FeatureStats:
    """Run `feature_net` over videos (a (N, C, T, H, W) tensor or batches of them)."""
    stats = FeatureStats()
    device = next(iter(feature_net.parameters()), torch.empty(0)).device
    for batch in _batches(videos, batch_size):
        stats.update(feature_net(batch.to(device, torch.float32)))
    return stats


def fvd(
    real_videos: Tensor | Iterable[Tensor],
    fake_videos: Tensor | Iterable[Tensor],
    feature_net: nn.Module,
    batch_size: int = 16,
) -> float:
    """Fréchet distance between the feature distributions of real and generated videos.

    Videos are (N, C, T, H, W) in [-1, 1] (or an iterable of such batches). Report the value
    under `fvd_metric_name(feature_net)`: only I3D features make it an FVD. Distances need many
    samples (the covariance is D x D); with a few dozen clips they are biased upwards and only
    comparable at equal sample counts.
    """
    feature_net.eval()
    real = feature_stats(real_videos, feature_net, batch_size)
    fake = feature_stats(fake_videos, feature_net, batch_size)
    return frechet_distance(real.mean, real.cov, fake.mean, fake.cov)


def fvd_metric_name(feature_net: nn.Module) -> str:
    """The key a result from `feature_net` is reported under: `fvd` only for I3D features."""
    return getattr(feature_net, "metric_name", "fvd_custom_features")


class I3DFeatures(nn.Module):
    """Kinetics-400 I3D logits features (D = 400) from the StyleGAN-V TorchScript export.

    Frames are resized bilinearly (not cropped) to 224x224 and passed in [-1, 1] with the
    export's own rescaling and resizing switched off (`rescale=False, resize=False,
    return_features=True`): the same preprocessing as the reference FVD. Clips shorter than 9
    frames are refused up front (the export's temporal pooling fails on them inside the
    TorchScript interpreter with an obscure message); 16 frames is the usual FVD length.
    """

    metric_name = "fvd"
    min_frames = 9

    def __init__(self, detector: torch.jit.ScriptModule, resolution: int = 224) -> None:
        super().__init__()
        self.detector = detector
        self.resolution = resolution

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        b, c, t, h, w = video.shape
        if t < self.min_frames:
            raise ValueError(f"I3D needs clips of at least {self.min_frames} frames, got {t}")
        if c == 1:
            video = video.expand(-1, 3, -1, -1, -1)
        if (h, w) != (self.resolution, self.resolution):
            frames = rearrange(video, "B C T H W -> (B T) C H W")
            frames = F.interpolate(frames, size=(self.resolution, self.resolution), mode="bilinear")
            video = rearrange(frames, "(B T) C H W -> B C T H W", B=b)
        feats = self.detector(
            video.clamp(-1.0, 1.0).contiguous(), rescale=False, resize=False, return_features=True
        )
        return feats.float()  # (B, 400)


def load_i3d(path: str | Path | None, map_location: str | torch.device = "cpu") -> I3DFeatures:
    """Load the I3D TorchScript file (`i3d_torchscript.pt`) as a feature network.

    Raises:
        FileNotFoundError: the path is unset or missing; the message names the file, where it
            comes from and the config key `eval.fvd_weights`.
    """
    if path is None or not Path(path).is_file():
        where = "no path is configured" if path is None else f"{path} does not exist"
        raise FileNotFoundError(
            f"FVD needs the Kinetics-400 I3D TorchScript file {I3D_FILE}, but {where}. Nothing "
            f"is downloaded at run time: fetch it on a machine with internet from {I3D_URL} "
            f"(the StyleGAN-V release), copy it here and set {FVD_WEIGHTS_KEY}=/path/to/"
            f"{I3D_FILE}. Without it, leave {FVD_WEIGHTS_KEY} unset to get "
            f"fvd_random_features instead (not comparable to published FVD)."
        )
    # The reference export is TorchScript; torch marks jit.load as deprecated but still loads it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        detector = torch.jit.load(str(path), map_location=map_location).eval()
    return I3DFeatures(detector)


class RandomVideoFeatures(nn.Module):
    """A small random-init 3D CNN as a stand-in feature network when no I3D weights exist.

    Weights are drawn from their own seeded generator, so the features (and distances) are the
    same on every run and machine regardless of the global RNG state. Features are the
    spatio-temporal mean of each stage's activations, concatenated (D = sum(channels)).
    Results are reported as `fvd_random_features`: useful for comparing runs within a study,
    not comparable to FVD.
    """

    metric_name = "fvd_random_features"

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] | list[int] = (16, 32, 64),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        stages = []
        prev = in_channels
        for i, ch in enumerate(channels):
            # The first stage keeps time resolution: short clips still reach the last stage.
            stride = (1, 2, 2) if i == 0 else (2, 2, 2)
            stages.append(nn.Conv3d(prev, ch, kernel_size=3, stride=stride, padding=1))
            prev = ch
        self.stages = nn.ModuleList(stages)
        self.feature_dim = sum(channels)
        generator = torch.Generator().manual_seed(seed)
        for conv in self.stages:
            fan_in = conv.weight[0].numel()
            # He-normal so activations keep their scale through the ReLUs.
            std = (2.0 / fan_in) ** 0.5
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * std
            conv.bias.data = torch.randn(conv.bias.shape, generator=generator) * 0.1
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        if video.shape[1] == 1 and self.in_channels == 3:
            video = video.expand(-1, 3, -1, -1, -1)
        feats = []
        x = video.float()
        for conv in self.stages:
            x = F.relu(conv(x))
            feats.append(x.mean(dim=(2, 3, 4)))  # (B, ch)
        return torch.cat(feats, dim=1)  # (B, D)


def build_feature_net(weights_path: str | None = None, seed: int = 0) -> nn.Module:
    """I3D from `weights_path` (eval.fvd_weights) if set, else `RandomVideoFeatures(seed)`.

    A set but missing path raises FileNotFoundError instead of silently falling back.
    """
    if weights_path:
        return load_i3d(weights_path)
    return RandomVideoFeatures(seed=seed)
