"""Evaluation and generation for text-conditioned video models (Phenaki).

`evaluate_text_video` (`task=eval` of a `model=phenaki` checkpoint, routed by `eval/runner.py`)
writes, over the validation clips of `cfg.data`:

- `ce`, `masked_acc`: the masked-token loss and accuracy (seeded masks);
- `next_frame_token_acc`: the last frame of each clip generated from the clip's earlier frames and
  caption, token accuracy against the real one;
- `classifier_val_acc`: a small game classifier over token clips (`GameClassifier`), trained
  inside the eval on the real train clips (`eval.classifier_steps` steps, fixed seed), scored on
  the held-out real clips -- how much a recognition rate below can mean;
- `text_game_recognition` (and `..._cfg<scale>` with guidance `eval.cond_scale`): clips generated
  from the validation captions alone, how often the classifier names the game the caption asked
  for; per game as `text_game_recognition/<game>`.

Media: the generated clips beside the real ones (MP4 + GIF) and a two-scene `make_video`.

`make_video` chains scenes: each scene has its own caption and is primed on the last
`prime_frames` frames of the previous one; the frames are decoded with the frozen tokenizer and
written as one MP4. From the command line:

    python -m worldmodel.eval.text_video CHECKPOINT "coinrun, moving right" "bigfish, moving up" \
        --out video.mp4 [--frames 8] [--prime 2] [--steps 8] [--cond-scale 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

from worldmodel.build import load_model
from worldmodel.config import instantiate
from worldmodel.data.dataset import val_subset
from worldmodel.data.procgen import PROCGEN_NUM_ACTIONS
from worldmodel.eval.clips import seeded, token_val
from worldmodel.media import save_gif, save_mp4, side_by_side
from worldmodel.metrics import RunningMeans
from worldmodel.runtime import autocast
from worldmodel.world import World, decode_clip

log = logging.getLogger(__name__)


class GameClassifier(nn.Module):
    """Which game is a token clip (B, T, h, w) from? Token embeddings -> a conv over each
    frame's grid -> mean over space and time -> linear. Small on purpose: a judge, not a model."""

    def __init__(self, vocab_size: int, num_games: int, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.out = nn.Linear(dim, num_games)

    def forward(self, tokens: Tensor) -> Tensor:
        b = tokens.shape[0]
        x = rearrange(self.emb(tokens.long()), "b t h w d -> (b t) d h w")
        x = F.gelu(self.conv(x)).mean(dim=(2, 3))  # (B T, D)
        x = rearrange(x, "(b t) d -> b t d", b=b).mean(dim=1)  # (B, D)
        return self.out(x)


def game_labels(actions: Tensor) -> Tensor:
    """The game index of each clip (B,) from its joint action ids (B, T) (data/captions.py)."""
    return actions[:, 0].long() // PROCGEN_NUM_ACTIONS


def train_game_classifier(
    train: Any, vocab_size: int, num_games: int, steps: int, seed: int, batch_size: int = 32
) -> GameClassifier:
    """Fit a `GameClassifier` on real token clips with a fixed seed (grad on, also when called
    from a no_grad evaluation)."""
    with seeded(seed), torch.enable_grad():
        clf = GameClassifier(vocab_size, num_games)
        opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True
        )
        step = 0
        while step < steps:
            for batch in loader:
                loss = F.cross_entropy(clf(batch["tokens"]), game_labels(batch["actions"]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step >= steps:
                    break
    return clf.eval()


@torch.no_grad()
def make_video(
    model: nn.Module,
    tokenizer: nn.Module,
    texts: list[str],
    path: str | Path,
    frames_per_scene: int | None = None,
    prime_frames: int = 1,
    fps: float = 8.0,
    scale: int = 4,
    bf16: bool = False,
    **sampling: Any,
) -> tuple[Path, Tensor]:
    """Scenes from `texts`, each primed on the previous scene's last `prime_frames` frames,
    decoded and written as one MP4; returns (path, video (C, T, H, W)).

    T = frames_per_scene + (len(texts) - 1) * (frames_per_scene - prime_frames).
    """
    if not texts:
        raise ValueError("make_video needs at least one text")
    frames_per_scene = frames_per_scene or model.max_frames
    if not 0 < prime_frames < frames_per_scene:
        raise ValueError(
            f"prime_frames={prime_frames} must be in [1, frames_per_scene={frames_per_scene})"
        )
    clip = model.sample([texts[0]], frames_per_scene, **sampling)  # (1, F, h, w)
    scenes = [clip]
    for text in texts[1:]:
        clip = model.continue_video(clip, [text], frames_per_scene, prime_frames, **sampling)
        scenes.append(clip[:, prime_frames:])  # the primed frames are already in the video
    tokens = torch.cat(scenes, dim=1)  # (1, T, h, w)
    video = decode_clip(tokenizer, tokens, bf16)[0].cpu()  # (C, T, H, W)
    return save_mp4(video, path, fps=fps, scale=scale), video


def _token_splits(cfg: DictConfig, world: World) -> tuple[Any, Any]:
    """Train and validation token clips of `cfg.data` (tokenized once into the data cache)."""
    train, val = instantiate(cfg.data).datasets()
    return token_val(world, train), token_val(world, val)


@torch.no_grad()
def evaluate_text_video(
    world: World, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Token accuracy, next-frame accuracy and text -> game recognition of a Phenaki model."""
    model = world.dynamics
    parts = world
    games = model.games
    if not games:
        raise ValueError(
            "the phenaki evaluation needs model.games (captioned multi-game data, "
            "data=procgen_captions)"
        )
    train_tokens, val_tokens = _token_splits(cfg, world)
    ev = cfg.eval
    bf16 = cfg.trainer.get("precision", "fp32") == "bf16"
    seed = int(cfg.seed)
    steps, temperature = int(ev.get("steps", 8)), float(ev.get("temperature", 1.0))
    guided = float(ev.get("cond_scale", 3.0))
    clf = train_game_classifier(
        train_tokens, model.vocab_size, len(games), int(ev.get("classifier_steps", 300)), seed
    )
    loader = DataLoader(
        val_subset(val_tokens, int(ev.batches) * int(ev.batch_size)),
        batch_size=int(ev.batch_size),
    )
    gen = world.generator(seed)
    means = RunningMeans()
    n = 0
    shown: tuple[Tensor, Tensor] | None = None
    for i, batch in enumerate(loader):
        labels = game_labels(batch["actions"])  # on the CPU, as the classifier
        batch = {k: v[:, : model.max_frames].to(world.device) for k, v in batch.items()}
        tokens, b = batch["tokens"], batch["tokens"].shape[0]
        n += b
        texts = model.texts_of(batch)
        with seeded(seed + i), autocast(world.device, bf16):
            _, loss_metrics = model.loss(batch)
        means.add("ce", loss_metrics["ce"], b)
        means.add("masked_acc", loss_metrics["masked_acc"], b)
        means.add("classifier_val_acc", (clf(tokens.cpu()).argmax(-1) == labels).float().mean(), b)
        t = tokens.shape[1]
        with autocast(world.device, bf16):
            nxt = model.generate_next(
                tokens[:, :-1], text=texts, steps=steps, temperature=temperature, generator=gen
            )
            fake = model.sample(texts, t, steps=steps, temperature=temperature, generator=gen)
            fake_guided = model.sample(
                texts, t, steps=steps, temperature=temperature, generator=gen, cond_scale=guided
            )
        means.add("next_frame_token_acc", (nxt == tokens[:, -1]).float().mean(), b)
        hit = clf(fake.cpu()).argmax(-1) == labels
        means.add("text_game_recognition", hit.float().mean(), b)
        means.add(
            f"text_game_recognition_cfg{guided:g}",
            (clf(fake_guided.cpu()).argmax(-1) == labels).float().mean(),
            b,
        )
        for label, ok in zip(labels.tolist(), hit.tolist()):
            means.add(f"text_game_recognition/{games[label]}", float(ok), 1)
        if shown is None:
            shown = (tokens, fake_guided)
            shown_texts = texts
    metrics: dict[str, Any] = means.result()  # per game: only the games of the scored clips
    metrics["classifier_steps"] = int(ev.get("classifier_steps", 300))
    metrics["cond_scale_guided"] = guided

    media: dict[str, Path] = {}
    if shown is not None:
        k = min(int(ev.get("media_samples", 4)), shown[0].shape[0])
        real = decode_clip(parts.tokenizer, shown[0][:k], bf16).cpu()  # (k, C, T, H, W)
        fake = decode_clip(parts.tokenizer, shown[1][:k], bf16).cpu()
        pair = torch.cat([side_by_side(r, f) for r, f in zip(real, fake)], dim=2)  # rows
        media["text_to_video_mp4"] = save_mp4(pair, run_dir / "text_to_video.mp4", fps=8, scale=4)
        media["text_to_video_gif"] = save_gif(pair, run_dir / "text_to_video.gif", fps=8, scale=4)
        (run_dir / "text_to_video.txt").write_text("\n".join(shown_texts[:k]) + "\n")
        scenes = list(dict.fromkeys(shown_texts))[:2] or shown_texts[:1]
        path, _ = make_video(
            model,
            parts.tokenizer,
            scenes,
            run_dir / "make_video.mp4",
            prime_frames=max(1, model.max_frames // 4),
            bf16=bf16,
            steps=steps,
            temperature=temperature,
            generator=gen,
            cond_scale=guided,
        )
        media["make_video_mp4"] = path
    return metrics, media, n


def main(argv: list[str] | None = None) -> None:
    """`python -m worldmodel.eval.text_video CHECKPOINT TEXT [TEXT ...] --out video.mp4`."""
    p = argparse.ArgumentParser(description="Multi-scene text-to-video with a Phenaki checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("texts", nargs="+", help="one caption per scene")
    p.add_argument("--out", default="video.mp4")
    p.add_argument("--frames", type=int, default=None, help="frames per scene (max_frames)")
    p.add_argument("--prime", type=int, default=1, help="frames carried into the next scene")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cond-scale", type=float, default=3.0)
    p.add_argument("--critic", default=None, help="'self' or a critic checkpoint")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    parts = World.load(args.checkpoint)
    model = parts.dynamics
    critic: Any = args.critic
    if critic and critic != "self":
        critic, _, _ = load_model(critic, device=parts.device)
    path, video = make_video(
        model,
        parts.tokenizer,
        args.texts,
        args.out,
        frames_per_scene=args.frames,
        prime_frames=args.prime,
        steps=args.steps,
        temperature=args.temperature,
        cond_scale=args.cond_scale,
        critic=critic,
        generator=parts.generator(args.seed),
    )
    print(f"{path}: {video.shape[1]} frames")


if __name__ == "__main__":
    main()
