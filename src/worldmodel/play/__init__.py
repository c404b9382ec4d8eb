"""Play a World: scripted action sequences to GIF/MP4, and keyboard play in a terminal.

`play(cfg)` runs `task=play` (see `worldmodel.play.task`) on a `worldmodel.world.World`;
`render_ansi` draws a frame as terminal text.
"""

from worldmodel.play.task import play
from worldmodel.play.terminal import render_ansi, run_interactive

__all__ = ["play", "render_ansi", "run_interactive"]
