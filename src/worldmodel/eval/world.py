"""World-model evaluation (`task=eval` of a dynamics model; the LAM's is in `eval.lam`).

`evaluate_dynamics` scores a world the way Genie does, in pixels through its frozen tokenizer,
and beside what trivial models get (DESIGN.md, "Evaluation principles"):

- next-frame PSNR/SSIM (teacher-forced) and autoregressive rollout PSNR against the horizon;
- on the frames that change (about a fifth of consecutive CoinRun frames are identical), the
  PSNR of the pooled MSE of the rollout, of copying the last context frame and of copying the
  previous real frame, per horizon: numbers an exact repeat cannot inflate;
- ΔtPSNR: rollouts under the clips' own actions minus rollouts under uniformly random actions
  (the headline `delta_psnr`, Genie's definition) and minus rollouts under the real actions of
  another clip, paired per clip, with standard errors clustered by episode;
- control accuracy: the world rolls out under commanded true actions and an inverse-dynamics
  model trained on the data's real train transitions reads the actions back
  (`eval.control`), beside the same IDM on real transitions (the ceiling) and chance;
- an FVD-style distance between real and generated clips, and generation speed.

Token clips come from `worldmodel.pipeline.token_datasets` and pixel clips from the same split
with the same enumeration, so clip i of both is the same frames. With a tokenizer that
compresses time (C-ViViT, a temporal VQ-VAE) a latent frame covers several pixel frames
(`FrameLayout`): generated latent frames are decoded together with the real latent frames before
them, as one clip, and scored against the pixel frames they cover, so rollout curves and ΔtPSNR
count pixel frames for every tokenizer.

It returns `(metrics, media, num_clips)` for `eval.runner.evaluate`, which writes eval.json.
Sampling uses a fixed `torch.Generator` (seed `cfg.seed`) and the masked-token loss runs under a
forked, seeded global RNG: the same checkpoint and config give the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from worldmodel.config import instantiate
from worldmodel.eval import metrics as M
from worldmodel.eval.clips import (
    EvalClips,
    PairedClips,
    clip_episodes,
    concat_rows,
    eval_subset,
    frame_scores,
    pixel_val,
    progress,
    save_rollout_media,
    seeded,
    text_context,
    to_cpu,
    token_val,
    true_action_mapping,
)
from worldmodel.eval.control import (
    cached_idm,
    control_accuracy,
    control_chance,
    control_confusion,
    control_labels,
    held_commands,
)
from worldmodel.eval.fvd import FeatureStats, build_feature_net, frechet_distance, fvd_metric_name
from worldmodel.eval.memory import evaluate_memory, long_rollouts
from worldmodel.media import plot_curve, save_grid
from worldmodel.metrics import RunningMeans
from worldmodel.models.idm import InverseDynamicsModel
from worldmodel.runtime import autocast
from worldmodel.world import FrameLayout, World

log = logging.getLogger(__name__)

# ΔtPSNR is reported at this horizon (Genie's t = 4), or at the largest one if rollouts are shorter.
DELTA_PSNR_T = 4


# ------------------------------------------------------------------------------------------------
# Dynamics model
# ------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """MaskGIT decoding settings used for every generated frame of an evaluation."""

    steps: int = 8
    temperature: float = 1.0
    generator: torch.Generator | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "temperature": self.temperature, "generator": self.generator}


@torch.no_grad()
def _teacher_forced(
    world: World, batch: dict[str, Tensor], sampling: Sampling, bf16: bool, means: RunningMeans
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Generate every frame t >= 1 from the real tokens of frames 0..t-1 and the action that led
    to it; score the decoded frames against the real pixels. Returns (real, generated) frames
    (B, C, L-1, H, W), L = the frames that fit the model's window, and their `rollout_errors`
    (on the CPU) beside copying the previous real frame."""
    model = world.dynamics
    video = batch["video"]  # (B, C, T, H, W)
    layout = FrameLayout.of(world.tokenizer, video.shape[2], batch["tokens"].shape[1])
    length = min(batch["tokens"].shape[1], model.max_frames)
    tokens = batch["tokens"][:, :length]  # (B, L, h, w)
    actions = batch["actions"][:, :length]  # (B, L)
    b = tokens.shape[0]
    with autocast(world.device, bf16):
        cache = text_context(model, actions)
        if cache is None:
            cache = model.new_cache(tokens[:, :1], actions[:, :0])
        generated = [
            model.generate_next(tokens[:, :t], actions[:, :t], cache=cache, **sampling.kwargs())
            for t in range(1, length)
        ]
    generated = torch.stack(generated, dim=1)  # (B, L-1, h, w)
    if layout.k == 1:  # each frame decoded with the real frame before it
        pred = world.decode_teacher_forced(generated, video[:, :, : length - 1])
    else:  # frame t decoded after the real frames 0..t-1 it was generated from
        pred = torch.cat(
            [world.decode_after(tokens[:, :t], generated[:, t - 1 : t]) for t in range(1, length)],
            dim=2,
        )
    span = layout.span(1, length)
    real = video[:, :, span]  # (B, C, n, H, W): the pixel frames of latent frames 1..L-1
    frame_scores(means, pred, real)
    means.add("token_acc", (generated == tokens[:, 1:]).float().mean(), b)
    if layout.k == 1:
        recon = world.decode_teacher_forced(tokens[:, 1:], video[:, :, : length - 1])
    else:
        recon = world.decode_after(tokens[:, :1], tokens[:, 1:])
    means.add("tokenizer_psnr", M.psnr(recon, real), b)
    return real, pred, to_cpu(M.rollout_errors(pred, video, span.start))


def _replace_tail(actions: Tensor, context: int, tail: Tensor) -> Tensor:
    """`actions` (B, T) with those that drive a rollout after `context` frames (actions[:, t]
    leads to frame t + 1, so from index context - 1 on) replaced by `tail` (B, n <= T - context
    + 1); the actions between the context frames stay."""
    out = actions.clone()
    out[:, context - 1 : context - 1 + tail.shape[1]] = tail
    return out


def _random_actions(
    actions: Tensor, context: int, num_actions: int, gen: torch.Generator
) -> Tensor:
    """The same actions for the context frames, uniformly random ones for the generated frames."""
    shape = (actions.shape[0], actions.shape[1] - context + 1)
    random = torch.randint(0, num_actions, shape, generator=gen, device=gen.device)
    return _replace_tail(actions, context, random.to(actions))


@torch.no_grad()
def _rollout(
    world: World,
    tokens: Tensor,
    actions: Tensor,
    context: int,
    horizon: int,
    sampling: Sampling,
    bf16: bool,
    context_frame: Tensor | None = None,
) -> Tensor:
    """Decoded pixel frames (B, C, n, H, W) of `horizon` latent frames generated
    autoregressively after `context` real token frames of `tokens` (B, T, h, w), driven by
    `actions` (B, T) (n = horizon for per-frame tokens); a refining tokenizer decodes from
    `context_frame` (B, C, H, W), the last real context frame."""
    with autocast(world.device, bf16):
        generated = world.dynamics.rollout(
            tokens[:, :context], actions, horizon, **sampling.kwargs()
        )  # (B, horizon, h, w)
    return world.decode_after(tokens[:, :context], generated, context_frame)


@torch.no_grad()
def generation_speed(
    world: World, tokens: Tensor, actions: Tensor, frames: int, sampling: Sampling, bf16: bool
) -> float:
    """Pixel frames per second of `generate_next` with the KV cache, one clip at a time (batch
    1), from the context `tokens` (1, c, h, w) with `actions` (1, >= c + frames - 1); decoding
    excluded. A latent frame of a tokenizer that compresses time counts as the k pixel frames it
    decodes to."""
    model = world.dynamics
    c = tokens.shape[1]
    frames = max(1, min(frames, model.max_frames - c))
    with autocast(world.device, bf16):
        text = text_context(model, actions)
        model.generate_next(tokens, actions[:, :c], cache=text, **sampling.kwargs())  # warm-up
        cache = text if text is not None else model.new_cache(tokens, actions[:, : c - 1])
        start = time.perf_counter()
        for _ in range(frames):
            t = tokens.shape[1]
            frame = model.generate_next(tokens, actions[:, :t], cache=cache, **sampling.kwargs())
            tokens = torch.cat([tokens, frame[:, None]], dim=1)
        elapsed = time.perf_counter() - start
    return frames * world.frames_per_latent / elapsed


def _delta_metrics(
    name: str, psnr_actions: Tensor, psnr_baseline: Tensor, clusters: Any
) -> dict[str, Any]:
    """ΔtPSNR of rollouts under the clips' actions against rollouts under baseline actions
    ((N, H) per-clip PSNR each, paired): the value at t = 4 (or the largest horizon when
    rollouts are shorter) as `name` and `name_stderr`, and the curves over horizons 1..H as
    `name_curve` and `name_curve_stderr`; standard errors clustered by `clusters` (N,)."""
    delta = M.delta_psnr(psnr_actions, psnr_baseline, clusters)
    mean, stderr = delta["mean"].tolist(), delta["stderr"].tolist()
    t = min(DELTA_PSNR_T, len(mean))
    return {
        name: mean[t - 1],
        f"{name}_stderr": stderr[t - 1],
        f"{name}_curve": mean,
        f"{name}_curve_stderr": stderr,
    }


def latent_frames(world: World, pixels: Any) -> int:
    """Latent frames of the token clips of `pixels`' clips (= their frames for per-frame tokens)."""
    if world.frames_per_latent == 1:
        return int(pixels.clip_length)
    return int(world.tokenizer.latent_shape(pixels.clip_length, *pixels.resolution)[0])


def _rollout_lengths(cfg: DictConfig, clip_length: int) -> tuple[int, int]:
    """(context frames, horizon) of the rollouts; the horizon is cut to what the clips hold."""
    context = int(cfg.eval.get("context_frames", 1))
    horizon = int(cfg.eval.get("horizon", 8))
    if context < 1 or context >= clip_length:
        raise ValueError(
            f"eval.context_frames={context} must be in [1, data.clip_length={clip_length})"
        )
    if horizon < 1:
        raise ValueError(f"eval.horizon={horizon} must be >= 1")
    if context + horizon > clip_length:
        log.warning(
            "eval.horizon=%d does not fit clips of %d frames after %d context frames: using %d",
            horizon,
            clip_length,
            context,
            clip_length - context,
        )
        horizon = clip_length - context
    return context, horizon


# ------------------------------------------------------------------------------------------------
# Control accuracy
# ------------------------------------------------------------------------------------------------


@dataclass
class Control:
    """What control accuracy needs: the IDM of the data and the model action of each true
    action (`table` (A,) long on the world's device, -1 where a true action has none)."""

    idm: InverseDynamicsModel
    table: Tensor
    # the model's actions are the game's: the rollouts under uniformly random actions of ΔtPSNR
    # are rollouts under uniformly random commands, and serve both (only with hold = 1)
    shared: bool
    # each command is held for 1..hold steps (`eval.control.hold`), as the recording held them
    hold: int = 1

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        """True actions (`shape`: (B, T) rows of commands, or (N,) one row) drawn uniformly from
        those the model can be commanded with, each held 1..`hold` steps
        (`eval.control.held_commands`)."""
        allowed = torch.nonzero(self.table >= 0).flatten().to(gen.device)
        rows = tuple(shape) if len(shape) == 2 else (1, math.prod(shape))  # (B, T)
        commands = held_commands(allowed, rows, self.hold, gen)  # (B, T)
        return commands.reshape(shape).to(self.table.device)


def _control_setup(world: World, cfg: DictConfig, pixels: Any, tokens: Any) -> Control | None:
    """The IDM (trained once per data cache on the train split's real transitions, see
    `eval.control.cached_idm`) and the command table of `world`; None, with the reason logged,
    when control accuracy cannot be measured."""
    settings = cfg.eval.get("control") or {}
    why = None
    if not settings.get("enabled", True):
        why = "eval.control.enabled=false"
    elif pixels.num_actions is None:
        why = "the data has no true actions"
    elif world.dynamics.conditioning != "actions":
        why = f"{type(world.dynamics).__name__} is conditioned on text, not on one action a frame"
    if why is not None:
        log.info("control accuracy not reported: %s", why)
        return None
    num_true = int(pixels.num_actions)
    if world.action_source == "true":
        if world.num_actions < num_true:
            log.warning(
                "control accuracy not reported: the model takes %d actions, the data has %d",
                world.num_actions,
                num_true,
            )
            return None
        table = torch.arange(num_true)
    else:
        mapping = world.true_to_model_actions
        if not mapping:  # learned on the validation split: the test split is for reporting only
            held_out = pixels if pixels.split == "val" else pixel_val(cfg.data, "val")
            found = true_action_mapping(
                held_out, token_val(world, held_out), world.num_actions, onsets=True
            )
            mapping = found[1] if found is not None else {}
        table = torch.full((num_true,), -1, dtype=torch.long)
        for action, code in mapping.items():
            if 0 <= int(action) < num_true and 0 <= int(code) < world.num_actions:
                table[int(action)] = int(code)
    train = instantiate(cfg.data).datasets()[0]
    recorded = np.unique(np.load(train.actions_path, mmap_mode="r"))
    recorded = recorded[(recorded >= 0) & (recorded < num_true)]
    if not len(recorded):
        log.warning("control accuracy not reported: the train split has no known action")
        return None
    # commands are drawn from the actions the recording policy took (a policy restricted to a
    # game's distinct moves, `data.action_set`, leaves the others out): the IDM never saw the rest
    seen = torch.zeros(num_true, dtype=torch.bool)
    seen[torch.from_numpy(recorded)] = True
    table[~seen] = -1
    if int((table >= 0).sum()) < 2:
        log.warning("control accuracy not reported: fewer than 2 true actions map to the model's")
        return None
    idm = cached_idm(
        train,
        num_true,
        steps=int(settings.get("steps", 300)),
        batch_size=int(settings.get("batch_size", 128)),
        max_epochs=settings.get("max_epochs"),
        seed=int(cfg.seed),
        device=world.device,
    )
    hold = int(settings.get("hold", 1))
    shared = world.action_source == "true" and world.num_actions == num_true and hold == 1
    return Control(idm, table.to(world.device), shared, hold)


def _command_transitions(
    video: Tensor, generated: Tensor, start: int, k: int, horizon: int
) -> tuple[Tensor, Tensor]:
    """The pixel transition each command of a rollout drives, (frame before, frame after), each
    (B, C, horizon, H, W). Command j leads to the first pixel frame of generated latent frame j
    (frame k j of `generated` (B, C, k horizon, H, W)) from the pixel frame before it: the last
    real context frame `video[:, :, start - 1]` for j = 0, else the last generated frame of
    latent frame j - 1."""
    after = generated[:, :, ::k][:, :, :horizon]
    before = torch.cat([video[:, :, start - 1 : start], generated[:, :, k - 1 :: k]], dim=2)
    return before[:, :, :horizon], after


def _control_scores(
    means: RunningMeans,
    control: Control,
    video: Tensor,
    generated: Tensor,
    commands: Tensor,
    true_actions: Tensor,
    start: int,
    k: int,
) -> Tensor:
    """Score the commanded transitions of a batch of rollouts with the IDM, and accumulate its
    accuracy on the batch's real transitions (`control_accuracy_real`, weighted by the
    transitions scored). Returns the IDM's labels (B, horizon) long on the CPU."""
    before, after = _command_transitions(video, generated, start, k, commands.shape[1])
    labels = true_actions[:, :-1]  # (B, T-1): the action of transition t -> t + 1
    known = int((labels >= 0).sum())
    if known:
        real = control_accuracy(control.idm, video[:, :, :-1], video[:, :, 1:], labels)
        means.add("control_accuracy_real", real, known)
    return control_labels(control.idm, before, after, commands)


# ------------------------------------------------------------------------------------------------
# World evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dynamics(
    world: World, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path], int]:
    """Next-frame quality, rollouts vs horizon beside trivial baselines, ΔtPSNR, control
    accuracy, FVD and speed of a world.

    `cfg` is the eval run's config (data, eval); the world brings its frozen tokenizer/LAM, the
    action source, its device and precision. With a tokenizer that compresses time,
    eval.context_frames and eval.horizon count latent frames, and the rollout curves count the
    pixel frames they decode to.

    The headline `delta_psnr` is ΔtPSNR at t = 4 against uniformly random actions (Genie's
    definition); `delta_psnr_vs_other_clip` is the same against the real actions of another
    clip. Both are paired per clip, their standard errors clustered by episode
    (`delta_psnr_clusters` episodes). `rollout_psnr_changing`, `copy_psnr_changing` (the last
    context frame repeated) and `copy_previous_psnr_changing` (the previous real frame) are
    PSNRs of the pooled MSE over the frames that change, per horizon; `rollout_psnr` is the
    mean per-frame PSNR per horizon (Genie's curve). `control_accuracy`,
    `control_accuracy_real`, `control_chance` and `control_chance_uniform` (1 / the commandable
    actions) (with `control_hold`, how long each command
    was held, and `control_confusion`, commanded x read) are left out when the data has no true
    actions or the model is conditioned on text (the reason is logged).
    """
    model, device = world.dynamics, world.device
    pixels = pixel_val(cfg.data, str(cfg.eval.get("split", "val")))
    layout = FrameLayout.of(world.tokenizer, pixels.clip_length, latent_frames(world, pixels))
    tokens_val = token_val(world, pixels)
    indices = list(eval_subset(pixels, cfg).indices)
    episodes = clip_episodes(pixels, indices)  # (N,): clips are scored in this order
    loader = DataLoader(
        EvalClips(PairedClips(tokens_val, pixels), indices), batch_size=int(cfg.eval.batch_size)
    )
    context, horizon = _rollout_lengths(cfg, layout.latents)
    span = layout.span(context, context + horizon)  # the pixel frames the rollouts generate
    bf16 = world.bf16
    gen = world.generator(int(cfg.seed))
    sampling = Sampling(int(cfg.eval.get("steps", 8)), float(cfg.eval.get("temperature", 1.0)), gen)
    control = _control_setup(world, cfg, pixels, tokens_val)
    feature_net = build_feature_net(cfg.eval.get("fvd_weights"), seed=int(cfg.seed)).to(device)
    real_feats, fake_feats = FeatureStats(), FeatureStats()
    means = RunningMeans()
    psnr_rows: dict[str, list[Tensor]] = {"actions": [], "random": [], "other": []}  # (B, n)
    errors: dict[str, list[dict[str, Tensor]]] = {"next": [], "actions": [], "random": []}
    commands_all: list[Tensor] = []
    hits_all: list[Tensor] = []  # (B, horizon) bool: the IDM read the commanded action back
    labels_all: list[Tensor] = []  # (B, horizon) long: the action the IDM read
    shown: dict[str, tuple[Tensor, Tensor]] = {}
    samples = int(cfg.eval.get("media_samples", 4))
    n = 0
    for i, batch in enumerate(progress(loader, cfg, "eval dynamics")):
        batch = {k: v.to(device) for k, v in batch.items()}
        if "latents" in batch:  # a model with its own quantizer over the tokenizer's latents
            batch["tokens"] = model.encode(batch["latents"])  # (B, T, h, w) its codes
        b = batch["tokens"].shape[0]
        n += b
        window = {k: batch[k][:, : model.max_frames] for k in ("tokens", "actions", "mask")}
        with seeded(int(cfg.seed) + i), autocast(device, bf16):
            _, loss_metrics = model.loss(window)
        for key in ("ce", "masked_acc"):
            means.add(key, loss_metrics[key], b)
        real_next, pred_next, next_errors = _teacher_forced(world, batch, sampling, bf16, means)
        errors["next"].append(next_errors)

        tokens, actions, video = batch["tokens"], batch["actions"], batch["video"]
        commands = control.draw((b, horizon), gen) if control is not None else None  # true ids
        if control is not None and control.shared:
            random = _replace_tail(actions, context, control.table[commands])
        else:
            random = _random_actions(actions, context, world.num_actions, gen)
        other = _replace_tail(actions, context, batch["other_actions"][:, context - 1 :])
        last = video[:, :, span.start - 1]  # the last real frame before the generated ones
        fake = _rollout(world, tokens, actions, context, horizon, sampling, bf16, last)
        fake_random = _rollout(world, tokens, random, context, horizon, sampling, bf16, last)
        fake_other = _rollout(world, tokens, other, context, horizon, sampling, bf16, last)
        real = video[:, :, span]  # (B, C, n, H, W)
        for name, generated in (("actions", fake), ("random", fake_random), ("other", fake_other)):
            psnr_rows[name].append(M.psnr(generated, real, reduction="none").cpu())  # (B, n)
        errors["actions"].append(to_cpu(M.rollout_errors(fake, video, span.start)))
        errors["random"].append(to_cpu(M.rollout_errors(fake_random, video, span.start)))
        if control is not None:
            if control.shared:
                fake_command = fake_random
            else:
                commanded = _replace_tail(actions, context, control.table[commands])
                fake_command = _rollout(
                    world, tokens, commanded, context, horizon, sampling, bf16, last
                )
            labels = _control_scores(
                means,
                control,
                video,
                fake_command,
                commands,
                batch["true_actions"],
                span.start,
                layout.k,
            )
            hits_all.append(labels == commands.cpu())
            labels_all.append(labels)
            commands_all.append(commands.cpu())
        # FVD compares whole clips: the real context frames followed by the real / generated ones
        real_clip = video[:, :, : span.stop]
        fake_clip = torch.cat([video[:, :, : span.start], fake], dim=2)
        real_feats.update(feature_net(real_clip).cpu())
        fake_feats.update(feature_net(fake_clip).cpu())
        if not shown:
            shown["next"] = (real_next[:samples].cpu(), pred_next[:samples].cpu())
            shown["rollout"] = (real_clip[:samples].cpu(), fake_clip[:samples].cpu())
            first = (tokens[:1, :context], actions[:1])

    psnr_t = {k: torch.cat(v) for k, v in psnr_rows.items()}  # (N, n) each
    metrics: dict[str, Any] = means.result()
    metrics["action_source"] = world.action_source
    metrics["steps"] = sampling.steps
    metrics["temperature"] = sampling.temperature

    # trivial baselines on the frames that change (pooled MSE), next frame and per horizon
    next_frame = M.rollout_psnr_summary(concat_rows(errors["next"]))
    rollout = M.rollout_psnr_summary(concat_rows(errors["actions"]))
    metrics["next_frame_psnr_changing"] = next_frame["model_psnr"]
    metrics["next_frame_copy_psnr_changing"] = next_frame["copy_previous_psnr"]
    metrics["rollout_psnr_changing"] = rollout["model_psnr_curve"]
    metrics["rollout_psnr_random_changing"] = M.rollout_psnr_summary(concat_rows(errors["random"]))[
        "model_psnr_curve"
    ]
    metrics["copy_psnr_changing"] = rollout["copy_context_psnr_curve"]
    metrics["copy_previous_psnr_changing"] = rollout["copy_previous_psnr_curve"]
    metrics["changing_fraction"] = rollout["changing_fraction"]
    metrics["changing_fraction_curve"] = rollout["changing_fraction_curve"]

    # Genie's curves and ΔtPSNR (per-frame PSNR, paired per clip, clustered by episode)
    metrics["rollout_psnr"] = psnr_t["actions"].mean(dim=0).tolist()
    metrics["rollout_psnr_random"] = psnr_t["random"].mean(dim=0).tolist()
    metrics["rollout_psnr_other_clip"] = psnr_t["other"].mean(dim=0).tolist()
    delta = _delta_metrics("delta_psnr", psnr_t["actions"], psnr_t["random"], episodes)
    for t, (m, s) in enumerate(zip(delta["delta_psnr_curve"], delta["delta_psnr_curve_stderr"])):
        metrics[f"delta_psnr_t{t + 1}"] = m
        metrics[f"delta_psnr_t{t + 1}_stderr"] = s
    metrics.update(delta)
    metrics["delta_psnr_horizon"] = min(DELTA_PSNR_T, psnr_t["actions"].shape[1])
    metrics["delta_psnr_clips"] = n
    metrics["delta_psnr_clusters"] = len(np.unique(episodes))
    metrics.update(
        _delta_metrics("delta_psnr_vs_other_clip", psnr_t["actions"], psnr_t["other"], episodes)
    )

    if control is not None:
        per_clip = torch.cat(hits_all).double().mean(dim=1)  # (N,) accuracy of each clip
        metrics["control_accuracy"] = float(per_clip.mean())
        metrics["control_accuracy_stderr"] = float(M.clustered_stderr(per_clip, episodes))
        metrics.setdefault("control_accuracy_real", float("nan"))
        metrics["control_chance"] = control_chance(torch.cat(commands_all))
        # commands are uniform over the commandable actions: chance by construction (held
        # commands make the draw's most frequent share, `control_chance`, noisier above it)
        metrics["control_chance_uniform"] = 1.0 / int((control.table >= 0).sum())
        metrics["control_hold"] = control.hold
        # commanded (rows) x read (columns) over the true actions, which commands fail how
        metrics["control_confusion"] = control_confusion(
            torch.cat(commands_all), torch.cat(labels_all), len(control.table)
        ).tolist()
    if n >= 2:
        metrics[fvd_metric_name(feature_net)] = frechet_distance(
            real_feats.mean, real_feats.cov, fake_feats.mean, fake_feats.cov
        )
    else:
        log.warning("FVD needs at least 2 clips, got %d: not reported", n)
    metrics["gen_fps"] = generation_speed(world, *first, horizon, sampling, bf16)
    # after every other figure, so turning them on leaves those (and their random draws) alone
    if (cfg.eval.get("memory") or {}).get("enabled", False):
        metrics.update(evaluate_memory(world, cfg, sampling.kwargs()))
    if int(cfg.eval.get("long_horizon") or 0) > 0:
        metrics.update(long_rollouts(world, cfg, sampling.kwargs()))

    label = "latent actions" if world.action_source == "latent" else "true actions"
    horizons = list(range(1, span.stop - span.start + 1))  # pixel frames after the context
    media = {
        "next_frame_grid": save_grid(list(shown["next"]), run_dir / "next_frame.png"),
        "rollout_psnr_plot": plot_curve(
            horizons,
            {
                f"model, {label}": metrics["rollout_psnr_changing"],
                "model, random actions": metrics["rollout_psnr_random_changing"],
                "copy context frame": metrics["copy_psnr_changing"],
                "copy previous real frame": metrics["copy_previous_psnr_changing"],
            },
            run_dir / "rollout_psnr.png",
            ylabel="PSNR of pooled MSE (dB)",
            title=f"frames that change ({metrics['changing_fraction']:.0%}), "
            f"after {span.start} real frame(s)",
        ),
        "delta_psnr_plot": plot_curve(
            horizons,
            {
                "vs random actions": metrics["delta_psnr_curve"],
                "vs another clip's actions": metrics["delta_psnr_vs_other_clip_curve"],
            },
            run_dir / "delta_psnr.png",
            ylabel="ΔtPSNR (dB)",
            title=f"{label} ({n} clips, {metrics['delta_psnr_clusters']} episodes, ± stderr)",
            yerr={
                "vs random actions": metrics["delta_psnr_curve_stderr"],
                "vs another clip's actions": metrics["delta_psnr_vs_other_clip_curve_stderr"],
            },
        ),
        **save_rollout_media(*shown["rollout"], run_dir, "rollout"),
    }
    if "rollout_psnr_changing_long" in metrics:
        long = metrics["rollout_psnr_changing_long"]
        media["long_rollout_psnr_plot"] = plot_curve(
            list(range(1, len(long) + 1)),
            {f"model, {label}": long, "copy context frame": metrics["copy_psnr_changing_long"]},
            run_dir / "long_rollout_psnr.png",
            ylabel="PSNR of pooled MSE (dB)",
            title=f"frames that change, {metrics['long_clips']} clips after "
            f"{metrics['long_context_frames']} real frame(s)",
        )
    return metrics, media, n
