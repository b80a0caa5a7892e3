"""The OpenAI-compatible streaming HTTP server on top of the engine.

`AsyncEngine` runs an `LLMEngine` in one background thread and streams its outputs to
asyncio; `build_app` makes the FastAPI app (completions, chat completions, models,
health, Prometheus metrics). Needs the ``serve`` extras: fastapi, uvicorn, prometheus_client.
"""

from livethinking.server.app import APIError, build_app
from livethinking.server.engine_thread import AsyncEngine, EngineDeadError

__all__ = ["APIError", "AsyncEngine", "EngineDeadError", "build_app"]
