"""Loads ``livethinking._C`` (the compiled ops) and says what it holds.

torch must be imported first: the library links against torch's shared libraries
without an rpath to them. Importing ``_C`` registers the ``torch.ops.livethinking``
ops for every backend it was built with.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["compiled_library", "load_error", "require_compiled", "cuda_compiled"]


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("livethinking._C"), None
    except ImportError as error:  # not built, or built against another torch
        return None, f"{type(error).__name__}: {error}"


compiled_library, load_error = _load()


def cuda_compiled() -> bool:
    """True when the CUDA implementations of the ops were compiled into ``_C``."""
    return bool(compiled_library is not None and compiled_library.cuda_compiled)


def require_compiled(device: torch.device) -> None:
    """Raise a clear error when the compiled ops for ``device`` are missing."""
    if compiled_library is None:
        raise RuntimeError(
            "livethinking._C could not be loaded, so the C++ ops are unavailable "
            f"({load_error}). Build it with `pip install --no-build-isolation -e .` "
            f"against the installed torch {torch.__version__}.")
    if device.type == "cuda" and not compiled_library.cuda_compiled:
        raise RuntimeError(
            "livethinking._C was built without its CUDA ops (no nvcc or a CPU-only torch at build "
            "time, or LIVETHINKING_SKIP_CUDA=1); rebuild where nvcc exists to run them on "
            f"{device}.")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"livethinking ops run on cpu or cuda tensors, not on {device}")
