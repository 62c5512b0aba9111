"""The operator console's web server: FastAPI over uvicorn, one page, one WebSocket per page.

Routes (with a token set, every one but the page and its static files is refused with 401 unless
the request carries the token, as the ``X-Steerl-Token`` header or a ``token`` query parameter; the
page takes it from its own ``?token=`` or asks for it):

================================  ================================================================
``GET /``                         the page (static/index.html, plain HTML/JS, no build step)
``WS /ws``                        pushes the state as JSON about 5 times a second and every new
                                  camera frame as a binary message: a 4-byte big-endian header
                                  length, a JSON header (camera, sequence, observed_unix_s), JPEG
``GET /api/state``                the same state once (for scripts)
``GET /api/frames/{camera}.jpg``  a camera's newest frame
``POST /api/command``             ``{"event": NAME}`` or ``{"stop_session": true}``: a button
``GET /api/configs``              the configs a session can start on (the dashboard's own first)
``GET /api/session``              the session and evaluations this page started
``POST /api/session/start``       ``{"config": NAME, "steps": N}``
``POST /api/session/stop``        stop after the episode under way
``GET /api/checkpoints``          the checkpoints under the runs directory
``POST /api/evaluate``            ``{"config": NAME, "checkpoint": PATH, "episodes": N}``
================================  ================================================================

Bad requests get a 400 (422 for malformed JSON) whose ``error`` names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import struct
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from tools.dashboard.hub import CommandRefused, TelemetryHub
from tools.dashboard.sessions import SessionManager, SessionRefused

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATE_EVERY_S = 0.2
TOKEN_HEADER = "x-steerl-token"


def _authorised(token: str, presented: str | None) -> bool:
    return not token or (presented is not None and hmac.compare_digest(token.encode(), presented.encode()))


def _refused(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def frame_message(camera: str, sequence: int, observed_unix_s: float, jpeg: bytes) -> bytes:
    """The binary WebSocket message of one frame (see the module docstring)."""
    header = json.dumps({"camera": camera, "sequence": sequence, "observed_unix_s": observed_unix_s}).encode()
    return struct.pack(">I", len(header)) + header + jpeg


def create_app(hub: TelemetryHub, sessions: SessionManager, token: str = "") -> FastAPI:
    """The dashboard's FastAPI application around ``hub`` and ``sessions``."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        hub.notifier.bind(asyncio.get_running_loop())
        yield

    app = FastAPI(title="steerl operator console", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            return await call_next(request)  # the page itself holds no data; it asks for the token
        presented = request.headers.get(TOKEN_HEADER) or request.query_params.get("token")
        if not _authorised(token, presented):
            return _refused(401, "this console needs its token: open the page as /?token=... "
                                 "(or send the X-Steerl-Token header)")
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    def state() -> dict[str, Any]:
        snapshot = hub.snapshot()
        snapshot.update(sessions.describe())
        snapshot["server_unix_s"] = time.time()
        return snapshot

    @app.get("/api/state")
    async def get_state() -> dict[str, Any]:
        return state()

    @app.get("/api/frames/{camera}.jpg")
    async def get_frame(camera: str) -> Response:
        frame = hub.frames().get(camera)
        if frame is None:
            return _refused(404, f"camera: no frame from {camera!r} (cameras: {', '.join(hub.frames()) or 'none'})")
        return Response(frame.jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def body(request: Request) -> dict[str, Any]:
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _BadRequest(422, "body: not JSON") from None
        if not isinstance(payload, dict):
            raise _BadRequest(422, "body: a JSON object expected")
        return payload

    @app.exception_handler(_BadRequest)
    async def bad_request(_: Request, error: _BadRequest) -> JSONResponse:
        return _refused(error.status, error.message)

    @app.post("/api/command")
    async def post_command(request: Request) -> JSONResponse:
        payload = await body(request)
        event = payload.get("event", "")
        stop_session = payload.get("stop_session", False)
        if not isinstance(event, str):
            return _refused(400, "event: a string expected")
        if not isinstance(stop_session, bool):
            return _refused(400, "stop_session: true or false expected")
        origin = f"page {request.client.host if request.client else '?'}"
        try:
            result = await asyncio.to_thread(hub.send_command, event, stop_session, origin)
        except CommandRefused as error:
            return _refused(error.status, str(error))
        return JSONResponse(result)

    @app.get("/api/configs")
    async def get_configs() -> dict[str, Any]:
        return {"configs": sessions.configs()}

    @app.get("/api/session")
    async def get_session() -> dict[str, Any]:
        return sessions.describe()

    def _session_call(function, *arguments) -> JSONResponse:
        try:
            return JSONResponse(function(*arguments))
        except SessionRefused as error:
            return _refused(error.status, str(error))

    @app.post("/api/session/start")
    async def start_session(request: Request) -> JSONResponse:
        payload = await body(request)
        return _session_call(sessions.start, payload.get("config", ""), payload.get("steps", 10_000))

    @app.post("/api/session/stop")
    async def stop_session() -> JSONResponse:
        return _session_call(sessions.stop)

    @app.get("/api/checkpoints")
    async def get_checkpoints() -> dict[str, Any]:
        return {"runs_dir": str(sessions.runs_dir), "checkpoints": sessions.checkpoints()}

    @app.post("/api/evaluate")
    async def evaluate(request: Request) -> JSONResponse:
        payload = await body(request)
        return _session_call(sessions.evaluate, payload.get("config", ""), payload.get("checkpoint", ""),
                             payload.get("episodes", 10))

    @app.websocket("/ws")
    async def stream(socket: WebSocket) -> None:
        if not _authorised(token, socket.headers.get(TOKEN_HEADER) or socket.query_params.get("token")):
            await socket.close(code=4401, reason="token required")
            return
        await socket.accept()
        sent: dict[str, int] = {}
        last_state = 0.0
        try:
            while True:
                for camera, frame in hub.frames().items():
                    if sent.get(camera) != frame.sequence:
                        sent[camera] = frame.sequence
                        await socket.send_bytes(frame_message(camera, frame.sequence, frame.observed_unix_s,
                                                              frame.jpeg))
                now = time.monotonic()
                if now - last_state >= STATE_EVERY_S:
                    last_state = now
                    await socket.send_text(json.dumps(state()))
                await hub.notifier.wait(STATE_EVERY_S)
        except (WebSocketDisconnect, RuntimeError):
            return  # the page went away

    return app


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
