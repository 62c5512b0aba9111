"""The operator console: ``steerl dashboard`` serves a web page to watch, steer and deploy sessions.

- :mod:`tools.dashboard.hub`: the actor's telemetry in (frames as JPEG), the buttons out;
- :mod:`tools.dashboard.sessions`: sessions, checkpoints and evaluations started from the page;
- :mod:`tools.dashboard.app`: the FastAPI application (HTTP, one WebSocket per page);
- ``static/``: the page itself, plain HTML, CSS and JavaScript (no build step).

:func:`serve` runs all of it under uvicorn until interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

from hardware_configs.schema import SessionConfig


class DashboardRefused(RuntimeError):
    """The dashboard cannot start as configured (the message names the field)."""


def check_exposure(host: str, token: str) -> None:
    """Refuse to serve beyond loopback without a token."""
    from hardware_configs.schema import DashboardConfig

    if not DashboardConfig(host=host).loopback_only and not token:
        raise DashboardRefused(f"dashboard.host: {host} is reachable from other machines; set dashboard.token, "
                               "--token or the variable named by dashboard.token_env (the page then needs it)")


def serve(config: SessionConfig, host: str | None = None, port: int | None = None, token: str | None = None,
          runs_dir: str | Path | None = None, config_source: str = "") -> None:
    """Serve the console for ``config`` until interrupted (SIGINT/SIGTERM). ``host``/``port``/
    ``token``/``runs_dir`` override the ``dashboard`` section; ``config_source``: the config's
    name or file, offered first when the page starts a session."""
    import uvicorn

    from tools.dashboard.app import create_app
    from tools.dashboard.hub import TelemetryHub
    from tools.dashboard.sessions import SessionManager

    settings = config.dashboard
    host = host or settings.host
    port = port or settings.port
    token = settings.resolved_token() if token is None else token
    check_exposure(host, token)
    if settings.niceness and hasattr(os, "nice"):
        os.nice(settings.niceness)  # the control loop and the robot server come first
    runs = Path(runs_dir or settings.runs_dir or config.learner.run_dir)
    hub = TelemetryHub(config)
    sessions = SessionManager(runs, actor_live=lambda: hub.live,
                              request_stop=lambda: hub.send_command(stop_session=True, origin="session stop"),
                              own_config=config_source, dashboard=settings)
    app = create_app(hub, sessions, token)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    shown_host = f"[{host}]" if ":" in host else host
    print(f"steerl dashboard: http://{shown_host}:{port}/" + ("?token=<the token>" if token else "")
          + f" (actor telemetry {settings.telemetry_address}, runs in {runs})", flush=True)
    try:
        server.run()
    finally:
        sessions.close()
        hub.close()

