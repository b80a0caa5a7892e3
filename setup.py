"""Build of livethinking._C: C++ CPU ops always, CUDA ops when nvcc and a CUDA torch exist.

Metadata lives in pyproject.toml; this file only describes the extension.
Install with ``pip install --no-build-isolation -e .`` (torch must already be installed).

Environment switches:
  LIVETHINKING_SKIP_CUDA=1        build the CPU ops only, even where nvcc exists.
  LIVETHINKING_REQUIRE_CUDA=1     fail instead of warning when the CUDA ops cannot be built.
  LIVETHINKING_CUDA_ARCHS="8.0;9.0a"  target architectures (never read from a GPU).
  MAX_JOBS=N                      parallel compile jobs (default: by cores and free memory).
  CUDA_HOME=/path                 the CUDA toolkit root (default: asked of nvcc itself).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def toolkit_root_from_nvcc() -> str | None:
    """The real toolkit root, asked of nvcc (works when nvcc on PATH is a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the root nvcc reports, else /usr/local/cuda if it holds nvcc."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      toolkit_root_from_nvcc(), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def default_max_jobs() -> int:
    """One job per core, at most one per 3 GiB of available memory (nvcc on ATen is hungry)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            available_kb = int(next(line.split()[1] for line in f if line.startswith("MemAvailable")))
        return max(1, min(cores, available_kb // (3 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        return max(1, cores)


# torch.utils.cpp_extension reads CUDA_HOME once, at import: settle it first.
CUDA_HOME = None if env_flag("LIVETHINKING_SKIP_CUDA") else find_cuda_home()
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME
CUDA_ARCHS = os.environ.get("LIVETHINKING_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS  # never let torch ask a GPU
os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_build_reason() -> str | None:
    """None when the CUDA ops can be built, else why not."""
    if env_flag("LIVETHINKING_SKIP_CUDA"):
        return "LIVETHINKING_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def wheel_cuda_includes() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include and a minimal toolkit lacks.

    torch's own nvidia-* wheels ship them under site-packages/nvidia/*/include.
    """
    found = []
    for entry in sys.path:
        for include in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))):
            if os.path.isdir(include) and include not in found:
                found.append(include)
    return found


def extension():
    csrc = os.path.join("csrc")
    sources = [
        os.path.join(csrc, "cpu", "moe_routing_cpu.cpp"),
        os.path.join(csrc, "cpu", "paged_attention_cpu.cpp"),
        os.path.join(csrc, "cpu", "rms_norm_cpu.cpp"),
        os.path.join(csrc, "cpu", "skinny_gemm_cpu.cpp"),
        os.path.join(csrc, "torch", "torch_bindings.cpp"),
        os.path.join(csrc, "torch", "python_module.cpp"),
    ]
    include_dirs = [os.path.join(ROOT, csrc, "include"), os.path.join(ROOT, csrc, "cpu")]
    define = [f'-DLIVETHINKING_TORCH_VERSION="{torch.__version__}"']
    # torch picks the C++ standard its headers need. No contraction of a*b+c into FMA:
    # the CPU sums round exactly like the CUDA kernels' explicit multiply-then-add.
    # -fno-trapping-math: no FP traps are enabled, so branch-free selects (the decode
    # attention's exp) vectorise; values are unchanged. -fopenmp: torch's at::parallel_for is an OpenMP pragma in a header, so without
    # it the CPU ops silently run on one thread.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"] + define
    reason = cuda_build_reason()
    if reason is not None:
        message = f"livethinking: building the CPU ops only: {reason}."
        if env_flag("LIVETHINKING_REQUIRE_CUDA"):
            raise RuntimeError(message + " LIVETHINKING_REQUIRE_CUDA=1 forbids that.")
        warnings.warn(message, stacklevel=1)
        return CppExtension("livethinking._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    sources += [
        os.path.join(csrc, "cuda", "moe_routing_cuda.cu"),
        os.path.join(csrc, "torch", "torch_bindings_cuda.cpp"),
    ]
    cuda_define = ["-DLIVETHINKING_WITH_CUDA", f'-DLIVETHINKING_CUDA_ARCHS="{CUDA_ARCHS}"']
    nvcc_flags = ["-O3", "-DLIVETHINKING_WITH_CUDA",
                  # torch adds these -D flags to every .cu; our kernels use the CUDA
                  # half/bfloat16 operators, exactly as the CMake build compiles them.
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    return CUDAExtension("livethinking._C", sources,
                         include_dirs=include_dirs + wheel_cuda_includes(),
                         extra_compile_args={"cxx": cxx_flags + cuda_define, "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
