"""Dynamics model: causality, cached sampling, MaskGIT schedule, learning, input checks."""

import math

import pytest
import torch

from worldmodel.models.dynamics import SCHEDULES, DynamicsModel, mask_ratio, masked_counts

V, A, H, W = 16, 5, 4, 4
MOVES = torch.tensor([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # stay, up, down, left, right


def tiny(**kwargs) -> DynamicsModel:
    torch.manual_seed(0)
    args = dict(vocab_size=V, num_actions=A, grid=[H, W], max_frames=6, dim=32, depth=2, heads=4)
    args.update(kwargs)
    return DynamicsModel(**args)


def object_clips(b: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token clips (B, T, H, W): a static random background (ids 1..V-2) per clip and one object
    (id V-1) that moves by the action (wrapping around); actions (B, T), actions[:, t] taken
    after frame t."""
    tokens = torch.randint(1, V - 1, (b, 1, H, W), generator=gen).repeat(1, t, 1, 1)
    pos = torch.stack(
        [torch.randint(0, H, (b,), generator=gen), torch.randint(0, W, (b,), generator=gen)], 1
    )
    actions = torch.randint(0, A, (b, t), generator=gen)
    for i in range(t):
        tokens[torch.arange(b), i, pos[:, 0], pos[:, 1]] = V - 1
        pos = (pos + MOVES[actions[:, i]]) % torch.tensor([H, W])
    return tokens, actions


def test_future_frames_and_actions_do_not_change_past_logits() -> None:
    model = tiny().eval()
    gen = torch.Generator().manual_seed(1)
    tokens, actions = object_clips(2, 6, gen)
    t = 2
    tokens2, actions2 = tokens.clone(), actions.clone()
    tokens2[:, t + 1 :] = torch.randint(0, V, tokens2[:, t + 1 :].shape, generator=gen)
    actions2[:, t:] = (actions2[:, t:] + 1) % A  # actions[:, t] leads to frame t+1
    tokens2[:, t + 1, 0, 0] = model.mask_id  # a masked future token too
    with torch.no_grad():
        logits, logits2 = model.logits(tokens, actions), model.logits(tokens2, actions2)
    assert torch.equal(logits[:, : t + 1], logits2[:, : t + 1])
    assert (logits[:, t + 1] - logits2[:, t + 1]).abs().max() > 1e-4

    # the action taken after frame t conditions frame t+1 (and not frame t)
    actions3 = actions.clone()
    actions3[:, t] = (actions3[:, t] + 2) % A
    with torch.no_grad():
        logits3 = model.logits(tokens, actions3)
    assert torch.equal(logits[:, : t + 1], logits3[:, : t + 1])
    assert (logits[:, t + 1] - logits3[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("temperature,noise", [(1.0, 0.0), (1.0, 2.0), (0.0, 0.0)])
def test_cached_and_uncached_sampling_agree(temperature: float, noise: float) -> None:
    model = tiny().eval()
    tokens, actions = object_clips(3, 4, torch.Generator().manual_seed(2))
    kwargs = dict(temperature=temperature, confidence_noise=noise, steps=6)
    a = model.generate_next(
        tokens, actions, generator=torch.Generator().manual_seed(5), use_cache=True, **kwargs
    )
    b = model.generate_next(
        tokens, actions, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs
    )
    assert a.shape == (3, H, W) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V  # no mask token left
    assert torch.equal(a, b)


def test_confidence_noise_changes_what_is_kept() -> None:
    """MaskGIT's Gumbel noise on the confidences: greedy sampling is deterministic without it;
    with it, different noise draws keep different tokens first, so the frames differ."""
    model = tiny().eval()
    tokens, actions = object_clips(4, 4, torch.Generator().manual_seed(2))
    frames = [
        model.generate_next(
            tokens,
            actions,
            steps=6,
            temperature=0.0,
            confidence_noise=noise,
            generator=torch.Generator().manual_seed(seed),
        )
        for noise, seed in ((0.0, 1), (0.0, 2), (4.0, 1), (4.0, 2))
    ]
    assert torch.equal(frames[0], frames[1])  # no noise: the generator is not used
    assert not torch.equal(frames[2], frames[3])  # noise: the draw decides the order
    assert int(frames[2].max()) < V and int(frames[3].max()) < V


def test_rollout_cached_matches_uncached_across_window_slides() -> None:
    model = tiny(max_frames=4).eval()
    tokens, actions = object_clips(2, 10, torch.Generator().manual_seed(3))
    # 2 context frames + 6 generated: the 3-frame window slides 4 times
    kwargs = dict(horizon=6, steps=4, temperature=1.0)
    a = model.rollout(tokens[:, :2], actions, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.rollout(
        tokens[:, :2],
        actions,
        generator=torch.Generator().manual_seed(7),
        use_cache=False,
        **kwargs,
    )
    assert a.shape == (2, 6, H, W)
    assert torch.equal(a, b)

    # a cache can be reused across calls: it is extended with the frames it lacks
    cache = model.new_cache(tokens[:, :1], actions)
    first = model.generate_next(tokens[:, :2], actions[:, :2], cache=cache, temperature=0.0)
    assert cache.length == 2
    ref = model.generate_next(tokens[:, :2], actions[:, :2], use_cache=False, temperature=0.0)
    assert torch.equal(first, ref)
    with pytest.raises(ValueError, match="cache does not match"):
        other = tokens[:, :2].clone()
        other[:, 0] = (other[:, 0] + 1) % V
        model.generate_next(other, actions[:, :2], cache=cache)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_schedule(schedule: str) -> None:
    ratios = [mask_ratio(i / 100, schedule) for i in range(101)]
    assert ratios[0] == 1.0 and ratios[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))  # monotone
    for steps, n in [(8, 64), (1, 16), (12, 16), (20, 16)]:
        counts = masked_counts(steps, n, schedule)
        assert len(counts) == steps + 1
        assert counts[0] == n and counts[-1] == 0  # first step: all masked; last: none
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        if steps <= n:
            assert all(a > b for a, b in zip(counts, counts[1:]))  # progress every step
    # cosine keeps most tokens masked early (MaskGIT): after 1 of 8 steps, cos(pi/16) ~ 98%
    assert masked_counts(8, 64, "cosine")[1] == math.floor(64 * math.cos(math.pi / 16))


def test_decoding_feeds_updated_tokens_back() -> None:
    """Each MaskGIT step must see the tokens committed by the previous steps."""
    model = tiny().eval()
    tokens, actions = object_clips(2, 3, torch.Generator().manual_seed(4))
    seen: list[torch.Tensor] = []
    hook = model.token_emb.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        out = model.generate_next(tokens, actions, steps=5, generator=torch.Generator())
    finally:
        hook.remove()
    steps_inputs = seen[1:]  # seen[0] is the context prefill
    assert len(steps_inputs) == 5
    counts = masked_counts(5, H * W, "cosine")
    for s, x in enumerate(steps_inputs):
        masked = (x == model.mask_id).sum(dim=(1, 2))  # (B,)
        assert (masked == counts[s]).all(), (s, masked, counts[s])
        if s > 0:
            # tokens committed earlier stay committed, with the same value
            prev = steps_inputs[s - 1]
            kept = prev != model.mask_id
            assert torch.equal(x[kept], prev[kept])
    final_known = steps_inputs[-1] != model.mask_id
    assert torch.equal(out.flatten(1)[final_known[:, 0]], steps_inputs[-1][final_known])


def test_learns_the_moving_object_and_its_action(one_thread) -> None:
    """Masked-token accuracy rises within 100 steps (the background is copied from the context);
    by 200 steps the object is placed where the action moved it, and a wrong action moves it
    elsewhere."""
    model = tiny(max_frames=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    val_tokens, val_actions = object_clips(256, 2, torch.Generator().manual_seed(99))

    def val_acc() -> float:
        torch.manual_seed(123)  # same masks every time
        model.eval()
        with torch.no_grad():
            _, metrics = model.loss({"tokens": val_tokens[:64], "actions": val_actions[:64]})
        model.train()
        return float(metrics["masked_acc"])

    accs = [val_acc()]
    for step in range(200):
        tokens, actions = object_clips(32, 2, gen)
        loss, metrics = model.loss({"tokens": tokens, "actions": actions})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 99:
            accs.append(val_acc())
    assert accs[0] < 0.2, accs  # chance is 1/16
    assert accs[1] > 0.7, accs
    for key in ("ce", "masked_acc"):
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad

    # controllability: probability of the object token at its true new cell, frame 1 fully
    # masked, with the true action vs a wrong one
    wrong = val_actions.clone()
    shift = torch.randint(1, A, (256,), generator=torch.Generator().manual_seed(1))
    wrong[:, 0] = (wrong[:, 0] + shift) % A
    masked = val_tokens.clone()
    masked[:, 1] = model.mask_id
    model.eval()
    with torch.no_grad():
        p_true = model.logits(masked, val_actions)[:, 1].softmax(-1)[..., V - 1]
        p_wrong = model.logits(masked, wrong)[:, 1].softmax(-1)[..., V - 1]
    cell = val_tokens[:, 1] == V - 1
    p_true, p_wrong = p_true[cell].mean().item(), p_wrong[cell].mean().item()
    assert p_true > 0.25 and p_true > 2 * p_wrong, (p_true, p_wrong)  # measured ~0.40 vs 0.14


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny()
    tokens, actions = object_clips(2, 4, torch.Generator().manual_seed(6))
    bad = actions.clone()
    bad[0, 1] = A  # out of range
    with pytest.raises(ValueError, match=rf"actions must be in \[0, {A}\).*\[{A}\]"):
        model.loss({"tokens": tokens, "actions": bad})
    bad[0, 1] = -1  # unknown action where it conditions a real frame
    with pytest.raises(ValueError, match=r"\[-1\]"):
        model.generate_next(tokens, bad)
    with pytest.raises(ValueError, match=r"grid \(4, 5\) does not match the model's grid \(4, 4\)"):
        model.loss({"tokens": torch.zeros(2, 4, 4, 5, dtype=torch.long), "actions": actions})
    with pytest.raises(ValueError, match="grid"):
        model.generate_next(torch.zeros(2, 3, 8, 8, dtype=torch.long), actions[:, :3])
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {V}\)"):
        model.loss({"tokens": tokens + V, "actions": actions})
    with pytest.raises(ValueError, match="max_frames"):
        model.generate_next(torch.zeros(2, 6, H, W, dtype=torch.long), torch.zeros(2, 6).long())
    with pytest.raises(ValueError, match="schedule"):
        model.generate_next(tokens, actions, schedule="zigzag")

    # -1 is fine where it conditions nothing: the last action, and actions into padding
    ok = actions.clone()
    ok[:, -1] = -1
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    ok[1, 1:] = -1
    loss, _ = model.loss({"tokens": tokens, "actions": ok, "mask": mask})
    assert torch.isfinite(loss)
