"""Tiny random models of every supported model_type, built in-process from configs (never downloaded)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The token cache of the tests' runs (CLI subprocesses included) is their own, never the user's.
os.environ["LING_SURGERY_CACHE"] = tempfile.mkdtemp(prefix="ling-surgery-test-cache-")
atexit.register(shutil.rmtree, os.environ["LING_SURGERY_CACHE"], True)

import pytest
import torch
from helpers import MODEL_TYPES

@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture
def token_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (2, 32), generator=g) for _ in range(4)]
