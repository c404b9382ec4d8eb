"""TECO world model: shapes, causality, the conditional encoder, cached == uncached sampling, a
64-frame rollout, learning, config checks, and the smoke recipe: trained and evaluated through
`run.py`, then played headless."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from conftest import SMOKE_DATA, SMOKE_TOKENIZER, compose_config, save_checkpoint
from conftest import run_py as _run_py
from omegaconf import OmegaConf

from worldmodel.config import ConfigError, validate
from worldmodel.models.teco import TecoWorldModel
from worldmodel.tasks import run_task
from worldmodel.train.logging import read_metrics
from worldmodel.world import World

A = 8  # actions


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _model(**kwargs) -> TecoWorldModel:
    torch.manual_seed(0)
    sizes = dict(
        latent_dim=3,
        num_actions=A,
        grid=(4, 4),
        max_frames=4,
        codebook_size=32,
        code_dim=8,
        hidden_dim=16,
        vq={"kmeans_init": False, "use_cosine_sim": True},
        state_downsample=2,
        state_channels=4,
        dim=32,
        depth=2,
        heads=2,
        prior_dim=32,
        prior_depth=1,
        prior_heads=2,
    )
    return TecoWorldModel(**{**sizes, **kwargs}).eval()


def _codes(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (b, t, 4, 4), generator=torch.Generator().manual_seed(seed))


def _actions(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, A, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_loss_on_latents_and_codes():
    model = _model().train()
    latents = torch.randn(2, 4, 4, 4, 3)
    loss, metrics = model.loss({"latents": latents, "actions": _actions(2, 4)})
    loss.backward()
    for key in ("ce", "masked_acc", "rec_mse", "quantizer_loss", "codebook/usage", "mask_rate"):
        assert torch.isfinite(metrics[key]), key
    # every part learns: the encoder (reconstruction), the state (decoder + prior), the prior
    for part in (model.frame_in, model.temporal, model.decoder, model.prior, model.head):
        assert all(p.grad is not None for p in part.parameters()), part
    model.eval()
    codes = model.encode(latents)
    assert codes.shape == (2, 4, 4, 4) and codes.dtype == torch.long
    assert model.decode_latents(codes).shape == (2, 4, 4, 4, 3)
    # decoding after context codes = decoding the whole clip and keeping its tail
    whole = model.decode_latents(codes)
    tail = model.decode_latents(codes[:, 2:], context=codes[:, :2])
    assert torch.allclose(whole[:, 2:], tail, atol=1e-5)
    assert model.logits(codes, _actions(2, 4)).shape == (2, 4, 4, 4, 32)
    _, from_codes = model.loss({"tokens": codes, "actions": _actions(2, 4)})
    assert "rec_mse" not in from_codes and torch.isfinite(from_codes["ce"])
    assert model.generate_next(codes[:, :2], _actions(2, 2)).shape == (2, 4, 4)
    # action sets (B, T, A) as play sends them; the last action may be unknown (-1)
    sets = torch.nn.functional.one_hot(_actions(2, 2), A).float()
    assert model.generate_next(codes[:, :2], sets).shape == (2, 4, 4)
    acts = _actions(2, 4)
    acts[:, -1] = -1
    model.loss({"tokens": codes, "actions": acts})


def test_causality_of_the_prior_and_the_state():
    model = _model()
    codes, actions = _codes(1, 4), _actions(1, 4)
    future_codes, future_actions = codes.clone(), actions.clone()
    future_codes[:, 2:] = (codes[:, 2:] + 5) % 32
    future_actions[:, 2:] = (actions[:, 2:] + 3) % A
    a = model.logits(codes, actions)
    b = model.logits(future_codes, future_actions)
    # frame t's prediction reads frames < t and actions[:, t - 1] only: frames 0..2 unchanged
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)
    # the action that leads to frame t changes frame t's prediction
    other = actions.clone()
    other[:, 1] = (actions[:, 1] + 1) % A
    c = model.logits(codes, other)
    assert torch.allclose(a[:, :2], c[:, :2], atol=1e-5)
    assert not torch.allclose(a[:, 2], c[:, 2], atol=1e-4)


def test_the_encoder_reads_the_previous_frame():
    model = _model()
    latents = torch.randn(2, 4, 4, 4, 3)
    changed = latents.clone()
    changed[:, 1] = torch.randn(2, 4, 4, 3) * 3
    a, b = model.encode(latents), model.encode(changed)
    assert torch.equal(a[:, 0], b[:, 0])  # before the change
    assert not torch.equal(a[:, 1], b[:, 1])  # the changed frame itself
    assert not torch.equal(a[:, 2], b[:, 2])  # frame 2 is encoded with frame 1
    assert torch.equal(a[:, 3], b[:, 3])  # frame 3 reads frames 2 and 3 only


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cached_and_uncached_sampling_agree(temperature):
    # a window of 3 states with 2 context + 6 frames: the cache drops keys as the window slides
    model = _model(state_window=3)
    context, actions = _codes(2, 2), _actions(2, 8)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(3)

    kwargs = {"temperature": temperature, "steps": 4}
    cached = model.rollout(context, actions, 6, generator=gen(), **kwargs)
    plain = model.rollout(context, actions, 6, generator=gen(), use_cache=False, **kwargs)
    assert torch.equal(cached, plain)
    assert len(cached.unique()) > (1 if temperature == 0 else 8)  # real, varied samples
    # the states themselves, frame by frame, within float tolerance
    frames = torch.cat([context, cached], dim=1)  # (B, 8, h, w)
    cache = model.new_cache(frames[:, :1], actions[:, :0])
    for t in range(1, 8):
        state = model._advance(cache, frames[:, :t])
        assert torch.allclose(state, model.context_state(frames[:, :t]), atol=1e-5), t
    assert cache.kv.keys[0].shape[2] == 2  # window - 1 keys kept


def test_a_64_frame_rollout_runs_with_a_bounded_cache():
    model = _model(max_frames=4)  # trained on 4 frames, the window is 4 states
    context = _codes(1, 1)
    frames = model.rollout(
        context, _actions(1, 64), 64, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert frames.shape == (1, 64, 4, 4) and frames.dtype == torch.long
    cache = model.new_cache(torch.cat([context, frames], dim=1), _actions(1, 64))
    assert cache.length == 65 and all(k.shape[2] == 3 for k in cache.kv.keys)
    # one more frame costs one temporal position: the new frame after the 65 committed ones
    nxt = model.generate_next(
        torch.cat([context, frames], dim=1), _actions(1, 65), cache=cache, steps=2
    )
    assert nxt.shape == (1, 4, 4) and cache.length == 65


def test_training_a_few_steps_lowers_the_loss():
    model = _model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(8, 4, 4, 4, 3, generator=gen)
    latents[:, 1:] = latents[:, :1] + 0.1 * latents[:, 1:]  # frames close to the first
    batch = {"latents": latents, "actions": torch.randint(0, A, (8, 4), generator=gen)}
    losses, rec = [], []
    for _ in range(40):
        torch.manual_seed(len(losses))  # the same masks on the same step of any run
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        rec.append(metrics["rec_mse"].item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert rec[-1] < 0.6 * rec[0], rec


def test_bad_configs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match=r"state_downsample=3 must divide the token grid"):
        _model(state_downsample=3)
    with pytest.raises(ValueError, match="state_window must be >= 1"):
        _model(state_window=0)
    with pytest.raises(ValueError, match="mask_rate_min"):
        _model(mask_rate_min=0.0)
    model = _model()
    with pytest.raises(ValueError, match=r"action ids must be in \[0, 8\)"):
        model.generate_next(_codes(1, 2), torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 32\)"):
        model.generate_next(_codes(1, 2) + 32, _actions(1, 2))
    with pytest.raises(ValueError, match=r"\(h, w, D\) = \(4, 4, 3\)"):
        model.loss({"latents": torch.randn(1, 2, 4, 4, 5), "actions": _actions(1, 2)})
    with pytest.raises(ValueError, match="exceed max_frames=4"):
        model.loss({"tokens": _codes(1, 5), "actions": _actions(1, 5)})
    # validate names the keys before any work
    cfg = compose_config(
        ["experiment=smoke_teco", "model.state_downsample=3", "data.clip_length=9"]
    )
    cfg.model.pipeline.tokenizer_checkpoint = "unused.pt"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "model.state_downsample=3 must divide the token grid model.grid=[8, 8]" in text
    assert "data.clip_length=9 exceeds model.max_frames=6" in text


def run_py(*args: str) -> subprocess.CompletedProcess:
    return _run_py(*args, env={"OMP_NUM_THREADS": "1"})


def test_smoke_recipe_trains_evaluates_and_plays_through_run_py(tmp_path):
    """A randomly initialised tokenizer saved as a real checkpoint is the frozen image encoder;
    the smoke recipe trains on its cached latents, evaluates after training and plays."""
    data = OmegaConf.to_container(compose_config(["experiment=smoke_teco", *SMOKE_DATA]).data)
    torch.manual_seed(0)
    tok = save_checkpoint(SMOKE_TOKENIZER, data, tmp_path / "tokenizer.pt")
    run_dir = tmp_path / "run"
    common = ["experiment=smoke_teco", *SMOKE_DATA, f"model.pipeline.tokenizer_checkpoint={tok}"]
    run_py(
        *common,
        f"hydra.run.dir={run_dir}",
        "eval.after_train=true",
        "eval.batches=1",
        "eval.batch_size=4",
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    ce = [r["train/ce"] for r in rows if "train/ce" in r]
    rec = [r["train/rec_mse"] for r in rows if "train/rec_mse" in r]
    assert len(ce) >= 6 and sum(ce[-3:]) / 3 < ce[0] - 0.3, ce  # chance: ln(64) = 4.16
    assert rec[-1] < 0.5 * rec[0], rec
    # the evaluation after training: the same keys as every world model's
    result = json.loads(next(run_dir.glob("**/eval.json")).read_text())
    m = result["metrics"]
    assert result["model"] == "teco"
    for key in ("rollout_psnr", "delta_psnr", "masked_acc", "psnr", "tokenizer_psnr"):
        assert key in m, key
    assert len(m["rollout_psnr"]) >= 3 and all(math.isfinite(v) for v in m["rollout_psnr"])
    assert math.isfinite(m["delta_psnr"]) and 0.0 <= m["masked_acc"] <= 1.0

    # task=play, headless, as run.py dispatches it (in this process: a second interpreter start
    # would double the test's time): one typed step per entry, 7 steps, beyond the 6-frame window
    play_dir = tmp_path / "play"
    last = run_dir / "checkpoints" / "last.pt"
    overrides = ["task=play", f"checkpoint={last}", "++play.actions=[7,'7+5',3,7,7,4,1]"]
    run_task(validate(compose_config([*common, *overrides], run_dir=play_dir)))
    record = json.loads((play_dir / "play.json").read_text())
    assert record["actions"] == [[7], [5, 7], [3], [7], [7], [4], [1]]
    assert record["num_frames"] == 8 and len(list(play_dir.glob("frame_*.png"))) == 8

    # the World steps it too (web and terminal play): past the window, each frame decoded after
    # the codes before it
    world = World.load(last)
    prompt = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    video = world.rollout([7, 7, 5, 7, 1, 7, 7, 7], prompt)
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8
