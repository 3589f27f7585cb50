"""Shared test settings: deterministic torch, a CI-sized hypothesis profile."""

import os

import torch
from hypothesis import settings

settings.register_profile("looplm", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "looplm"))
torch.manual_seed(0)
