"""`recsys serve`: run the API with uvicorn (the app is built by `create_app` in every worker process)."""

from __future__ import annotations

import uvicorn

APP_FACTORY = "recsys_serving.app:create_app"


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the API until interrupted; settings come from the environment (`load_settings`).

    Each worker loads the artifacts and polls the manifests itself. The access log is off by default: it
    costs a large share of throughput, and /metrics plus the X-Request-Id of every response cover it.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        # In-flight requests get up to 10 s to finish on shutdown (SIGTERM), then connections close.
        timeout_graceful_shutdown=10,
    )
