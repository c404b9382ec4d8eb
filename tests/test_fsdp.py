"""FSDP2 (`trainer.strategy=fsdp`) on 2 gloo processes on the CPU: the same losses as DDP (fp32,
bf16, a GAN), a stopped run resumed gives the uninterrupted losses, checkpoints are whole state
dicts in the single-process format, each rank holds half the weights, EMA codebooks learn from
every rank, a NaN on one rank skips the step on all, and `validate` refuses what cannot run. The
GPU-scale Genie recipe composes and validates here without training.

The 2-rank runs are the smoke LAM (space-time transformer blocks, a k-means initialised EMA VQ
codebook, EMA weights) for 4 steps. They all run in one pair of spawned processes, one after the
other (each with a process group of its own), because starting the processes and importing torch
costs more than the runs themselves; each test reads what it needs from their files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from conftest import logged_losses as losses
from einops import rearrange
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torch import nn

from worldmodel.build import build_model
from worldmodel.config import ConfigError, optim_settings, validate
from worldmodel.models.quantize import build_quantizer
from worldmodel.tasks import pipeline
from worldmodel.train import checkpoint as ckpt
from worldmodel.train import dist, loop, parallel
from worldmodel.train.optim import LRSchedule, adamw

LAM = "experiment=smoke_lam"
SMOKE = [
    "trainer=ddp",  # 2 processes on the CPU, gloo
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.val_every=1000",  # validation (EMA weights) and a checkpoint at the end only
    "trainer.ckpt_every=1000",
    "trainer.val_at_start=false",
    "trainer.val_batches=1",
    "trainer.lr_schedule=constant",  # a run stopped at step 2 has the same LR as a whole one
    "trainer.max_steps=4",
    "trainer.grad_clip=0.01",  # below the smoke LAM's gradient norms: every step is clipped
]
# The runs, each (name, overrides); a name that comes twice continues in the same folder.
# A GAN tokenizer (a CNN: FSDP shards it as one unit), its discriminator stepped from step 1 on.
GAN = ["experiment=smoke_tokenizer", "model.gan_weight=0.1", "model.gan_start_step=1"]
RUNS = [
    ("ddp", [LAM, "trainer.precision=fp32"]),
    ("fsdp", [LAM, "trainer.precision=fp32", "trainer.strategy=fsdp"]),
    # stopped after 2 steps, then the same command resumes it; activation checkpointing on
    ("fsdp_split", [LAM, "trainer.precision=fp32", "trainer.strategy=fsdp", "trainer.max_steps=2",
                    "trainer.activation_checkpointing=true"]),
    ("fsdp_split", [LAM, "trainer.precision=fp32", "trainer.strategy=fsdp",
                    "trainer.activation_checkpointing=true"]),
    ("ddp_bf16", [LAM, "trainer.precision=bf16"]),
    ("fsdp_bf16", [LAM, "trainer.precision=bf16", "trainer.strategy=fsdp"]),
    ("ddp_gan", [*GAN, "trainer.precision=fp32", "trainer.max_steps=3"]),
    # 2 micro-batches a step: DDP reduces once, FSDP after each (its sharded gradients add up)
    ("ddp_accum", [LAM, "trainer.precision=fp32", "trainer.grad_accum=2", "trainer.max_steps=2"]),
    ("fsdp_accum", [LAM, "trainer.precision=fp32", "trainer.grad_accum=2", "trainer.max_steps=2",
                    "trainer.strategy=fsdp"]),
    ("fsdp_gan", [*GAN, "trainer.precision=fp32", "trainer.max_steps=3", "trainer.strategy=fsdp"]),
]  # fmt: skip
# FSDP reduce-scatters where DDP all-reduces: the sums may come in another order (fp32
# rounding). Measured: the same losses, gradient norms 8e-7 apart (relative).
FP32_RTOL = 1e-5
# bf16: FSDP's blocks keep their residual stream in bf16 (train/parallel.py), DDP's in fp32.
# Measured: losses 7e-4 apart (relative), validation losses 2e-5.
BF16_RTOL = 1e-2


# ---------------------------------------------------------------- the 2-rank runs


class TwoClusters(nn.Module):
    """Rank r's latents lie around (CENTERS[r], CENTERS[r]): an EMA codebook that learns from
    every rank has a code near each centre (test_loop_fixes has the DDP version)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # FSDP2 shards no 0-dim parameter
        self.quantizer = build_quantizer(
            "vq", 2, codebook_size=4, decay=0.9, kmeans_init=True, threshold_ema_dead_code=1
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = batch["x"] * self.scale  # (B, D)
        codes, _, aux, _ = self.quantizer(rearrange(z, "b d -> b d 1"))  # (B, D, 1)
        return aux + (rearrange(codes, "b d 1 -> b d") - z).pow(2).mean(), {}


CENTERS = (3.0, -3.0)


def _codebooks_and_shards(env: dist.DistEnv, out_dir: Path, lam: dict) -> None:
    """TwoClusters sharded with FSDP, 8 training forwards; each rank saves its codebook. Then
    the smoke LAM sharded: each rank saves how many parameter elements it holds."""
    dist.init_process_group(env, "gloo", "cpu")
    try:
        torch.manual_seed(0)
        model = TwoClusters()
        parallel.shard(model, torch.device("cpu"), bf16=False)
        wrapped = loop.wrap(model, env, sharded=True)
        g = torch.Generator().manual_seed(env.rank)
        for _ in range(8):
            x = CENTERS[env.rank] + 0.2 * torch.randn(32, 2, generator=g)
            loss, _ = wrapped({"x": x}, 0)
            loss.backward()
        buffers = {k: v.clone() for k, v in model.quantizer.named_buffers()}
        torch.save(buffers, out_dir / f"codebook_rank{env.rank}.pt")

        model = build_model(OmegaConf.create(lam).model)
        total = sum(p.numel() for p in model.parameters())
        parallel.shard(model, torch.device("cpu"), bf16=False)
        held = sum(p.to_local().numel() for p in model.parameters())  # this rank's shards
        (out_dir / f"shard_rank{env.rank}.json").write_text(json.dumps([held, total]))

        _nonfinite_steps(env, out_dir)
    finally:
        dist.destroy_process_group()


class Regression(nn.Module):
    """A linear fit: the smallest model the loop's `train_step` can step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return (self.lin(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean(), {}


def _nonfinite_steps(env: dist.DistEnv, out_dir: Path) -> None:
    """Three `loop.train_step`s of a sharded Regression; rank 1's second batch holds a NaN. Each
    rank saves which steps were taken and its whole weights after each step."""
    torch.manual_seed(0)
    model = Regression()
    parallel.shard(model, torch.device("cpu"), bf16=False)
    cfg = OmegaConf.create({"trainer": {"grad_accum": 1, "precision": "fp32", "grad_clip": 1.0}})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    run = loop.Run(
        cfg, model, None, None, list(model.parameters()), opt, None, 0.1,
        LRSchedule(0, 10, "constant"), None, loop.Clock(), sharded=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(env.rank)
    batches = []
    for i in range(3):
        x = torch.randn(8, 4, generator=g)  # (B, 4)
        if i == 1 and env.rank == 1:
            x[0, 0] = float("nan")
        batches.append({"x": x, "y": x.sum(-1), "tokens": torch.zeros(8, 1)})
    wrapped = loop.wrap(model, env, sharded=True)
    taken, weights = [], []
    stream = iter(batches)
    for _ in range(3):
        taken.append(loop.train_step(run, wrapped, stream, env, torch.device("cpu")) is not None)
        weights.append(parallel.full_tensor(model.lin.weight))
    torch.save(
        {"taken": taken, "weights": weights, "step": run.step}, out_dir / f"nan_rank{env.rank}.pt"
    )


def _ranks(env: dist.DistEnv, runs: list[tuple[dict, int]], out_dir: str) -> None:
    """Every run in turn on this rank, each in a process group of its own, then the codebooks."""
    torch.set_num_threads(1)
    for plain, port in runs:
        loop._worker(dataclasses.replace(env, master_port=port), plain)
    env = dataclasses.replace(env, master_port=runs[-1][1] + 1)
    _codebooks_and_shards(env, Path(out_dir), runs[0][0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder holding one sub-folder per run of RUNS and the codebook files (~35 s on 2
    quiet cores, 70-110 s beside other work: the tests that read it are marked slow)."""
    root = tmp_path_factory.mktemp("fsdp")
    plain = []
    for name, overrides in RUNS:
        cfg = validate(compose_config([*SMOKE, *overrides], run_dir=root / name))
        plain.append((OmegaConf.to_container(cfg, resolve=True), dist.free_port()))
    threads = torch.get_num_threads()
    try:
        dist.launch(_ranks, 2, plain, str(root))
    finally:
        torch.set_num_threads(threads)
    return root


def close(a: dict[int, float], b: dict[int, float], rtol: float) -> bool:
    return sorted(a) == sorted(b) and all(math.isclose(a[k], b[k], rel_tol=rtol) for k in a)


# ---------------------------------------------------------------- FSDP trains as DDP does


@pytest.mark.slow
def test_fsdp_losses_match_ddp(runs):
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert close(ddp, fsdp, FP32_RTOL), (ddp, fsdp)
    # the clipped gradient norm is over every rank's shards
    norms = [losses(runs / r, "train/grad_norm") for r in ("ddp", "fsdp")]
    assert close(*norms, FP32_RTOL), norms
    # validation with the EMA weights swapped in (DTensor shadows under FSDP)
    vals = [losses(runs / r, "val/loss") for r in ("ddp", "fsdp")]
    assert close(*vals, FP32_RTOL), vals


@pytest.mark.slow
def test_fsdp_trains_a_gan_as_ddp_does(runs):
    # the discriminator stays out of FSDP; its gradients are averaged by the loop, as under DDP
    for key in ("train/loss", "train/grad_norm", "gan/d_loss"):
        ddp, fsdp = losses(runs / "ddp_gan", key), losses(runs / "fsdp_gan", key)
        assert sorted(ddp) == [1, 2, 3] and close(ddp, fsdp, FP32_RTOL), (key, ddp, fsdp)
    assert losses(runs / "fsdp_gan", "gan/d_loss")[3] != 0.0  # the discriminator did train
    state = ckpt.load(runs / "fsdp_gan" / "checkpoints" / "last.pt")
    reference = ckpt.load(runs / "ddp_gan" / "checkpoints" / "last.pt")
    assert state["disc_optimizer"]["state"].keys() == reference["disc_optimizer"]["state"].keys()
    for k, v in reference["model"].items():
        torch.testing.assert_close(state["model"][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_accumulates_gradients_as_ddp_does(runs):
    for key in ("train/loss", "train/grad_norm"):
        ddp, fsdp = losses(runs / "ddp_accum", key), losses(runs / "fsdp_accum", key)
        assert sorted(ddp) == [1, 2] and close(ddp, fsdp, FP32_RTOL), (key, ddp, fsdp)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_ddp(runs):
    ddp, fsdp = losses(runs / "ddp_bf16"), losses(runs / "fsdp_bf16")
    assert close(ddp, fsdp, BF16_RTOL), (ddp, fsdp)
    assert all(math.isfinite(v) for v in fsdp.values())


@pytest.mark.slow
def test_stopped_fsdp_run_resumes_to_the_uninterrupted_losses(runs):
    # 2 steps, stop, the same command again: steps 3 and 4 as in a run that never stopped
    # (and activation checkpointing recomputes the blocks to the same values)
    whole, split = losses(runs / "fsdp"), losses(runs / "fsdp_split")
    assert sorted(split) == [1, 2, 3, 4]
    assert whole == split  # exactly: same ranks, same shards, same order of sums
    assert losses(runs / "fsdp", "val/loss")[4] == losses(runs / "fsdp_split", "val/loss")[4]
    state = ckpt.load(runs / "fsdp_split" / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["data_position"]["batches"] == 4


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_fsdp_checkpoint_is_a_whole_single_process_checkpoint(runs):
    ddp = ckpt.load(runs / "ddp" / "checkpoints" / "last.pt")
    fsdp = ckpt.load(runs / "fsdp" / "checkpoints" / "last.pt")
    assert set(ddp) == set(fsdp)
    for part in ("model", "ema"):
        assert set(ddp[part]) == set(fsdp[part]), part
        for k, v in ddp[part].items():
            w = fsdp[part][k]
            assert type(w) is torch.Tensor and w.shape == v.shape, (part, k)
            if v.is_floating_point():
                torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(w, v), (part, k)
    # the optimizer state keyed by parameter index, as torch.optim writes it
    assert set(ddp["optimizer"]["state"]) == set(fsdp["optimizer"]["state"])
    for a, b in zip(ddp["optimizer"]["param_groups"], fsdp["optimizer"]["param_groups"]):
        assert a == b
    for i, s in ddp["optimizer"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(fsdp["optimizer"]["state"][i][k], v, rtol=1e-4, atol=1e-7)

    # and it loads as is into a model and an optimizer of one process (eval, play, the World)
    cfg = OmegaConf.create(fsdp["config"])
    model = build_model(cfg.model)
    model.load_state_dict(fsdp["model"], strict=True)
    hp = optim_settings(cfg)
    opt = adamw(model.named_parameters(), hp["lr"], hp["weight_decay"], hp["betas"])
    opt.load_state_dict(fsdp["optimizer"])
    assert len(opt.state) == len(fsdp["optimizer"]["state"])


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(runs):
    for r in (0, 1):
        out = torch.load(runs / f"nan_rank{r}.pt")
        assert out["taken"] == [True, False, True] and out["step"] == 2, out
        first, skipped, last = out["weights"]
        assert torch.equal(first, skipped) and not torch.equal(skipped, last)
        assert torch.isfinite(last).all()


@pytest.mark.slow
def test_each_rank_holds_half_the_parameters(runs):
    (held0, total), (held1, _) = (
        json.loads((runs / f"shard_rank{r}.json").read_text()) for r in (0, 1)
    )
    assert held0 + held1 == total  # every element on exactly one rank
    assert max(held0, held1) <= 0.55 * total, (
        held0,
        held1,
        total,
    )  # rows split as evenly as they go


@pytest.mark.slow
def test_fsdp_codebooks_learn_from_every_rank(runs):
    ranks = [torch.load(runs / f"codebook_rank{r}.pt") for r in (0, 1)]
    codes = next(v for k, v in ranks[0].items() if k.endswith("_codebook.embed"))[0]  # (K, D)
    for center in CENTERS:
        nearest = (codes - torch.tensor([center, center])).norm(dim=-1).min()
        assert nearest < 0.5, (center, codes)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


# ---------------------------------------------------------------- one process


def test_activation_checkpointing_keeps_names_and_values():
    cfg = validate(compose_config([LAM, "trainer.precision=fp32"]))
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    torch.manual_seed(0)
    checkpointed = build_model(cfg.model)
    assert parallel.checkpoint_activations(checkpointed) == len(parallel.transformer_blocks(plain))
    assert list(plain.state_dict()) == list(checkpointed.state_dict())  # checkpoints unchanged
    video = torch.rand(2, 3, 4, 64, 64) * 2 - 1  # (B, C, T, H, W)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss, _ = model.loss({"video": video})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_needs_transformer_blocks():
    cfg = validate(compose_config(["experiment=smoke_tokenizer"]))  # a CNN
    with pytest.raises(ValueError, match="no transformer blocks"):
        parallel.checkpoint_activations(build_model(cfg.model))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=fsdp"], "trainer.strategy=fsdp with trainer.devices=1"),
        (["trainer=fsdp", "trainer.devices=1"], "one process has nothing to shard"),
        (["trainer.strategy=zero3"], "trainer.strategy='zero3': expected one of ddp, fsdp"),
        (["trainer=ddp", "trainer.strategy=fsdp", "trainer.compile=true"], "compiling a sharded"),
    ],
)
def test_validate_rejects_what_fsdp_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_fsdp_takes_the_launchers_process_count():
    # torchrun with 8 processes: trainer=fsdp's own `devices: 2` gives way to the launcher's
    cfg = validate(compose_config(["trainer=fsdp"]), environ={"WORLD_SIZE": "8"})
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (8, "fsdp")
    assert cfg.trainer.activation_checkpointing and cfg.trainer.accelerator == "cuda"
    with pytest.raises(ConfigError, match="devices=1"):
        validate(compose_config(["trainer=fsdp"]), environ={"WORLD_SIZE": "1"})


# ---------------------------------------------------------------- the GPU-scale recipe


def test_genie_coinrun_gpu_recipe_composes_and_validates(tmp_path, monkeypatch):
    """Every stage at its published size, bf16 on cuda, for a SLURM job of 8 GPUs with FSDP
    (the command line's overrides reach every stage); composed and validated, nothing built."""
    user = [
        "cluster=slurm",
        "cluster.tasks_per_node=8",
        "trainer.strategy=fsdp",
        "trainer.activation_checkpointing=true",
    ]
    monkeypatch.setattr(pipeline, "_command_line_overrides", lambda: user)
    # Hydra's search path, as `run.py` has it while a pipeline composes its stages
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", ["experiment=genie_coinrun_gpu", *user])
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path)
        stages = {s.name: s.cfg for s in pipeline.compose_stages(cfg)}
    assert list(stages) == ["tokenizer", "lam", "dynamics"]
    for stage in stages.values():
        tr = stage.trainer
        assert (tr.accelerator, tr.precision, tr.backend, tr.devices) == ("cuda", "bf16", "auto", 8)
        assert tr.strategy == "fsdp" and tr.micro_batch * 8 == tr.batch_size
        assert stage.data.clip_length == 16 and stage.data.resolution == 64
    tok, lam, dyn = stages["tokenizer"].model, stages["lam"].model, stages["dynamics"].model
    assert (tok.dim, tok.spatial_depth, tok.temporal_depth, tok.spatial_downsample) == (
        512,
        8,
        8,
        4,
    )
    assert (tok.quantizer.kind, tok.quantizer.codebook_size, tok.latent_dim) == ("vq", 1024, 32)
    assert (lam.dim, lam.enc_depth, lam.dec_depth, lam.num_actions) == (512, 8, 8, 6)
    assert (dyn.dim, dyn.depth, list(dyn.grid), dyn.vocab_size) == (512, 12, [16, 16], 1024)
    assert dyn.pipeline.lam_checkpoint == str(tmp_path / "lam" / "checkpoints" / "last.pt")
    assert [stages[s].trainer.batch_size for s in stages] == [48, 48, 48]


def test_genie_coinrun_gpu_task_check_trains_nothing(tmp_path):
    data = tmp_path / "data"
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "experiment=genie_coinrun_gpu", "task=check",
         "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env={**os.environ, "WORLDMODEL_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("# stage ") == 3
    assert not data.exists() and not (tmp_path / "run" / "tokenizer").exists()


def test_fsdp_names_the_parameters_it_cannot_shard():
    model = TwoClusters()
    model.scale = nn.Parameter(torch.ones(()))  # 0-dim: FSDP2 shards along the first dimension
    with pytest.raises(ValueError, match=r"0-dim ones \(scale\)"):
        parallel.shard(model, torch.device("cpu"), bf16=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_run_without_a_visible_device_stops_before_any_work():
    # validate leaves this to the process that takes the device (a GPU recipe validates here)
    with pytest.raises(RuntimeError, match="needs CUDA device 0, but none is visible"):
        dist.init_process_group(dist.DistEnv(), "auto", "cuda")
