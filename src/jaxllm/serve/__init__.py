"""``jaxllm serve``: an OpenAI-compatible HTTP server over one LLM (see app.py for the API)."""

from __future__ import annotations

import contextlib
import signal

from .app import build_app

__all__ = ["build_app", "serve"]


def serve(llm, served_model_name: str, host: str = "127.0.0.1", port: int = 8000, **app_kwargs) -> None:
    """Run until SIGINT / SIGTERM: uvicorn stops taking connections and lets open responses end
    (30 s at most); then the LLM shuts down, so whatever still runs ends "cancelled" with a reason,
    and this returns (the process exits 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # stop on a signal, without re-raising it afterwards
            def stop(signum, frame):
                self.should_exit = True

            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    app = build_app(llm, served_model_name, **app_kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    try:
        Server(config).run()
    finally:
        llm.shutdown()
