"""Shared test settings: one torch thread per test, deterministic seeds, a CI-sized hypothesis profile.

Test tensors are tiny; intra-op threads only contend on a small machine (measured here: a tiny
decode took 7.8 s with 2 threads on a loaded 2-core machine and 0.35 s with one). The suite
gets its parallelism from pytest-xdist workers instead.
"""

import os

import pytest
import torch
from hypothesis import settings

from tests.threads import torch_threads

settings.register_profile("looplm", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "looplm"))
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield
