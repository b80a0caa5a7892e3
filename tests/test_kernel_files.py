"""Every kernels/<op>.py stands alone: it imports only torch, triton and the standard
library, and loads from its path under any module name (so it can be vendored)."""

import ast
import importlib.util
import pathlib
import sys
import uuid

import pytest

import livethinking.kernels

KERNEL_FILES = sorted(p for p in pathlib.Path(livethinking.kernels.__path__[0]).glob("*.py")
                      if p.name != "__init__.py")


def test_there_are_kernel_files():
    assert {p.stem for p in KERNEL_FILES} >= {"fused_moe", "grouped_gemm", "fused_linear_logprobs"}


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.stem)
def test_imports_only_torch_triton_and_stdlib(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            roots.add(node.module.split(".")[0])
    assert roots - {"torch", "triton"} <= set(sys.stdlib_module_names), roots


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.stem)
def test_loads_under_any_name_and_lists_its_public_names(path):
    name = f"vendored_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the like look their module up by name
    try:
        spec.loader.exec_module(module)
        assert module.__doc__ and module.__all__
        assert set(module.__all__) <= set(vars(module))
    finally:
        del sys.modules[name]
