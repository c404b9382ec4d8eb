"""Generate and play: scripted action sequences to GIF/MP4, and keyboard play in a terminal.

`play(cfg)` runs `task=play` (see `worldmodel.play.task`); `PlaySession` turns actions into
frames one step at a time; `render_ansi` draws a frame as terminal text.
"""

from worldmodel.play.session import PlaySession
from worldmodel.play.task import play
from worldmodel.play.terminal import render_ansi, run_interactive

__all__ = ["PlaySession", "play", "render_ansi", "run_interactive"]
