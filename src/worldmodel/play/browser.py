"""The play page driven in headless Chromium: frames/s as the page measures it, and screenshots.

    python -m worldmodel.play.browser experiments/demo/world.safetensors --steps 4 2 \
        --screenshot experiments/demo/play_page.png

starts `python run.py task=play play.ui=web` on a free port (the command `make play` runs),
opens the page in headless Chromium, and presses keys one after another, each once the frame of
the one before is drawn. The page times every press from keydown to the frame drawn (the next
animation frame after the canvas is painted); the figure is 1000 / the median of those times.
Used by `make bench` (case `play_web`) and for the README's screenshot.

Chromium is Debian's (`apt-get install chromium`): browser downloads are not used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# a walk through a level: run right, jump right, wait, back left
KEYS = ["ArrowRight"] * 6 + ["ArrowUp", "ArrowRight", "ArrowRight", "Space", "ArrowLeft"]


def find_chromium() -> str:
    """The Chromium executable; a clear error saying how to install it when it is missing."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        raise FileNotFoundError(
            "chromium is missing: apt-get install -y chromium (as root), or set CHROMIUM to "
            "a Chromium executable"
        )
    return found


@contextmanager
def web_server(
    world: str | Path, overrides: Sequence[str] = (), timeout: float = 60.0
) -> Iterator[str]:
    """`run.py task=play play.ui=web` on a free port, as `make play` runs it; yields its URL."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable,
            str(ROOT / "run.py"),
            "task=play",
            "play.ui=web",
            "play.port=0",
            "logger=none",
            f"world={world}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            start, seen = time.monotonic(), []
            while time.monotonic() - start < timeout:
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
                found = re.search(r"http://[^\s/]+/", line)
                if found and "open" in line:
                    yield found.group(0)
                    return
            raise RuntimeError(f"the play server did not start: {''.join(seen[-10:])}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def frames_drawn(page: Any) -> int:
    return int(page.locator("#screen").get_attribute("data-frames"))


def press(page: Any, key: str) -> None:
    """Press a key and wait until its frame is drawn."""
    n = frames_drawn(page)
    page.keyboard.press(key)
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) > {n}")


def set_steps(page: Any, steps: int) -> None:
    """MaskGIT steps through the page's control, then a fresh start (a timing from the start)."""
    page.fill("#steps", str(steps))
    page.dispatch_event("#steps", "change")
    page.wait_for_function("(s) => document.getElementById('steps').value === String(s)", arg=steps)
    n = frames_drawn(page)
    page.click("#reset")
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) > {n}")


def timed_presses(page: Any, presses: int, warmup: int = 2) -> list[float]:
    """Key -> frame drawn times (ms) the page measured for `presses` presses after `warmup`."""
    for i in range(warmup):
        press(page, KEYS[i % len(KEYS)])
    before = len(page.evaluate("window.play.stats()")["latencies"])
    for i in range(presses):
        press(page, KEYS[i % len(KEYS)])
    page.wait_for_function(f"window.play.stats().latencies.length >= {min(20, before + presses)}")
    return page.evaluate("window.play.stats()")["latencies"][-min(presses, 20) :]


def measure(
    world: str | Path,
    steps: list[int],
    presses: int = 20,
    overrides: Sequence[str] = (),
    screenshot: str | Path | None = None,
    prompt: int = 0,
    shot_presses: int = 6,
) -> dict[str, Any]:
    """Frames/s from key press to frame drawn at each MaskGIT step count, in headless Chromium,
    from start frame `prompt`; then, if asked, a screenshot of the whole page `shot_presses`
    presses into a game from that start frame."""
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {}
    with web_server(world, overrides) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1060, "height": 760})
        page.goto(url)
        page.wait_for_function("Number(document.getElementById('screen').dataset.frames) >= 1")
        default_steps = int(page.input_value("#steps"))
        if prompt:
            page.locator("#prompts img").nth(prompt).click()
            page.wait_for_function(
                "(i) => document.querySelectorAll('#prompts img.selected')[0] === "
                "document.querySelectorAll('#prompts img')[i]",
                arg=prompt,
            )
        for n in steps:
            set_steps(page, n)
            times = timed_presses(page, presses)
            med = statistics.median(times)
            results[str(n)] = {
                "frames_per_s": 1000.0 / med,
                "ms": med,
                "ms_min": min(times),
                "ms_max": max(times),
                "presses": len(times),
            }
        if screenshot is not None:
            set_steps(page, default_steps)
            for i in range(shot_presses):
                press(page, KEYS[i % len(KEYS)])
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"default_steps": default_steps, "by_steps": results, "url": url}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worldmodel.play.browser", description=__doc__)
    parser.add_argument("world", help="a world file or run folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 2], help="MaskGIT steps")
    parser.add_argument("--presses", type=int, default=20, help="timed presses per setting")
    parser.add_argument("--prompt", type=int, default=0, help="start frame (index)")
    parser.add_argument("--screenshot", help="save a screenshot of the page at the end")
    parser.add_argument("--shot-presses", type=int, default=6, help="presses before it")
    parser.add_argument("--overrides", nargs="*", default=[], help="for the server's run.py")
    args = parser.parse_args(argv)
    result = measure(
        args.world,
        args.steps,
        args.presses,
        args.overrides,
        args.screenshot,
        args.prompt,
        args.shot_presses,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
