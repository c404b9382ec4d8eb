"""Interactive play in a terminal: ANSI true-colour frames and single-key input, no window system.

A frame is drawn with the upper-half block character: each character cell shows two pixels, the
top one as the foreground colour and the bottom one as the background colour, so a 64x64 frame
takes 64 columns x 32 rows. Keys are read one at a time without Enter (the terminal is put in
cbreak mode: no echo, no line buffering, Ctrl-C still works) and restored on exit. When stdin is
not a terminal (a pipe, a file), input is read line by line instead and every character of a
line is one key press.

Keys: digits pick a model action directly; arrow keys / WASD / space pick a true action of the
game, translated to the model's action through the learned mapping (see `worldmodel.play`);
`r` resets to the prompt, `q` (or end of input) quits. Keys that arrive together (a held key's
auto-repeat while a frame is being generated) are coalesced into one step with the last action,
so the picture never lags behind the keyboard; `r` and `q` in a burst are honoured in order.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import numpy as np

from worldmodel.world import World

UPPER_HALF = "\u2580"
RESET = "\x1b[0m"
HOME, CLEAR, CLEAR_LINE = "\x1b[H", "\x1b[2J", "\x1b[K"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
ARROWS = {"A": "up", "B": "down", "C": "right", "D": "left"}
ARROW_GLYPHS = {"up": "\u2191", "down": "\u2193", "left": "\u2190", "right": "\u2192"}
# key name -> movement; a movement is a true action of the game (see `worldmodel.play.task`)
MOVE_KEYS = {
    "up": "up",
    "w": "up",
    "down": "down",
    "s": "down",
    "left": "left",
    "a": "left",
    "right": "right",
    "d": "right",
    " ": "noop",
}


def render_ansi(frame: np.ndarray) -> str:
    """A uint8 picture (H, W, 3) as ANSI true-colour text: ceil(H / 2) lines of W characters.

    Colours are only emitted when they change along a line; every line ends with a reset so the
    terminal's own colours come back after the picture. An odd last row is drawn on black.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
    h, w, _ = frame.shape
    if h % 2:
        frame = np.concatenate([frame, np.zeros((1, w, 3), np.uint8)])
    cells = np.concatenate([frame[0::2], frame[1::2]], axis=-1)  # (H/2, W, 6): top and bottom
    repeat = np.zeros(cells.shape[:2], dtype=bool)  # same colours as the cell to the left
    repeat[:, 1:] = (cells[:, 1:] == cells[:, :-1]).all(axis=-1)
    coloured = "\x1b[38;2;{};{};{};48;2;{};{};{}m" + UPPER_HALF
    lines = [
        "".join(UPPER_HALF if same else coloured.format(*c) for c, same in zip(row, rep)) + RESET
        for row, rep in zip(cells.tolist(), repeat.tolist())
    ]
    return "\n".join(lines)


def parse_keys(data: str) -> list[str]:
    """Key names in typed text: `up`/`down`/`left`/`right` for arrow escape sequences (both
    ESC [ X and ESC O X forms), `escape` for a lone ESC, otherwise the character itself."""
    keys, i = [], 0
    while i < len(data):
        if data[i] == "\x1b":
            if i + 2 < len(data) and data[i + 1] in "[O" and data[i + 2] in ARROWS:
                keys.append(ARROWS[data[i + 2]])
                i += 3
                continue
            keys.append("escape")
        elif data[i] not in "\r\n":
            keys.append(data[i])
        i += 1
    return keys


class KeyReader:
    """Blocking key input: single keys from a terminal in cbreak mode, else whole lines.

    `read()` returns the keys typed since the last call (at least one) from a terminal, the next
    key of the current line otherwise, and ["q"] at the end of input.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdin
        try:
            self.fd: int | None = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # e.g. io.StringIO: no descriptor
            self.fd = None
        self.tty = self.fd is not None and os.isatty(self.fd)
        self._queue: list[str] = []  # keys of the current line (line mode)

    @contextmanager
    def active(self) -> Iterator[KeyReader]:
        """cbreak mode for the duration (terminal settings restored whatever happens)."""
        if not self.tty:
            yield self
            return
        import termios
        import tty

        saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd)
            yield self
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def read(self) -> list[str]:
        if not self.tty:
            # typed-ahead input is deliberate (e.g. a script): one key per step, none coalesced
            while not self._queue:
                line = self.stream.readline()
                if not line:
                    return ["q"]
                self._queue = parse_keys(line)
            return [self._queue.pop(0)]
        data = os.read(self.fd, 64)
        if not data:
            return ["q"]
        # an escape sequence or auto-repeated keys may still be arriving: take what is there
        while select.select([self.fd], [], [], 0.005)[0]:
            more = os.read(self.fd, 64)
            if not more:
                break
            data += more
        return parse_keys(data.decode("utf-8", errors="replace"))


def help_line(num_actions: int, moves: dict[str, tuple[int, int]], source: str) -> str:
    """The key legend: digits, each movement's keys with its true and model action, r and q.

    `moves` maps a movement (up, down, left, right, noop) to (true action id, model action id).
    """
    parts = [f"0-{min(num_actions, 10) - 1}: {source} action"]
    for move, (true_id, model_id) in moves.items():
        keys = [k for k, m in MOVE_KEYS.items() if m == move]
        labels = "/".join(ARROW_GLYPHS.get(k, "space" if k == " " else k) for k in keys)
        parts.append(f"{labels} {move} (true {true_id}) -> {model_id}")
    parts += ["r: reset", "q: quit"]
    return "  ".join(parts)


def run_interactive(
    session: World,
    key_actions: dict[str, int],
    legend: str,
    reader: KeyReader | None = None,
    out: IO[str] | None = None,
) -> tuple[list[np.ndarray], list[int | str]]:
    """Play until `q` or end of input; returns every frame shown (resets included, in order)
    and the log of what was played: action ids, and "reset" where the session was reset.

    `key_actions` maps key names (see `parse_keys`) to model action ids; `legend` (see
    `help_line`) is shown under the picture with the step count and the generation rate.
    """
    reader = reader or KeyReader()
    out = out or sys.stdout
    shown: list[np.ndarray] = []
    played: list[int | str] = []

    def draw(frame: np.ndarray, status: str, new: bool = True) -> None:
        if new:
            shown.append(frame)
        fps = session.frames_per_second(last=10)
        text = [
            HOME + render_ansi(frame),
            f"step {len(session.frames) - 1}  {status}  {fps:.1f} frames/s{CLEAR_LINE}",
            legend + CLEAR_LINE,
        ]
        out.write("\n".join(text) + "\n")
        out.flush()

    out.write(CLEAR + HIDE_CURSOR)
    try:
        with reader.active():
            draw(session.reset(), "prompt")
            quit_ = False
            while not quit_:
                pending = None  # the last action key of this burst
                for key in reader.read():
                    if key == "q":
                        quit_ = True
                        break
                    if key == "r":
                        pending = None  # actions typed before a reset would be undone by it
                        draw(session.reset(), "reset")
                        played.append("reset")
                    elif key in key_actions:
                        pending = key
                    else:
                        draw(session.frames[-1], f"key {key!r} is not mapped", new=False)
                if pending is not None:
                    action = key_actions[pending]
                    draw(session.step(action), f"key {pending!r} -> action {action}")
                    played.append(action)
    except KeyboardInterrupt:
        pass
    finally:
        out.write(RESET + SHOW_CURSOR + "\n")
        out.flush()
    return shown, played
