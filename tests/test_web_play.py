"""The web page (`task=play play.ui=web`) in headless Chromium: a real server, a real browser.

The server runs in this process (uvicorn in a thread, on a free port) over a folder holding the
shipped demo world, its start frames, a corrupt world file and a safetensors file of another kind.
Chromium is Debian's (`apt-get install chromium`, which `.ci/run` does); without it these tests
skip and say so.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from safetensors.torch import save_file

from worldmodel.play.browser import CHROMIUM_ARGS, find_chromium, web_server
from worldmodel.play.session import WorldLibrary
from worldmodel.play.task import DEFAULTS
from worldmodel.play.web import make_server

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

DEMO = ROOT / "experiments" / "demo"
try:
    CHROMIUM = find_chromium()
except FileNotFoundError as missing:
    pytestmark = pytest.mark.skip(reason=f"{missing} (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worlds")
    os.symlink(DEMO / "world.safetensors", folder / "demo.safetensors")
    shutil.copy(DEMO / "prompts.npz", folder / "prompts.npz")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    save_file({"w": torch.zeros(2)}, str(folder / "weights.safetensors"))  # not a world
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the browser on a small machine
    library = WorldLibrary(folder / "demo.safetensors")
    library.get(library.default)
    settings = {**DEFAULTS, "seed": 0}
    srv, sock, url = make_server(library, settings)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    wait_frames(page, 1)
    yield page
    page.close()
    assert not errors, f"the page raised: {errors}"


def frames(page) -> int:
    return int(page.locator("#screen").get_attribute("data-frames"))


def wait_frames(page, n: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) >= {n}")


def press(page, *keys: str) -> None:
    """Press keys one after another, each waiting for its frame."""
    for key in keys:
        n = frames(page)
        page.keyboard.press(key)
        wait_frames(page, n + 1)


def pixels(page) -> np.ndarray:
    """The picture on the canvas (H, W, 3) uint8, read back from the page."""
    h, w, data = page.evaluate(
        """() => { const c = document.getElementById('screen');
        return [c.height, c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width,
        c.height).data)]; }"""
    )
    return np.array(data, dtype=np.uint8).reshape(h, w, 4)[..., :3]


def send_raw(page, text: str) -> None:
    page.evaluate("(t) => window.play.socket.send(t)", text)


def error_text(page, contains: str) -> str:
    page.wait_for_function(
        "(s) => !document.getElementById('error').hidden && "
        "document.getElementById('error').textContent.includes(s)",
        arg=contains,
    )
    return page.inner_text("#error")


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_keys_play_frames_drawn_large_with_legend_and_frames_per_s(page):
    legend = page.inner_text("#legend")
    assert "right" in legend and "model" in legend, legend
    assert page.locator("#digits button").count() >= 2
    assert page.locator("#prompts img").count() == len(np.load(DEMO / "prompts.npz")["frames"])
    style = page.evaluate(
        "() => { const s = getComputedStyle(document.getElementById('screen'));"
        "return [s.imageRendering, parseFloat(s.width)]; }"
    )
    assert style[0] == "pixelated" and style[1] >= 256, style
    press(page, "ArrowRight", "ArrowRight", "d", "Space", "ArrowLeft", "Digit1")
    assert page.inner_text("#frame-index") == "6"
    fps = float(page.locator("#fps").get_attribute("data-fps"))
    assert fps > 0 and page.inner_text("#fps") != "–"
    stats = page.evaluate("window.play.stats()")
    assert len(stats["latencies"]) == 6 and all(ms > 0 for ms in stats["latencies"])
    assert pixels(page).std() > 0, "the canvas is blank"
    # a diagonal: two arrows held send the combination's action (shown highlighted)
    page.keyboard.down("ArrowRight")
    n = frames(page)
    page.keyboard.press("ArrowUp")
    page.keyboard.up("ArrowRight")
    wait_frames(page, n + 2)
    assert page.locator("#legend tr.active").get_attribute("data-move") == "right+up"


def test_two_key_sequences_from_one_start_differ_and_a_replay_repeats(page):
    n_actions = page.locator("#digits button").count()
    first, last = "Digit0", f"Digit{min(n_actions, 10) - 1}"
    press(page, first, first, first, first)
    a = pixels(page)
    press(page, "r")  # back to the start frame, random stream from its start
    press(page, last, last, last, last)
    b = pixels(page)
    press(page, "r")
    press(page, first, first, first, first)
    again = pixels(page)
    assert not np.array_equal(a, b), "different actions from one start gave the same frame"
    assert np.array_equal(a, again), "the same keys after a reset gave another frame"


def test_a_dropped_image_is_the_start_frame_and_plays(page):
    image = np.zeros((90, 120, 3), np.uint8)
    image[..., 0] = 230  # a red picture of another size than the world's frames
    image[30:60, 40:80] = (20, 200, 40)
    page.set_input_files("#file", files=[{"name": "mine.png", "mimeType": "image/png",
                                          "buffer": png(image)}])  # fmt: skip
    page.wait_for_function("document.getElementById('frame-index').textContent === '0'")
    wait_frames(page, 2)
    start = pixels(page).astype(float)
    assert start[..., 0].mean() > start[..., 2].mean() + 50, "the start frame is not the image"
    assert page.locator("#prompts img.selected").count() == 0
    press(page, "ArrowRight", "ArrowRight")
    assert page.inner_text("#frame-index") == "2"


def test_bad_input_gets_a_message_and_the_server_keeps_serving(page):
    send_raw(page, "{not json")
    assert "malformed message" in error_text(page, "malformed")
    send_raw(page, '{"type": "fly"}')
    assert "step" in error_text(page, "unknown message type 'fly'")
    send_raw(page, '{"type": "step", "action": 99}')
    error_text(page, "action 99 is outside")
    send_raw(page, '{"type": "configure", "steps": 0}')
    error_text(page, "steps=0")
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"just some text"}])  # fmt: skip
    error_text(page, "not an image")
    page.set_input_files("#file", files=[{"name": "huge.png", "mimeType": "image/png",
                                          "buffer": b"\x89PNG" + bytes(9 * 2**20)}])  # fmt: skip
    error_text(page, "MB are accepted")
    page.select_option("#world-choice", "broken.safetensors")
    error_text(page, "broken.safetensors cannot be played")
    page.select_option("#world-choice", "weights.safetensors")
    error_text(page, "not a world file")
    # the same connection still plays the world it had
    press(page, "ArrowRight")
    assert page.locator("#error").is_hidden()
    assert page.inner_text("#frame-index") == "1"


def test_settings_downloads_and_tabs_are_separate(page, browser, server):
    page.fill("#steps", "2")
    page.dispatch_event("#steps", "change")
    page.locator("#prompts img").nth(3).click()
    page.wait_for_function("document.querySelectorAll('#prompts img.selected').length === 1")
    press(page, "ArrowRight", "ArrowUp", "ArrowRight")
    other = browser.new_page()
    other.goto(server)
    wait_frames(other, 1)
    assert other.inner_text("#frame-index") == "0" and page.inner_text("#frame-index") == "3"
    assert other.input_value("#steps") != "2" and page.input_value("#steps") == "2"
    other.close()
    gif = page.request.get(page.evaluate("document.getElementById('gif').href"))
    assert gif.status == 200 and gif.body()[:4] == b"GIF8"
    assert Image.open(io.BytesIO(gif.body())).n_frames >= 2
    mp4 = page.request.get(page.evaluate("document.getElementById('mp4').href"))
    assert mp4.status == 200 and b"ftyp" in mp4.body()[:16]
    assert page.request.get(f"{server}session/nobody/play.gif").status == 404


def test_run_py_serves_the_page_and_prints_its_url():
    """`python run.py task=play play.ui=web world=...` (what `make play` runs) prints the
    page's URL within a minute and serves the page and its script there."""
    start = time.monotonic()
    with web_server(DEMO / "world.safetensors", ["play.steps=2"], timeout=60) as url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url) and time.monotonic() - start < 60
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b'<canvas id="screen"' in response.read()
        with urllib.request.urlopen(f"{url}static/play.js", timeout=10) as response:
            assert b"WebSocket" in response.read()
