"""`task=play`: scripted rollouts to GIF/MP4/JSON, the play session, the terminal renderer, and an
interactive session driven through a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_world_eval import DATA, build_world

from worldmodel.eval.world import pixel_val, token_val
from worldmodel.play import play, render_ansi, run_interactive
from worldmodel.play.task import play_threads
from worldmodel.play.terminal import KeyReader, parse_keys
from worldmodel.world import World

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield build_world(tmp_path_factory.mktemp("world"))
    torch.set_num_threads(threads)


def _session(world, steps: int = 4) -> World:
    session = World.load(world.dynamics_true)
    session.configure(steps=steps)
    session.reset(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return session


def _mp4_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_headless_play_writes_gif_mp4_and_json(world, tmp_path):
    torch.manual_seed(0)
    actions = [0, 1, 1, 2, 14, 7, 7, 3, 4, 5]  # more than max_frames=8: the window slides
    cfg = world.config(world.dynamics_true, f"++play.actions={actions}", run_dir=tmp_path)
    result = play(cfg)

    record = json.loads((tmp_path / "play.json").read_text())
    assert record == json.loads(json.dumps(result))
    assert record["actions"] == actions and record["num_frames"] == len(actions) + 1
    assert record["frames_per_s"] > 0 and record["steps"] == 4
    assert _mp4_frames(tmp_path / "play.mp4") == len(actions) + 1
    with Image.open(tmp_path / "play.gif") as gif:
        assert gif.size == (64 * 4, 64 * 4)  # play.scale=4
        assert 2 <= gif.n_frames <= len(actions) + 1  # Pillow merges repeated frames


def test_play_maps_true_actions_and_takes_an_image_prompt(world, tmp_path, caplog):
    torch.manual_seed(0)
    image = tmp_path / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)).save(image)
    cfg = world.config(
        world.dynamics_true,
        "++play.actions=[3,7]",
        "++play.action_space=true",
        f"++play.prompt_image={image}",
        run_dir=tmp_path / "run",
    )
    result = play(cfg)
    assert "resizing it to the tokenizer's 64x64" in caplog.text
    # a model trained on true actions: true action ids are its own ids
    assert result["actions"] == [3, 7] and result["true_to_model_actions"]["7"] == 7
    assert result["num_frames"] == 3 and result["prompt"] == str(image)


def test_a_world_file_plays_true_actions_from_an_image_with_its_own_mapping(world, tmp_path):
    """A latent world that carries its key mapping plays game actions from a picture without
    reading any data."""
    parts = World.load(world.dynamics_latent)
    parts.true_to_model_actions = {1: 2, 7: 3}
    file = parts.export(tmp_path / "world.safetensors")
    image = tmp_path / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)

    def game_actions(actions: str, run: str):
        return world.config(
            str(file),
            f"++play.actions={actions}",
            "++play.action_space=true",
            f"++play.prompt_image={image}",
            run_dir=tmp_path / run,
        )

    result = play(game_actions("[7,1,7]", "run"))
    assert result["actions"] == [3, 2, 3] and result["num_frames"] == 4
    with pytest.raises(ValueError, match="true action 5 has no latent action"):
        play(game_actions("[5]", "bad"))


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("++play.actions=[0,15]", ValueError, r"action 15 is outside \[0, 15\)"),
        ("++play.actions=[-1]", ValueError, r"action -1 is outside \[0, 15\)"),
        (
            "++play.actions=[3,15] ++play.action_space=true",
            ValueError,
            r"true action 15 is outside \[0, 15\)",
        ),
        ("++play.actions=[]", ValueError, "play.actions is empty"),
        ("++play.prompt_image=PROMPT", ValueError, "cannot be read as an image"),
        ("++play.prompt_image=/no/such/image.png", FileNotFoundError, "no such file"),
        ("++play.prompt_index=100000", ValueError, "outside the 300 validation frames"),
        ("++play.action_spaces=true", ValueError, "unknown play settings: play.action_spaces"),
    ],
)
def test_play_rejects_bad_actions_and_prompts(world, tmp_path, override, error, message):
    torch.manual_seed(0)
    bad_image = tmp_path / "notes.png"
    bad_image.write_text("not an image")
    overrides = override.replace("PROMPT", str(bad_image)).split()
    actions = [] if "actions" in override else ["++play.actions=[1,2]"]
    cfg = world.config(world.dynamics_true, *actions, *overrides, run_dir=tmp_path / "run")
    with pytest.raises(error, match=message):
        play(cfg)
    assert not (tmp_path / "run" / "play.gif").exists()  # nothing is generated first


def test_session_steps_resets_and_replays(world):
    torch.manual_seed(0)
    session = _session(world, steps=2)
    first = [session.step(a) for a in (1, 2, 3)]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in first)
    assert session.actions_taken == [1, 2, 3] and len(session.frames) == 4
    prompt_frame = session.frames[0]
    prompt = session.reset()
    assert np.array_equal(prompt, prompt_frame) and len(session.frames) == 1
    again = [session.step(a) for a in (1, 2, 3)]  # the same random stream after a reset
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # far past the 8-frame window: the context is cut to its recent half and play goes on
    for i in range(20):
        session.step(i % 15)
    assert session.state.tokens.shape[1] <= session.dynamics.max_frames
    assert session.frames_per_second() > 0
    with pytest.raises(ValueError, match=r"action 15 is outside \[0, 15\)"):
        session.step(15)


def test_render_ansi_draws_two_pixels_per_character():
    torch.manual_seed(0)
    frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    lines = render_ansi(frame).split("\n")
    assert len(lines) == 32 and all(line.count("\u2580") == 64 for line in lines)
    top, bottom = frame[0, 0], frame[1, 0]
    assert lines[0].startswith(
        f"\x1b[38;2;{top[0]};{top[1]};{top[2]};48;2;{bottom[0]};{bottom[1]};{bottom[2]}m"
    )
    assert all(line.endswith("\x1b[0m") for line in lines)
    flat = np.zeros((5, 3, 3), np.uint8)  # odd height: the last row is drawn on black
    lines = render_ansi(flat).split("\n")
    assert len(lines) == 3 and lines[0].count("\x1b[38;2") == 1  # one colour run per line
    with pytest.raises(ValueError, match="uint8 frame"):
        render_ansi(flat.astype(np.float32))


def test_parse_keys_reads_arrows_and_letters():
    assert parse_keys("1\x1b[Cq\x1bOA \x1b\n") == ["1", "right", "q", "up", " ", "escape"]


def test_interactive_loop_without_a_terminal(world):
    """stdin is not a TTY: keys come line by line, one step per key, q quits."""
    torch.manual_seed(0)
    session = _session(world, steps=2)
    keys = {"1": 1, "2": 2, "right": 7}
    out = io.StringIO()
    reader = KeyReader(io.StringIO("12\n\x1b[C\nx\nr\n2\nq\n1\n"))
    frames, played = run_interactive(session, keys, "legend", reader, out)
    assert played == [1, 2, 7, "reset", 2]
    assert len(frames) == 6  # prompt, 3 steps, the prompt again, 1 step (x adds none)
    text = out.getvalue()
    assert "key 'x' is not mapped" in text and "frames/s" in text and "legend" in text
    assert text.count("\u2580") == 64 * 32 * 7  # 7 pictures drawn (x redraws the last one)


def _read_until(fd: int, marker: bytes, seen: bytearray, start: int, timeout: float) -> int:
    """Read the pty into `seen` until `marker` appears after offset `start`; its end offset."""
    deadline = time.monotonic() + timeout
    while marker not in seen[start:]:
        left = deadline - time.monotonic()
        if left <= 0:
            tail = bytes(seen[-400:]).decode(errors="replace")
            raise AssertionError(f"{marker!r} not seen in {timeout} s; output ends {tail!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            with contextlib.suppress(OSError):  # the child closed the terminal
                seen += os.read(fd, 1 << 16)
    return seen.index(marker, start) + len(marker)


def test_interactive_play_in_a_pseudo_terminal(world, tmp_path):
    """run.py task=play play.interactive=true on a real pty: single keys without Enter."""
    torch.manual_seed(0)
    master, slave = pty.openpty()
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "task=play",
        f"checkpoint={world.dynamics_true}",
        "++play.interactive=true",
        "++play.steps=2",
        f"hydra.run.dir={tmp_path}",
        *DATA,
    ]
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, cwd=ROOT, close_fds=True
    )
    os.close(slave)
    seen = bytearray()
    try:
        pos = _read_until(master, b"step 0  prompt", seen, 0, timeout=120)
        assert seen.count("\u2580".encode()) >= 64 * 32  # a whole picture of half-blocks
        for key, marker in [
            (b"1", b"step 1  key '1' -> action 1"),
            (b"\x1b[C", b"step 2  key 'right' -> action 7"),
            (b"w", b"step 3  key 'w' -> action 5"),
            (b"r", b"step 0  reset"),
            (b"3", b"step 1  key '3' -> action 3"),
        ]:
            os.write(master, key)
            pos = _read_until(master, marker, seen, pos, timeout=30)
        assert "→/d right (true 7) -> 7".encode() in seen  # the on-screen key legend
        os.write(master, b"q")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    record = json.loads((tmp_path / "play.json").read_text())
    assert record["actions"] == [1, 7, 5, "reset", 3]
    assert record["num_frames"] == 6  # prompt, 3 steps, prompt, 1 step
    assert _mp4_frames(tmp_path / "play.mp4") == 6


def test_play_maps_true_actions_through_the_lams_codes(world, tmp_path):
    """action_space=true on a model of latent actions: each true action becomes the LAM code most
    specific to it where it starts, on the validation split (the highest P(action | code) over the
    transitions whose action differs from the one before, or that start an episode)."""
    torch.manual_seed(0)
    cfg = world.config(
        world.dynamics_latent,
        "++play.actions=[1,7,7]",
        "++play.action_space=true",
        run_dir=tmp_path,
    )
    result = play(cfg)
    mapping = result["true_to_model_actions"]
    assert result["action_source"] == "latent"
    assert result["actions"] == [mapping["1"], mapping["7"], mapping["7"]]
    # the same mapping computed by hand from the recorded and the cached latent actions
    parts = World.load(world.dynamics_latent)
    pixels = pixel_val(cfg.data)
    true = np.load(pixels.actions_path)
    latent = np.load(token_val(parts, pixels).actions_path)
    starts = np.zeros(len(true), dtype=bool)
    starts[[int(e["offset"]) for e in pixels.episodes]] = True
    onset = starts | np.concatenate([[True], true[1:] != true[:-1]])
    keep = onset & (true >= 0) & (latent >= 0)
    counts = np.zeros((15, 4))
    np.add.at(counts, (true[keep], latent[keep]), 1)
    posterior = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)  # P(action | code)
    for action in (1, 7):
        assert mapping[str(action)] == posterior[action].argmax()
    # the model's own ids are the LAM's 4 codes
    cfg = world.config(world.dynamics_latent, "++play.actions=[4]", run_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match=r"action 4 is outside \[0, 4\)"):
        play(cfg)


def test_play_threads_default_to_one_for_the_web_page() -> None:
    cfg = OmegaConf.create({"trainer": {"threads": None}})
    assert play_threads({"threads": None, "ui": "web"}, cfg) == 1
    assert play_threads({"threads": None, "ui": "headless"}, cfg) is None  # chosen per machine
    assert play_threads({"threads": 2, "ui": "web"}, cfg) == 2  # asked for: kept
    cfg.trainer.threads = 2
    assert play_threads({"threads": None, "ui": "web"}, cfg) == 2
