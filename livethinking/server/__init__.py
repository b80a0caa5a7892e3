"""The OpenAI-compatible streaming HTTP server on top of the engine.

`AsyncEngine` runs an `LLMEngine` in one background thread and streams its outputs to
asyncio; `build_app` makes the FastAPI app (completions, chat completions, models,
health, Prometheus metrics). Needs the ``serve`` extras: fastapi, uvicorn, prometheus_client.
"""

from livethinking.server.app import (DEFAULT_MAX_REQUEST_BYTES, APIError, build_app,
                                     default_served_model_name)
from livethinking.server.engine_thread import AsyncEngine, EngineDeadError, EngineStepError

__all__ = ["APIError", "AsyncEngine", "DEFAULT_MAX_REQUEST_BYTES", "EngineDeadError",
           "EngineStepError", "build_app", "default_served_model_name"]
