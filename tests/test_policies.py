"""Recording policies: scripted and checkpoint policies play procgen and ALE, their actions are the
recorded ones, bad targets and files fail clearly, default caches keep their keys, and recording
prints no gym notice."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from worldmodel.config import instantiate
from worldmodel.data import AtariSource, ProcgenSource
from worldmodel.data.policies import COINRUN_MOVES, HeldRandomPolicy, RunRight
from worldmodel.data.shards import read_manifest
from worldmodel.models.policy import PolicyNet, load_policy_net, save_policy_net

CONF = Path(__file__).resolve().parents[1] / "conf"
CHECKPOINT = "worldmodel.models.policy.CheckpointPolicy"
# The cache folders of the default procgen and ALE configs, computed with the recorders as they
# were before policies could be chosen: existing caches must keep these names.
DEFAULT_CACHE_NAMES = {"procgen": "procgen-coinrun-4ab7847a0f", "atari": "atari-Pong_v5-78c381cb9a"}

# A researcher's policies, in a module of their own: a function that returns a closure (the
# action is a function of the picture, so it can be checked against the recorded frames) and a
# class that keeps what it saw.
RESEARCHER_MODULE = '''
import numpy as np

SEEN = []  # the policy objects built, in order


def by_brightness(num_actions, num_envs, seed, modulo=15):
    """Action = summed red channel // 7 % modulo: a function of the observation alone."""

    def policy(obs):
        return obs[..., 0].astype(np.int64).sum(axis=(1, 2)) // 7 % modulo

    return policy


class Logged:
    def __init__(self, num_actions, num_envs, seed):
        self.rng = np.random.default_rng(seed)
        self.num_actions, self.shapes, self.actions = num_actions, [], []
        SEEN.append(self)

    def __call__(self, obs):
        self.shapes.append(obs.shape)
        self.actions.append(self.rng.integers(0, self.num_actions, size=len(obs)))
        return self.actions[-1]


def wrong_shape(num_actions, num_envs, seed):
    return lambda obs: np.zeros((len(obs), 2), dtype=np.int64)


def too_large(num_actions, num_envs, seed):
    return lambda obs: np.full(len(obs), num_actions)


def no_seed(num_actions, num_envs):
    return lambda obs: np.zeros(len(obs), dtype=np.int64)


NOT_CALLABLE = 3
'''


@pytest.fixture
def researcher(tmp_path, monkeypatch):
    """The name of a policy module written to disk and importable, as a researcher's would be."""
    folder = tmp_path / "policies_src"
    folder.mkdir()
    (folder / "my_policies.py").write_text(RESEARCHER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("my_policies", None)
    yield "my_policies"
    sys.modules.pop("my_policies", None)


def tiny_procgen(root: Path, **kwargs) -> ProcgenSource:
    """A procgen recording of a few frames from 2 environments (seconds to record)."""
    settings = dict(
        root=str(root), num_envs=2, train_frames=48, val_frames=16, clip_length=2, name="procgen"
    )
    return ProcgenSource(**{**settings, **kwargs})


def recorded(source, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(frames (N, H, W, C) uint8, actions (N,)) of a recorded split."""
    folder = source.prepare()
    frames = np.load(folder / f"{split}_frames.npy")
    return frames, np.load(folder / f"{split}_actions.npy")


def compose_data(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=overrides).data


# -- scripted policies -----------------------------------------------------------------------------
def test_scripted_policy_actions_are_the_recorded_actions(tmp_path, researcher):
    # through the config, as a researcher would set it on the command line
    data = compose_data(
        [
            "+data=procgen",
            f"data.root={tmp_path}",
            "data.num_envs=2",
            "data.train_frames=48",
            "data.val_frames=16",
            "data.clip_length=2",
            f"data.policy={{_target_:{researcher}.by_brightness,modulo:11}}",
        ]
    )
    source = instantiate(data)
    for split in ("train", "val"):
        frames, actions = recorded(source, split)
        expected = frames[..., 0].astype(np.int64).sum(axis=(1, 2)) // 7 % 11
        np.testing.assert_array_equal(actions, expected)  # every frame's action is the policy's
    assert len(np.unique(actions)) >= 2 and len(frames) == 16
    params = read_manifest(source.cache_dir)["params"]
    key = params["policy"]
    assert key["_target_"] == f"{researcher}.by_brightness" and key["modulo"] == 11
    assert len(key["code"]) == 16  # the function's source is part of the key

    # another setting of the same policy is another recording; the same one is the same
    again = tiny_procgen(tmp_path, policy={"_target_": f"{researcher}.by_brightness", "modulo": 11})
    assert again.cache_dir == source.cache_dir
    other = tiny_procgen(tmp_path, policy={"_target_": f"{researcher}.by_brightness", "modulo": 5})
    assert other.cache_dir != source.cache_dir


def test_a_policy_class_sees_the_observations_procgen_and_ale(tmp_path, researcher):
    import my_policies

    source = tiny_procgen(tmp_path, policy={"_target_": f"{researcher}.Logged"})
    _, actions = recorded(source)
    train = my_policies.SEEN[1]  # built: once to check the config, then train, then val
    assert len(my_policies.SEEN) == 3 and set(train.shapes) == {(2, 64, 64, 3)}
    # episodes are written per environment; each env's actions, in order, are the policy's
    episodes = read_manifest(source.cache_dir)["splits"]["train"]["episodes"]
    assert sum(e["length"] for e in episodes) == len(actions) == 48
    per_env = np.stack(train.actions)  # (steps, envs)
    assert sorted(actions.tolist()) == sorted(per_env.reshape(-1)[:48].tolist())
    assert np.array_equal(actions[: episodes[0]["length"]], per_env[: episodes[0]["length"], 0])

    my_policies.SEEN.clear()
    ale = AtariSource(
        root=str(tmp_path),
        game="Pong",
        train_frames=24,
        val_frames=8,
        clip_length=2,
        policy={"_target_": f"{researcher}.Logged"},
    )
    _, actions = recorded(ale)
    train, val = my_policies.SEEN
    assert set(train.shapes) == {(1, 210, 160, 3)}  # the screen, before the resize
    np.testing.assert_array_equal(actions, np.concatenate(train.actions))
    assert len(val.actions) == 8 and ale.num_actions == 6


def test_run_right_goes_right_and_jumps(tmp_path):
    source = tiny_procgen(
        tmp_path, train_frames=200, policy={"_target_": "worldmodel.data.policies.RunRight"}
    )
    _, actions = recorded(source)
    moves = {COINRUN_MOVES[m] for m in ("right", "right+jump", "left", "left+jump", "noop")}
    assert set(np.unique(actions)) <= moves
    right = np.isin(actions, [COINRUN_MOVES["right"], COINRUN_MOVES["right+jump"]]).mean()
    assert right > 0.6 and (actions == COINRUN_MOVES["right+jump"]).any()
    # held: far fewer changes of action than steps
    assert (np.diff(actions) != 0).mean() < 0.6
    with pytest.raises(ValueError, match="jump, back and wait"):
        RunRight(15, 2, 0, jump=0.8, back=0.3)
    with pytest.raises(ValueError, match="15 buttons; this game has 6"):
        RunRight(6, 1, 0)


# -- checkpoint policies ---------------------------------------------------------------------------
# plain levels (no background picture, one theme): what changes between frames is the agent and
# the scrolling level, so a random network's choice changes along an episode, not only per level
PLAIN = dict(env_kwargs=dict(use_backgrounds=False, restrict_themes=True))


@pytest.fixture(scope="module")
def coinrun_frames(tmp_path_factory) -> np.ndarray:
    """Frames (N, 64, 64, 3) of the levels `tiny_procgen(**PLAIN)` plays, random actions."""
    return recorded(tiny_procgen(tmp_path_factory.mktemp("random"), **PLAIN))[0]


def spread_net(frames: np.ndarray, num_actions: int = 15, seed: int = 1) -> PolicyNet:
    """A randomly initialised network whose argmax varies over `frames`: its head reads the
    pooled features standardised over them (a fresh init mostly picks one action everywhere)."""
    torch.manual_seed(seed)
    net = PolicyNet(num_actions, resolution=64, width=8, depth=2)
    with torch.no_grad():
        features = net.convs(net.frames_in(frames)).mean(dim=(2, 3))  # (N, D)
        mean, std = features.mean(dim=0), features.std(dim=0) + 1e-6  # (D,)
        net.head.weight.div_(std)  # logits = W (f - mean) / std
        net.head.bias.copy_(-net.head.weight @ mean)
    return net


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_policy_records_its_argmax_actions(tmp_path, suffix, coinrun_frames):
    net = spread_net(coinrun_frames)
    path = save_policy_net(net, tmp_path / f"policy{suffix}")
    policy = {"_target_": CHECKPOINT, "path": str(path)}
    source = tiny_procgen(tmp_path, policy=policy, **PLAIN)
    frames, actions = recorded(source)
    with torch.no_grad():
        logits = net(net.frames_in(frames))  # (N, 15)
    greedy = logits.argmax(dim=-1).numpy()
    top2 = logits.topk(2, dim=-1).values
    # the recording ran the network on 2 frames at a time: only a near tie may differ
    near_tie = (top2[:, 0] - top2[:, 1]).numpy() < 1e-3
    assert np.all((actions == greedy) | near_tie) and (actions == greedy).mean() > 0.95
    assert len(np.unique(actions)) >= 3 and (np.diff(actions[:24]) != 0).sum() >= 3  # varied

    key = read_manifest(source.cache_dir)["params"]["policy"]
    assert key["temperature"] == 0.0 and key["config"] == net.config and len(key["sha256"]) == 64
    # the file's content names the recording, not its path
    moved = tmp_path / "elsewhere" / path.name
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    same = tiny_procgen(tmp_path, policy={**policy, "path": str(moved)}, **PLAIN)
    assert same.cache_dir == source.cache_dir
    # other weights, or sampled actions, are other recordings
    save_policy_net(spread_net(coinrun_frames, seed=2), moved)
    other = tiny_procgen(tmp_path, policy={**policy, "path": str(moved)}, **PLAIN)
    assert other.cache_dir != source.cache_dir
    sampled = tiny_procgen(tmp_path, policy={**policy, "temperature": 1.0}, **PLAIN)
    assert sampled.cache_dir != source.cache_dir
    frames, actions = recorded(sampled)
    with torch.no_grad():
        greedy = net(net.frames_in(frames)).argmax(dim=-1).numpy()
    assert actions.min() >= 0 and actions.max() < 15 and (actions != greedy).any()


def test_bad_checkpoint_files_fail_naming_the_file_and_the_mismatch(tmp_path):
    def source(path: Path | str):
        return tiny_procgen(tmp_path, policy={"_target_": CHECKPOINT, "path": str(path)})

    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        source(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="garbage.safetensors: not a readable safetensors"):
        source(garbage)
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"not a tensor file")
    with pytest.raises(
        ValueError, match=r"garbage.pt: cannot be read with torch.load\(weights_only"
    ):
        source(garbage_pt)

    net = PolicyNet(15, width=8, depth=2)
    bare = tmp_path / "bare.pt"  # a plain state dict: nothing says the network's sizes
    torch.save(net.state_dict(), bare)
    with pytest.raises(ValueError, match="bare.pt: expected a dict with 'config'"):
        source(bare)
    from safetensors.torch import save_file

    no_meta = tmp_path / "no_meta.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(no_meta))
    with pytest.raises(ValueError, match="no_meta.safetensors: no 'config' in the safetensors"):
        source(no_meta)
    pickled = tmp_path / "pickled.pt"  # an object weights_only refuses to unpickle
    torch.save({"config": net.config, "state_dict": net.state_dict(), "net": net}, pickled)
    with pytest.raises(ValueError, match="pickled.pt: cannot be read with torch.load"):
        source(pickled)

    # sizes in the config that the weights do not have
    wrong = tmp_path / "wrong.pt"
    torch.save({"config": {**net.config, "width": 16}, "state_dict": net.state_dict()}, wrong)
    with pytest.raises(ValueError, match=r"wrong.pt does not match PolicyNet.*convs.0.weight is"):
        source(wrong)
    bad_config = tmp_path / "bad_config.pt"
    torch.save({"config": {**net.config, "heads": 2}, "state_dict": net.state_dict()}, bad_config)
    with pytest.raises(ValueError, match="bad_config.pt: its config .* is not valid.*heads"):
        load_policy_net(bad_config)
    # a network for another action space
    six = save_policy_net(PolicyNet(6, width=8, depth=2), tmp_path / "six.safetensors")
    with pytest.raises(ValueError, match="six.safetensors: the network chooses among 6 actions, "):
        source(six)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tiny_procgen(
            tmp_path,
            policy={"_target_": CHECKPOINT, "path": str(six), "temperature": -1},
        )


# -- bad targets -----------------------------------------------------------------------------------
def test_bad_policy_targets_fail_clearly(tmp_path, researcher):
    def source(policy, **kwargs):
        return tiny_procgen(tmp_path, policy=policy, **kwargs)

    with pytest.raises(ValueError, match="'no_such_module.policy' cannot be imported"):
        source({"_target_": "no_such_module.policy"})
    with pytest.raises(ValueError, match=f"'{researcher}.missing' cannot be imported"):
        source({"_target_": f"{researcher}.missing"})
    with pytest.raises(ValueError, match="NOT_CALLABLE' is not callable"):
        source({"_target_": f"{researcher}.NOT_CALLABLE"})
    with pytest.raises(ValueError, match="must be null .* or a mapping with a _target_"):
        source({"path": "x"})
    with pytest.raises(
        ValueError, match=r"data.policy.speed: not a parameter of .*\(valid: modulo"
    ):
        source({"_target_": f"{researcher}.by_brightness", "speed": 2})
    with pytest.raises(ValueError, match="data.policy.seed: set by the recorder"):
        source({"_target_": f"{researcher}.by_brightness", "seed": 2})
    with pytest.raises(ValueError, match="must accept .*; it lacks seed"):
        source({"_target_": f"{researcher}.no_seed"})
    with pytest.raises(ValueError, match="action_set is the random policy's"):
        source({"_target_": "worldmodel.data.policies.RunRight"}, action_set=[1, 7])
    # what a policy returns is checked at its first step
    with pytest.raises(ValueError, match=r"wrong_shape must return 2 integer action ids.*\(2, 2\)"):
        source({"_target_": f"{researcher}.wrong_shape"}).prepare()
    with pytest.raises(ValueError, match=r"too_large returned actions \[15, 15\].*\[0, 15\)"):
        source({"_target_": f"{researcher}.too_large"}).prepare()


def test_validate_names_a_bad_policy_before_any_work(tmp_path):
    from conftest import compose_config

    from worldmodel.config import ConfigError, validate

    bad = "data.policy={_target_:worldmodel.data.policies.RunRight,jmp:0.5}"
    with pytest.raises(ConfigError, match=r"data.policy.jmp: not a parameter of .*RunRight"):
        validate(compose_config([bad]))
    six = save_policy_net(PolicyNet(6, width=8, depth=2), tmp_path / "six.safetensors")
    network = f"data.policy={{_target_:{CHECKPOINT},path:'{six}'}}"
    with pytest.raises(ConfigError, match="six.safetensors: the network chooses among 6 actions"):
        validate(compose_config([network]))
    validate(compose_config(["data=atari", network]))  # Pong has 6 actions too
    missing = f"data.policy={{_target_:{CHECKPOINT},path:'{tmp_path}/none.pt'}}"
    with pytest.raises(ConfigError, match="data.policy: policy checkpoint .*none.pt: no such file"):
        validate(compose_config(["data=atari", missing]))


# -- cache keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["procgen", "atari"])
def test_default_policy_keeps_the_cache_key(name, tmp_path):
    data = compose_data([f"+data={name}", f"data.root={tmp_path}"])
    assert data.policy is None
    source = instantiate(data)
    assert source.cache_dir.name == DEFAULT_CACHE_NAMES[name]
    assert "policy" not in source.recording_params()


def test_held_random_policy_draws_as_before():
    # draws of the policy as it was before it moved to data/policies.py (same seeds, same ids)
    obs = np.zeros((2, 64, 64, 3), np.uint8)
    policy = HeldRandomPolicy(15, 2, 4, seed=0)
    steps = np.stack([policy(obs) for _ in range(8)]).T
    assert steps.tolist() == [[12, 12, 12, 1, 9, 9, 9, 9], [9, 9, 4, 0, 0, 0, 0, 7]]
    policy = HeldRandomPolicy(15, 3, 3, seed=5, choices=[1, 2, 7])
    steps = np.stack([policy() for _ in range(6)]).T  # the observations are not needed
    assert steps.tolist() == [[7, 7, 7, 1, 1, 1], [7, 7, 2, 2, 2, 1], [1, 1, 1, 2, 2, 1]]


# -- gym's notice ----------------------------------------------------------------------------------
def test_recording_procgen_prints_no_gym_notice(tmp_path):
    script = textwrap.dedent(
        f"""
        from worldmodel.data.procgen import ProcgenSource

        source = ProcgenSource(
            root={str(tmp_path)!r}, num_envs=1, train_frames=4, val_frames=4, clip_length=2
        )
        source.prepare()
        print("recorded", source.cache_dir.name)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "recorded procgen-coinrun-" in run.stdout
    output = run.stdout + run.stderr
    assert "unmaintained" not in output and "Gymnasium" not in output, output
    # the notice is there to silence: a bare import of procgen prints it
    bare = subprocess.run(
        [sys.executable, "-c", "import procgen"], capture_output=True, text=True, timeout=120
    )
    assert "Gym has been unmaintained since 2022" in bare.stderr
