"""The installed package: the compiled library, the CLI, the layout."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

import livethinking
from livethinking import _extension


def test_compiled_library_is_loaded_and_matches_torch():
    assert _extension.compiled_library is not None, _extension.load_error
    assert _extension.compiled_library.torch_version == torch.__version__
    assert hasattr(torch.ops.livethinking, "moe_align")


def test_kernels_install_as_a_subpackage():
    import livethinking.kernels as kernels

    assert kernels.__name__ == "livethinking.kernels"
    spec = importlib.util.find_spec("kernels")  # Hugging Face's `kernels` owns that name
    assert spec is None or os.path.dirname(spec.origin or "") != os.path.dirname(kernels.__file__)


def test_info_reports_backends_as_json():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the command must set up its own interpreter probe
    result = subprocess.run([sys.executable, "-m", "livethinking", "info", "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions"]["livethinking"] == livethinking.__version__
    assert report["versions"]["torch"] == torch.__version__
    backends = {b["name"]: b for b in report["backends"]}
    assert set(backends) == {"cpu-c++", "cuda-ext", "triton-gpu", "triton-interpreter"}
    assert backends["cpu-c++"]["built"] and backends["cpu-c++"]["usable"]
    assert backends["triton-interpreter"]["usable"], backends["triton-interpreter"]["detail"]
    assert backends["cuda-ext"]["built"] == _extension.cuda_compiled()
    assert backends["cuda-ext"]["usable"] == (_extension.cuda_compiled() and torch.cuda.is_available())
    assert len(report["gpus"]) == torch.cuda.device_count()


def test_info_text_output():
    result = subprocess.run([sys.executable, "-m", "livethinking", "info", "--no-interpreter-probe"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cpu-c++" in result.stdout and "usable" in result.stdout
