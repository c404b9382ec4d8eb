"""Muse's cascade (model=muse): the coarse codes of the fine tokens, the super-resolution stage
reading them, generation coarse first and then fine with the configured step counts, joint
training of both stages, bad grids rejected, and the smoke recipe trained, evaluated and played
through `run.py`."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import SMOKE_DATA, SMOKE_TOKENIZER, compose_config, save_checkpoint
from conftest import run_py as _run_py
from einops import rearrange
from omegaconf import OmegaConf

from worldmodel.config import ConfigError, validate
from worldmodel.models.muse import MuseWorldModel
from worldmodel.tasks import run_task
from worldmodel.train.logging import read_metrics

A = 5  # actions
V = 32  # fine vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _model(**kwargs) -> MuseWorldModel:
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=V,
        num_actions=A,
        grid=(8, 8),
        coarse_grid=(4, 4),
        coarse_levels=[4, 4],  # 16 coarse codes
        coarse_dim=16,
        max_frames=4,
        dim=32,
        base_depth=1,
        sr_depth=1,
        heads=2,
        cond_mode="add",
        fine_steps=3,
    )
    return MuseWorldModel(**{**sizes, **kwargs}).eval()


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t, 8, 8), generator=torch.Generator().manual_seed(seed))


def _actions(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, A, (b, t), generator=torch.Generator().manual_seed(seed))


def test_coarse_codes_are_one_code_per_cell_of_its_own_fine_tokens():
    model = _model()
    tokens = _tokens(2, 3)
    coarse = model.coarse_codes(tokens)
    assert coarse.shape == (2, 3, 4, 4) and coarse.dtype == torch.long
    assert model.coarse.codebook_size == 16
    assert int(coarse.min()) >= 0 and int(coarse.max()) < 16
    assert model.base.vocab_size == 16 and model.base.grid == (4, 4)

    # a cell's code reads its own 2x2 fine tokens only: changing cell (1, 2) of frame 1 changes
    # no other cell's features before the quantizer (nor its code), and does change its own
    def features(x: torch.Tensor) -> torch.Tensor:  # (B, T, hc, wc, D) before FSQ
        cells = rearrange(model.coarse.emb(x), "b t (hc i) (wc j) d -> b t hc wc (i j d)", i=2, j=2)
        return model.coarse.encoder(cells)

    changed = tokens.clone()
    changed[:, 1, 2:4, 4:6] = (changed[:, 1, 2:4, 4:6] + 7) % V
    before, after = features(tokens), features(changed)
    other = torch.ones(4, 4, dtype=torch.bool)
    other[1, 2] = False
    assert torch.equal(before[:, 1, other], after[:, 1, other])
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1, 1, 2], after[:, 1, 1, 2])
    recoded = model.coarse_codes(changed)
    assert torch.equal(recoded[:, 1, other], coarse[:, 1, other])
    assert torch.equal(recoded[:, [0, 2]], coarse[:, [0, 2]])
    codes = model.coarse.encode(tokens)[0]  # (B, T, hc, wc, D) quantized
    # the cells' reconstruction logits cover the fine grid
    assert model.coarse.decode_logits(codes).shape == (2, 3, 4, 4, 4, V)
    assert torch.equal(model.coarse.cells(tokens)[:, :, 1, 2], tokens[:, :, 2:4, 4:6].flatten(2))


def test_super_resolution_is_conditioned_on_the_coarse_codes():
    model = _model()
    tokens, actions = _tokens(1, 2), _actions(1, 2)
    masked = tokens.clone()
    masked[:, 1] = model.sr.mask_id  # the frame to super-resolve, all masked
    coarse = model.coarse_codes(tokens)
    other = coarse.clone()
    other[:, 1, 0, 0] = (other[:, 1, 0, 0] + 5) % 16  # one coarse code of the masked frame
    a = model.sr_logits(masked, coarse, actions)
    b = model.sr_logits(masked, other, actions)
    assert a.shape == (1, 2, 8, 8, V)
    assert not torch.allclose(a[:, 1, :2, :2], b[:, 1, :2, :2], atol=1e-4)  # the cell it covers
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # causal: the frame before is unchanged


def _stage_calls(model: MuseWorldModel) -> tuple[list[str], list]:
    calls: list[str] = []
    handles = [
        model.base.transformer.register_forward_hook(lambda *_: calls.append("coarse")),
        model.sr.transformer.register_forward_hook(lambda *_: calls.append("fine")),
    ]
    return calls, handles


@pytest.mark.parametrize("steps,fine_steps", [(3, 2), (2, 5)])
def test_generation_runs_the_coarse_steps_then_the_fine_steps(steps, fine_steps):
    model = _model(fine_steps=fine_steps)
    tokens, actions = _tokens(2, 2), _actions(2, 2)
    cache = model.new_cache(tokens, actions[:, :1])
    calls, handles = _stage_calls(model)
    try:
        frame = model.generate_next(tokens, actions, steps=steps, cache=cache)
        assert calls == ["coarse"] * steps + ["fine"] * fine_steps
        calls.clear()  # a call's own fine_steps overrides the model's
        model.generate_next(tokens, actions, steps=1, fine_steps=4, use_cache=False)
        assert calls == ["coarse"] + ["fine"] * 4
    finally:
        for h in handles:
            h.remove()
    assert frame.shape == (2, 8, 8) and int(frame.max()) < V
    # the generated fine frame, recoded, is what the next step's context holds (both caches)
    grown = torch.cat([tokens, frame[:, None]], dim=1)
    model.generate_next(grown, torch.cat([actions, actions[:, :1]], 1), steps=steps, cache=cache)
    assert cache.length == 3 and cache.base.length == 3
    assert torch.equal(cache.coarse, model.coarse_codes(grown))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cached_and_uncached_rollouts_agree_across_window_slides(temperature):
    model = _model()
    context, actions = _tokens(2, 2), _actions(2, 8)
    kwargs = dict(steps=3, temperature=temperature, confidence_noise=1.0)
    # 2 context + 6 frames with max_frames=4: the window slides and both caches are rebuilt
    cached = model.rollout(
        context, actions, 6, generator=torch.Generator().manual_seed(3), **kwargs
    )
    plain = model.rollout(
        context, actions, 6, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs
    )
    assert cached.shape == (2, 6, 8, 8) and torch.equal(cached, plain)


def test_joint_training_lowers_the_base_and_the_super_resolution_losses():
    """Clips where the action moves a bright 2x2 block (one coarse cell) one cell sideways: the
    base stage must learn where the cell goes, the super-res stage what fills it."""
    model = _model(cond_mode="adaln").train()
    gen = torch.Generator().manual_seed(0)
    b, t = 8, 4
    start = torch.randint(0, 4, (b,), generator=gen)
    actions = torch.randint(0, 2, (b, t), generator=gen)  # 0: left, 1: right
    tokens = torch.zeros(b, t, 8, 8, dtype=torch.long)
    col = start.clone()
    for i in range(t):
        for j in range(b):
            tokens[j, i, 2:4, 2 * col[j] : 2 * col[j] + 2] = torch.tensor([[5, 6], [7, 8]])
        col = (col + 2 * actions[:, i] - 1).clamp(0, 3)
    batch = {"tokens": tokens, "actions": actions}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = last = None
    for step in range(40):
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = metrics
        last = metrics
    assert float(last["base_ce"]) < 0.5 * float(first["base_ce"]), (first, last)
    assert float(last["sr_ce"]) < 0.5 * float(first["sr_ce"]), (first, last)
    assert float(last["coarse_rec_ce"]) < 0.5 * float(first["coarse_rec_ce"])
    # the cascade's per-fine-token CE is the super-res CE plus a quarter of the base CE
    want = float(last["sr_ce"]) + float(last["base_ce"]) * 16 / 64
    assert float(last["ce"]) == pytest.approx(want, rel=1e-5)


def test_bad_grids_and_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"model.grid=\[8, 8\] is not a multiple of "):
        _model(coarse_grid=(3, 3))
    with pytest.raises(ValueError, match="equals model.grid"):
        _model(coarse_grid=(8, 8))
    with pytest.raises(ValueError, match="fine_steps=0"):
        _model(fine_steps=0)
    with pytest.raises(ValueError, match="mask_strategy=multiscale needs a token grid"):
        _model(grid=(2, 2), coarse_grid=(1, 1), mask_strategy="multiscale")
    model = _model()
    with pytest.raises(ValueError, match=r"\(h, w\) = \(8, 8\) \(the fine grid\)"):
        model.generate_next(torch.zeros(1, 2, 4, 4, dtype=torch.long), _actions(1, 2))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 32\)"):
        model.loss({"tokens": _tokens(1, 2) + V, "actions": _actions(1, 2)})
    with pytest.raises(ValueError, match=r"actions must be in \[0, 5\)"):
        model.generate_next(_tokens(1, 2), torch.tensor([[0, 9]]))
    # validate names the keys before any work
    cfg = compose_config(["experiment=smoke_muse", "model.coarse_grid=[3,3]"])
    cfg.model.pipeline.tokenizer_checkpoint = "unused.pt"
    with pytest.raises(ConfigError, match=r"model.grid=\[8, 8\] is not a multiple of"):
        validate(cfg)


def run_py(*args: str) -> subprocess.CompletedProcess:
    return _run_py(*args, env={"OMP_NUM_THREADS": "1"})


def test_smoke_recipe_trains_evaluates_and_plays_through_run_py(tmp_path):
    """A randomly initialised tokenizer (8x8 tokens) saved as a real checkpoint is the frozen fine
    tokenizer; the smoke recipe trains both stages on its tokens (coarse 4x4), evaluates and
    plays."""
    data = OmegaConf.to_container(compose_config(["experiment=smoke_muse", *SMOKE_DATA]).data)
    torch.manual_seed(0)
    tok = save_checkpoint(SMOKE_TOKENIZER, data, tmp_path / "tokenizer.pt")
    run_dir = tmp_path / "run"
    common = ["experiment=smoke_muse", *SMOKE_DATA, f"model.pipeline.tokenizer_checkpoint={tok}"]
    run_py(
        *common,
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=40",
        "trainer.val_every=20",
        "eval.after_train=true",
        "eval.batches=1",
        "eval.batch_size=4",
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    for key in ("train/base_ce", "train/sr_ce"):  # both stages learn, logged apart
        values = [r[key] for r in rows if key in r]
        assert len(values) >= 6 and sum(values[-3:]) / 3 < values[0] - 0.5, (key, values)
    # the evaluation after training: the same keys as every world model's
    result = json.loads(next(run_dir.glob("**/eval.json")).read_text())
    m = result["metrics"]
    assert result["model"] == "muse"
    for key in ("rollout_psnr", "delta_psnr", "masked_acc", "psnr", "tokenizer_psnr", "gen_fps"):
        assert key in m, key
    assert "control_accuracy" in m and "rollout_psnr_changing" in m
    assert len(m["rollout_psnr"]) == 3 and all(math.isfinite(v) for v in m["rollout_psnr"])
    assert math.isfinite(m["delta_psnr"]) and 0.0 <= m["masked_acc"] <= 1.0

    # task=play, headless, as run.py dispatches it (in this process: a second interpreter start
    # would double the test's time): 5 steps, beyond the 4-frame window
    play_dir = tmp_path / "play"
    last = run_dir / "checkpoints" / "last.pt"
    overrides = ["task=play", f"checkpoint={last}", "++play.actions=[7,7,3,1,5]"]
    run_task(validate(compose_config([*common, *overrides], run_dir=play_dir)))
    record = json.loads((play_dir / "play.json").read_text())
    assert record["actions"] == [7, 7, 3, 1, 5] and record["num_frames"] == 6
    assert len(list(play_dir.glob("frame_*.png"))) == 6 or (play_dir / "play.gif").is_file()
