"""What this installation can run: versions, backends built and usable, GPUs.

Each backend is *built* when its code is present and *usable* when a tiny op ran on
it here and matched the plain-PyTorch reference.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

from livethinking import __version__, _extension

__all__ = ["Backend", "Report", "collect_report", "format_report"]


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    built: bool
    usable: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    versions: dict[str, str]
    backends: list[Backend]
    gpus: list[str] = field(default_factory=list)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    def as_dict(self) -> dict:
        return asdict(self)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _routing_op_matches(device: torch.device) -> tuple[bool, str]:
    """Run moe_topk_softmax on ``device`` and compare with the reference."""
    from livethinking.ops import moe_topk_softmax
    from livethinking.ops.reference import moe_topk_softmax_reference

    try:
        logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)).to(device)
        weights, ids = moe_topk_softmax(logits, 4)
        ref_weights, ref_ids = moe_topk_softmax_reference(logits.cpu(), 4)
        ok = torch.equal(ids.cpu(), ref_ids) and torch.allclose(weights.cpu(), ref_weights,
                                                                 rtol=1e-5, atol=1e-7)
        return ok, "ran moe_topk_softmax" + ("" if ok else ": MISMATCH with the reference")
    except Exception as error:  # a report must say what failed, not stop
        return False, f"moe_topk_softmax failed: {type(error).__name__}: {error}"


def _cpu_backend() -> Backend:
    if _extension.compiled_library is None:
        return Backend("cpu-c++", False, False, f"livethinking._C not loaded: {_extension.load_error}")
    usable, detail = _routing_op_matches(torch.device("cpu"))
    built_for = _extension.compiled_library.torch_version
    if built_for != torch.__version__:
        detail += f"; built against torch {built_for}, running torch {torch.__version__}"
    return Backend("cpu-c++", True, usable, detail)


def _cuda_backend() -> Backend:
    if not _extension.cuda_compiled():
        why = "livethinking._C not loaded" if _extension.compiled_library is None else \
            "compiled without CUDA (no nvcc or CPU-only torch at build time, or LIVETHINKING_SKIP_CUDA)"
        return Backend("cuda-ext", False, False, why)
    archs = _extension.compiled_library.cuda_archs
    if not torch.cuda.is_available():
        return Backend("cuda-ext", True, False, f"compiled for {archs}; no CUDA device here")
    usable, detail = _routing_op_matches(torch.device("cuda"))
    return Backend("cuda-ext", True, usable, f"compiled for {archs}; {detail}")


def _triton_gpu_backend() -> Backend:
    try:
        import triton
    except ImportError as error:
        return Backend("triton-gpu", False, False, f"triton not importable: {error}")
    if not torch.cuda.is_available():
        return Backend("triton-gpu", True, False, f"triton {triton.__version__}; no CUDA device here")
    major, minor = torch.cuda.get_device_capability()
    ok = major >= 8
    return Backend("triton-gpu", True, ok, f"triton {triton.__version__}; compute capability "
                   f"{major}.{minor}" + ("" if ok else " (kernels need >= 8.0)"))


def _triton_interpreter_backend(timeout_s: float = 120.0) -> Backend:
    """Run a tiny kernel under TRITON_INTERPRET=1 in a child process (the flag is read at import)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return Backend("triton-interpreter", False, False, f"triton not importable: {error}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        probe = subprocess.run([sys.executable, "-m", "livethinking._triton_probe"], env=env,
                               capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Backend("triton-interpreter", True, False, f"probe timed out after {timeout_s:.0f} s")
    if probe.returncode == 0:
        return Backend("triton-interpreter", True, True, probe.stdout.strip())
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return Backend("triton-interpreter", True, False, f"probe failed: {last}")


def collect_report(probe_interpreter: bool = True) -> Report:
    """Versions, the four backends and the GPUs of this machine."""
    versions = {
        "livethinking": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "transformers": _package_version("transformers"),
    }
    backends = [_cpu_backend(), _cuda_backend(), _triton_gpu_backend()]
    if probe_interpreter:
        backends.append(_triton_interpreter_backend())
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                        f"{props.total_memory / 2**30:.0f} GiB)")
    return Report(versions=versions, backends=backends, gpus=gpus)


def format_report(report: Report) -> str:
    """The report as aligned text."""
    lines = ["livethinking " + report.versions["livethinking"], "", "versions:"]
    width = max(len(k) for k in report.versions)
    lines += [f"  {k:<{width}}  {v}" for k, v in report.versions.items() if k != "livethinking"]
    lines += ["", "backends:"]
    for b in report.backends:
        state = "usable" if b.usable else ("built, not usable here" if b.built else "not built")
        lines.append(f"  {b.name:<19} {state:<23} {b.detail}")
    lines += ["", "gpus:"] + ([f"  {g}" for g in report.gpus] or ["  none"])
    return "\n".join(lines)
