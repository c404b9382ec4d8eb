"""`task=play play.ui=web`: play a world in the browser, one WebSocket per tab.

    make play                                                     # the shipped demo world
    python run.py task=play play.ui=web checkpoint=PATH           # a world file or run folder

A Starlette app served by uvicorn on `play.host:play.port` (127.0.0.1 unless told otherwise).
Routes: `/` (the page, `static/index.html`), `/static/*` (its script and style), `/ws` (the
game), `/session/{id}/play.{gif,mp4}` (the tab's frames since its last reset, as a download) and
`/worlds/{name}/prompts/{i}.png` (the start frames, as thumbnails).

The game's protocol. The page sends text JSON, each command with an optional `seq` (a positive
integer the reply echoes, so the page can time a key press to its frame):

    {"type": "step", "action": 3}                       # a model action id
    {"type": "reset", "prompt": 5}                      # start frame 5 (no prompt: replay this one)
    {"type": "configure", "steps": 2, "temperature": 1.0}
    {"type": "world", "name": "world.safetensors"}      # another world of the folder

or a binary message: an image file to start from (any size; resized to the world's frames).
The server answers with `{"type": "info", ...}` (the world's actions, keys and settings) when
they change, `{"type": "error", "message": ...}` for anything wrong (the socket stays open), and
each frame as a binary message: `session.FRAME_HEADER` then the raw RGB bytes. World calls run in
worker threads (`anyio.to_thread`), so the event loop keeps serving other tabs meanwhile.
"""

from __future__ import annotations

import io
import json
import logging
import socket
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from worldmodel.play.session import MAX_UPLOAD_BYTES, PlaySession, WorldLibrary, pack_frame

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
# a larger message closes the socket (uvicorn's limit); up to it the server answers in words
WS_MAX_BYTES = 2 * MAX_UPLOAD_BYTES
COMMANDS = ("step", "reset", "configure", "world")
MEDIA_TYPES = {"gif": "image/gif", "mp4": "video/mp4"}


def parse_command(text: str | None) -> dict[str, Any]:
    """A text message as a command dict; ValueError naming what is malformed."""
    try:
        command = json.loads(text or "")
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed message (not JSON: {e.msg}): {str(text)[:80]!r}") from e
    if not isinstance(command, dict) or not isinstance(command.get("type"), str):
        raise ValueError('malformed message: expected a JSON object with a "type"')
    if command["type"] not in COMMANDS:
        raise ValueError(f"unknown message type {command['type']!r} (known: {', '.join(COMMANDS)})")
    seq = command.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**32:
        raise ValueError(f"seq={seq!r}: expected an integer in 0..2^32-1")
    return command


async def _send_frame(
    ws: WebSocket, session: PlaySession, frame: np.ndarray, seq: int, ms: float = 0.0
) -> None:
    await ws.send_bytes(pack_frame(frame, seq, session.frame_index, ms))


async def _handle(ws: WebSocket, session: PlaySession, command: dict[str, Any]) -> None:
    """Run one command in a worker thread and send its replies."""
    kind, seq = command["type"], command.get("seq", 0)
    if kind == "step":
        if "action" not in command:
            raise ValueError('a step needs an "action" (a model action id)')
        frame, ms = await anyio.to_thread.run_sync(session.step, command["action"])
        await _send_frame(ws, session, frame, seq, ms)
        return
    if kind == "configure":
        steps, temperature = command.get("steps"), command.get("temperature")
        await anyio.to_thread.run_sync(session.configure, steps, temperature)
        await ws.send_json(session.info())
        return
    if kind == "reset":
        frame = await anyio.to_thread.run_sync(session.reset, command.get("prompt"))
    else:  # world
        frame = await anyio.to_thread.run_sync(session.open, str(command.get("name")))
    await ws.send_json(session.info())
    await _send_frame(ws, session, frame, seq)


async def play_socket(ws: WebSocket, session: PlaySession) -> None:
    """One tab's game until it closes; bad input gets an error message, never a closed socket."""
    try:
        frame = await anyio.to_thread.run_sync(session.open, session.library.default)
        await ws.send_json(session.info())
        await _send_frame(ws, session, frame, 0)
    except ValueError as e:
        await ws.send_json({"type": "error", "message": str(e), "seq": 0})
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        seq = 0
        try:
            if message.get("bytes") is not None:  # an image to start from
                frame = await anyio.to_thread.run_sync(session.reset_image, message["bytes"])
                await ws.send_json(session.info())
                await _send_frame(ws, session, frame, 0)
                continue
            command = parse_command(message.get("text"))
            seq = command.get("seq", 0)
            await _handle(ws, session, command)
        except WebSocketDisconnect:
            return
        except ValueError as e:
            await ws.send_json({"type": "error", "message": str(e), "seq": seq})
        except Exception as e:  # a bug must not end the game: log it, tell the page
            log.exception("play: command failed")
            await ws.send_json(
                {"type": "error", "message": f"internal error: {type(e).__name__}: {e}", "seq": seq}
            )


def create_app(library: WorldLibrary, settings: dict[str, Any]) -> Starlette:
    """The web app over a library of worlds; `settings` are the play settings (steps, ...)."""
    sessions: dict[str, PlaySession] = {}

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def game(ws: WebSocket) -> None:
        await ws.accept()
        session = PlaySession(library, settings)
        sessions[session.id] = session
        try:
            await play_socket(ws, session)
        finally:
            sessions.pop(session.id, None)

    async def video(request: Request) -> Response:
        session = sessions.get(request.path_params["session"])
        fmt = request.path_params["fmt"]
        if session is None:
            return PlainTextResponse("no such session (its tab is closed)", status_code=404)
        try:
            data = await anyio.to_thread.run_sync(session.video, fmt)
        except ValueError as e:
            return PlainTextResponse(str(e), status_code=400)
        headers = {"Content-Disposition": f'attachment; filename="play.{fmt}"'}
        return Response(data, media_type=MEDIA_TYPES.get(fmt), headers=headers)

    async def prompt_png(request: Request) -> Response:
        from PIL import Image

        name, index = request.path_params["name"], request.path_params["index"]
        try:
            prompts = await anyio.to_thread.run_sync(library.prompts, name)
        except ValueError as e:
            return PlainTextResponse(str(e), status_code=404)
        if prompts is None or not 0 <= index < len(prompts):
            return PlainTextResponse(f"{name} has no start frame {index}", status_code=404)
        out = io.BytesIO()
        Image.fromarray(prompts[index]).save(out, format="PNG")
        return Response(out.getvalue(), media_type="image/png")

    routes = [
        Route("/", page),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        WebSocketRoute("/ws", game),
        Route("/session/{session}/play.{fmt}", video),
        Route("/worlds/{name}/prompts/{index:int}.png", prompt_png),
    ]
    return Starlette(routes=routes)


def make_server(
    library: WorldLibrary, settings: dict[str, Any], host: str = "127.0.0.1", port: int = 0
) -> tuple[uvicorn.Server, socket.socket, str]:
    """A uvicorn server for the app, its listening socket (port 0 = a free one) and its URL;
    `server.run(sockets=[sock])` serves until `server.should_exit` is set."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ValueError(f"play.host={host} play.port={port}: cannot listen there ({e})") from e
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    bound = sock.getsockname()[1]
    url = f"http://[{host}]:{bound}/" if family == socket.AF_INET6 else f"http://{host}:{bound}/"
    config = uvicorn.Config(
        create_app(library, settings), log_level="warning", ws_max_size=WS_MAX_BYTES
    )
    return uvicorn.Server(config), sock, url


def serve(source: str | Path, settings: dict[str, Any], device: Any = "cpu") -> None:
    """Serve the worlds of `source` until interrupted; prints the page's URL once it is ready."""
    library = WorldLibrary(source, device, settings["precision"])
    library.get(library.default)  # fail here, not in the page, when the world cannot load
    server, sock, url = make_server(library, settings, settings["host"], settings["port"])
    print(f"play: open {url} in a browser ({library.default}; Ctrl-C stops)", flush=True)
    server.run(sockets=[sock])
