"""``jaxllm serve``: an OpenAI-compatible HTTP server over one LLM (see app.py for the API)."""

from __future__ import annotations

from .app import build_app

__all__ = ["build_app", "serve"]


def serve(llm, served_model_name: str, host: str = "127.0.0.1", port: int = 8000, **app_kwargs) -> None:
    """Run until SIGINT / SIGTERM: uvicorn stops taking connections and lets open responses end;
    then the LLM shuts down, so whatever still runs ends "cancelled" with a reason."""
    import uvicorn

    app = build_app(llm, served_model_name, **app_kwargs)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        llm.shutdown()
