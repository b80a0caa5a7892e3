"""Shared test setup.

TRITON_INTERPRET must be set before any module applies @triton.jit, so it is set
here, before the tests import anything of livethinking. Tests run with --import-mode=importlib: the repository root is never
put on sys.path, so they exercise the installed package.
"""

import os
import zlib

import torch

# Interpret Triton on CPU tensors where no GPU exists (torch itself applies no
# @triton.jit at import, so deciding after importing it is early enough).
HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if HAS_CUDA else "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# Fresh random inputs every run, reproducible: the run's seed is printed in the
# header; LIVETHINKING_TEST_SEED=<seed> replays it.
RUN_SEED = int(os.environ.get("LIVETHINKING_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):
    return f"livethinking test seed: LIVETHINKING_TEST_SEED={RUN_SEED}"


@pytest.fixture
def generator(request):
    """A generator seeded from the run seed and the test's id."""
    return torch.Generator().manual_seed((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)
