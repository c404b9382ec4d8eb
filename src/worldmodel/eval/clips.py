"""What every world evaluation shares: the held-out clips, seeded sampling and small helpers.

`pixel_val` / `token_val` give a split's pixel clips and the same clips as a world's tokens (clip
i of both is the same frames); `EvalClips` / `PairedClips` add each clip's episode and another
clip's actions; `true_action_mapping` learns the game's action -> latent code table from a split;
the rest (subsets, progress, per-frame scores, LAM-code statistics, rollout media) is used by
`eval.lam`, `eval.world` and the play front-ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from worldmodel.config import instantiate
from worldmodel.data.dataset import ClipDataset, val_subset
from worldmodel.data.tokens import token_cache
from worldmodel.eval import metrics as M
from worldmodel.media import plot_confusion, save_gif, save_mp4, side_by_side
from worldmodel.metrics import RunningMeans
from worldmodel.world import World

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Shared helpers (also used by `worldmodel.play`)
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed global torch RNG without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def token_val(world: World, pixels: Any) -> Any:
    """The token clips of `pixels` (a split's pixel clips) for `world`, tokenized once into the
    data cache with the world's own frozen tokenizer (and LAM) on its device."""
    return token_cache(
        pixels,
        world.cache_key,
        world.tokenizer,
        world.lam,
        world.lam_window,
        world.dynamics.inputs,
        world.frames_per_latent,
        world.lam_bf16,
    )


def pixel_val(data_cfg: DictConfig, split: str = "val") -> Any:
    """The held-out clips of a data config (recorded into its cache on first use): the
    validation split, or `split` (e.g. "test", the levels numbers are reported on)."""
    return instantiate(data_cfg).split(split)


def text_context(model: nn.Module, clip_actions: Tensor) -> Any:
    """The conditioning a text-to-video model (phenaki: `texts_of`) generates with: the caption
    of the whole clip, rendered from its actions as in training; None for action-conditioned
    models (they read the action of each frame)."""
    if not hasattr(model, "texts_of"):
        return None
    return model.encode_text(model.texts_of({"actions": clip_actions}))


def true_action_mapping(
    pixels: Any, tokens: Any, num_codes: int, onsets: bool = False
) -> tuple[Tensor, dict[int, int]] | None:
    """Confusion (true action x latent code) over a whole split and the true -> code mapping.

    Reads the split's recorded actions and the latent actions the pipeline cached beside them
    (both per frame, aligned), so it costs no model call. None when the data has no actions.
    Default: all transitions, each action to its most frequent code (`M.action_mapping`).
    `onsets`: only the transitions where an action starts (`M.action_onsets`), each action to
    the code most specific to it (`M.onset_mapping`).
    """
    if pixels.num_actions is None:
        return None
    true, latent = np.load(pixels.actions_path), np.load(tokens.actions_path)
    if onsets:
        offsets = np.array([int(e["offset"]) for e in pixels.episodes], dtype=np.int64)
        keep = M.action_onsets(true, offsets)
        true, latent = true[keep], latent[keep]
    confusion = M.confusion_matrix(
        torch.from_numpy(true), torch.from_numpy(latent), int(pixels.num_actions), num_codes
    )
    if int(confusion.sum()) == 0:
        return None
    mapping = M.onset_mapping(confusion) if onsets else M.action_mapping(confusion)
    return confusion, mapping


def clip_episodes(clips: ClipDataset, indices: Sequence[int]) -> np.ndarray:
    """The episode (index into `clips.episodes`) each clip `indices[i]` of a clip dataset is cut
    from, (N,) int64: clips of one episode share its level and frames, so their errors are
    clustered by it."""
    offsets = np.array([int(e["offset"]) for e in clips.episodes], dtype=np.int64)
    order = np.argsort(offsets, kind="stable")
    starts = clips.starts[np.asarray(indices, dtype=np.int64)]
    # the last episode starting at or before each clip's first frame holds the whole clip
    position = np.searchsorted(offsets[order], starts, side="right") - 1
    if (position < 0).any():
        raise ValueError("a clip starts before the first episode")
    return order[position].astype(np.int64)


class PairedClips(Dataset):
    """Token clip i and pixel clip i of one split (the same frames): one batch dict with
    `tokens`, `actions` (those the dynamics model is conditioned on), `mask`, `video` and
    `true_actions` (the recorded actions of the pixel clip, -1 where unknown)."""

    def __init__(self, tokens: Any, pixels: Any) -> None:
        if len(tokens) != len(pixels):
            raise ValueError(f"{len(tokens)} token clips but {len(pixels)} pixel clips")
        self.tokens, self.pixels = tokens, pixels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        pixels = self.pixels[index]
        return {**self.tokens[index], "video": pixels["video"], "true_actions": pixels["actions"]}


class EvalClips(Dataset):
    """The clips an evaluation scores, `indices` of a `PairedClips` in order, each item with
    `other_actions`: the conditioning actions of the next scored clip (the last one takes the
    first's), a real action sequence that belongs to other frames."""

    def __init__(self, clips: PairedClips, indices: Sequence[int]) -> None:
        if not indices:
            raise ValueError("no clip to evaluate")
        self.clips, self.indices = clips, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        other = self.indices[(i + 1) % len(self.indices)]
        return {**self.clips[self.indices[i]], "other_actions": self.clips.tokens[other]["actions"]}


def eval_subset(dataset: Any, cfg: DictConfig) -> Subset:
    """The evenly spread validation subset every evaluation scores (eval.batches x batch_size)."""
    if len(dataset) == 0:
        raise ValueError(
            f"the validation split of data={cfg.data.get('name')} has no clips of "
            f"data.clip_length={cfg.data.clip_length} frames"
        )
    return val_subset(dataset, int(cfg.eval.batches) * int(cfg.eval.batch_size))


def use_bf16(cfg: DictConfig) -> bool:
    return cfg.trainer.get("precision", "fp32") == "bf16"


def progress(loader: DataLoader, cfg: DictConfig, desc: str) -> Any:
    return tqdm(loader, desc=desc, disable=not cfg.trainer.get("progress", False))


def frame_scores(means: RunningMeans, pred: Tensor, target: Tensor) -> None:
    """PSNR and SSIM of predicted frames (B, C, T, H, W) against the real ones."""
    b = pred.shape[0]
    means.add("psnr", M.psnr(pred, target), b)
    means.add("ssim", M.ssim(pred, target), b)


def to_cpu(errors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.cpu() for k, v in errors.items()}


def concat_rows(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """`rollout_errors` of every batch concatenated over clips, each (N, H)."""
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def code_metrics(codes: Tensor, num_codes: int) -> dict[str, Any]:
    """Usage statistics of latent action codes (`codebook/...`), with the share of each code."""
    stats = M.codebook_stats(codes, num_codes)
    out: dict[str, Any] = {f"codebook/{k}": float(v) for k, v in stats.items()}
    counts = torch.bincount(codes[codes >= 0].long(), minlength=num_codes).double()
    out["codebook/fraction"] = (counts / counts.sum().clamp_min(1)).tolist()
    return out


def action_alignment(
    true: Tensor, codes: Tensor, num_true: int, num_codes: int, path: Path
) -> tuple[dict[str, Any], Path | None]:
    """NMI and purity of paired labels, each beside its chance level (`lam_alignment`), the
    true-action -> code mapping, and the confusion matrix (rows = true actions, columns = codes)
    drawn into `path`. Empty without true actions."""
    known = true >= 0
    if not bool(known.any()):
        return {}, None
    confusion = M.confusion_matrix(true, codes, num_true, num_codes)
    mapping = M.action_mapping(confusion)
    aligned = M.lam_alignment(true, codes)
    metrics = {
        "action_nmi": aligned["nmi"],
        "action_nmi_chance": aligned["nmi_chance"],
        "action_purity": aligned["purity"],
        "action_purity_chance": aligned["purity_chance"],
        "action_majority_share": aligned["majority_share"],
        "action_mapping": {str(a): c for a, c in mapping.items()},
        "action_confusion": confusion.tolist(),
        "action_pairs": int(aligned["pairs"]),
    }
    plot_confusion(confusion, path, title="latent code per true action")
    return metrics, path


def save_rollout_media(real: Tensor, fake: Tensor, run_dir: Path, name: str) -> dict[str, Path]:
    """GIF and MP4 of clips (B, C, T, H, W): real on the left, generated on the right, clips
    stacked top to bottom."""
    pairs = side_by_side(real, fake, gap=2)  # (B, C, T, H, 2 W + 2)
    video = rearrange(pairs, "b c t h w -> c t (b h) w")  # one tall clip
    return {
        f"{name}_gif": save_gif(video, run_dir / f"{name}.gif", fps=4, scale=2),
        f"{name}_mp4": save_mp4(video, run_dir / f"{name}.mp4", fps=4, scale=2),
    }
