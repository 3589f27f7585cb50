"""Model tests run single-threaded: their tensors are tiny, and on a shared 2-core machine
intra-op threads only contend (measured: a tiny decode went from 7.8 s to 0.35 s)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
