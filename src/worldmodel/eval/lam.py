"""Latent action model evaluation (`task=eval` of a LAM).

`evaluate_lam` scores a latent action model on pixel clips: the next-frame prediction of its
decoder (teacher-forced: real past frames, the code the encoder inferred for the transition)
beside copying the previous frame on the frames that change, how much of its tiny codebook it
uses, and -- where the data has true actions -- how well its codes agree with them (NMI and
purity, each beside its chance level; the confusion matrix and the true-action -> code mapping).
Returns `(metrics, media, num_clips)` for `eval.runner.evaluate`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from worldmodel.eval import metrics as M
from worldmodel.eval.clips import (
    action_alignment,
    code_metrics,
    concat_rows,
    eval_subset,
    frame_scores,
    pixel_val,
    progress,
    to_cpu,
    use_bf16,
)
from worldmodel.media import save_grid
from worldmodel.metrics import RunningMeans
from worldmodel.models.interfaces import LatentActions
from worldmodel.runtime import autocast

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Latent action model
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_lam(
    model: LatentActions, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Next-frame prediction, codebook use and agreement with true actions of a LAM.

    Next frames are teacher-forced: frame t+1 is predicted from the real frames 0..t and the code
    the encoder inferred for t -> t+1; `random_action_psnr` predicts it with a uniformly random
    code instead (how much the decoder relies on the action, the LAM's own ΔPSNR).
    `next_frame_psnr_changing` and `next_frame_copy_psnr_changing` are the PSNR of the pooled MSE
    of the prediction and of the previous real frame over the frames that change. Scored on the
    validation clips of `cfg.data`, cut to the model's `max_frames`.
    """
    pixels = pixel_val(cfg.data, str(cfg.eval.get("split", "val")))
    loader = DataLoader(eval_subset(pixels, cfg), batch_size=int(cfg.eval.batch_size))
    num_codes = int(model.num_actions)
    length = min(pixels.clip_length, int(model.max_frames))
    if length < 2:
        raise ValueError(f"data.clip_length={pixels.clip_length}: a LAM needs clips of >= 2 frames")
    bf16 = use_bf16(cfg)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    means = RunningMeans()
    all_codes, all_true, errors = [], [], []
    shown = None
    n = 0
    for batch in progress(loader, cfg, "eval lam"):
        video = batch["video"][:, :, :length].to(device)  # (B, C, T, H, W)
        target = video[:, :, 1:]
        b = video.shape[0]
        n += b
        with autocast(device, bf16):
            codes = model.infer_actions(video)  # (B, T-1): transition t -> t+1
            pred = model.predict_frames(video, codes)  # (B, C, T-1, H, W)
            random = torch.randint(0, num_codes, codes.shape, generator=gen, device=gen.device)
            pred_random = model.predict_frames(video, random)
        pred = pred.float().clamp(-1.0, 1.0)
        frame_scores(means, pred, target)
        means.add("random_action_psnr", M.psnr(pred_random.float().clamp(-1.0, 1.0), target), b)
        errors.append(to_cpu(M.rollout_errors(pred, video, context=1)))
        all_codes.append(codes.flatten().cpu())
        all_true.append(batch["actions"][:, : length - 1].flatten())  # aligned with the codes
        if shown is None:
            samples = int(cfg.eval.get("media_samples", 4))
            shown = [target[:samples].cpu(), pred[:samples].cpu()]

    codes, true = torch.cat(all_codes), torch.cat(all_true)
    metrics: dict[str, Any] = means.result()
    metrics["delta_psnr"] = metrics["psnr"] - metrics["random_action_psnr"]
    changing = M.rollout_psnr_summary(concat_rows(errors))
    metrics["next_frame_psnr_changing"] = changing["model_psnr"]
    metrics["next_frame_copy_psnr_changing"] = changing["copy_previous_psnr"]
    metrics["changing_fraction"] = changing["changing_fraction"]
    metrics.update(code_metrics(codes, num_codes))
    media = {"next_frame_grid": save_grid(shown, run_dir / "next_frame.png")}
    if pixels.num_actions is not None:
        aligned, path = action_alignment(
            true, codes, int(pixels.num_actions), num_codes, run_dir / "action_confusion.png"
        )
        metrics.update(aligned)
        if path is not None:
            media["action_confusion"] = path
    return metrics, media, n
