"""Reconstruction PSNR of tokenizers per frame position of a held-out clip, side by side.

    python experiments/tokenizer_temporal/psnr_by_frame.py CKPT [CKPT ...] [--clips 64]

Where a 4x tokenizer loses its decibels: frame 0 is encoded alone (as many tokens as a
per-frame tokenizer's frame), frames 1-4 and 5-8 share a latent frame each. Clips are the first
`--clips` of the validation split of the data config the checkpoints were trained on (9
frames, the same clips for every checkpoint). One JSON line per checkpoint: PSNR of the pooled
MSE at each of the 9 positions, and the mean per-frame PSNR of the clip.
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import open_dict
from torch.utils.data import DataLoader, Subset

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.eval import metrics as M
from worldmodel.runtime import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--clip-length", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.checkpoints:
        model, cfg, state = load_model(path)
        with open_dict(cfg):
            cfg.data.clip_length = args.clip_length
        val = instantiate(cfg.data).split("val")
        loader = DataLoader(Subset(val, range(min(args.clips, len(val)))), batch_size=16)
        errors = []  # (B, T) MSE per frame
        with torch.no_grad():
            for batch in loader:
                video = batch["video"]  # (B, C, T, H, W)
                with autocast(video.device, True):
                    recon, _ = model.reconstruct(video)
                errors.append(M.frame_mse(recon.float().clamp(-1, 1), video))
        mse = torch.cat(errors)  # (N, T)
        curve = [float(M.psnr_from_mse(mse[:, t].mean())) for t in range(mse.shape[1])]
        print(
            json.dumps(
                {
                    "checkpoint": path,
                    "step": int(state.get("step", 0)),
                    "temporal_downsample": int(model.temporal_downsample),
                    "clips": int(mse.shape[0]),
                    "psnr_by_frame": [round(v, 2) for v in curve],
                    "psnr_mean_per_frame": float(M.psnr_from_mse(mse).mean()),
                }
            )
        )


if __name__ == "__main__":
    main()
