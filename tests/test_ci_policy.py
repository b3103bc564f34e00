"""CI cannot pass with a reference test skipped: the strict-skip hook (tests/conftest.py) and
``.ci/run``, which installs Chromium or fails, then calls README's test command ``make test``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFTEST = (ROOT / "tests" / "conftest.py").read_text()

SUITE = """
import pytest

def test_plain():
    pass

def test_reference_missing():
    pytest.importorskip("a_reference_package_that_is_not_installed")

@pytest.mark.skipif(True, reason="chromium missing")
def test_marked_skip():
    pass

@pytest.mark.cuda
def test_gpu():
    pytest.skip("no CUDA")
"""


def _run(pytester, monkeypatch, env: dict):
    for k in ("CI", "FROGWATCH_STRICT_SKIPS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


@pytest.mark.parametrize("env", [{"CI": "true"}, {"FROGWATCH_STRICT_SKIPS": "1"}])
def test_strict_mode_turns_every_non_cuda_skip_into_a_failure(pytester, monkeypatch, env):
    result = _run(pytester, monkeypatch, env)
    out = result.parseoutcomes()
    assert result.ret != 0
    # a skip at setup (skipif) is reported as an error, one in the call as a failure
    assert out.get("failed", 0) + out.get("errors", out.get("error", 0)) == 2, out
    assert out.get("passed") == 1 and out.get("skipped") == 1, out  # only the CUDA test skips
    result.stdout.fnmatch_lines(["*skipped test while strict skips are on*"])


def test_module_level_importorskip_fails_in_strict_mode(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_ref="""
import pytest
ww = pytest.importorskip("a_reference_package_that_is_not_installed")
def test_agrees():
    pass
""")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped module while strict skips are on*"])


def test_outside_ci_skips_stay_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, {})
    result.assert_outcomes(passed=1, skipped=3)


def test_reference_packages_of_the_ci_run_are_installed():
    """What the strict run needs is importable here (the test extra): a missing one would fail CI."""
    import importlib.util

    for mod in ("weightwatcher", "powerlaw", "peft", "transformers", "accelerate", "hypothesis"):
        assert importlib.util.find_spec(mod) is not None, mod


# ---- .ci/run -------------------------------------------------------------------------------


def _fake_bin(tmp_path: Path, tools: dict[str, str]) -> Path:
    """A PATH with only ``dirname`` (real) and the given fake tools (shell bodies)."""
    b = tmp_path / "bin"
    b.mkdir()
    os.symlink(shutil.which("dirname"), b / "dirname")
    for name, body in tools.items():
        p = b / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(0o755)
    return b


def _ci_run(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(ROOT / ".ci" / "run")], env={"PATH": str(path)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("apt", ["exit 1", "exit 0"])  # apt fails; apt "succeeds" but no chromium
def test_ci_run_fails_when_chromium_cannot_be_installed(tmp_path, apt):
    marker = tmp_path / "make-called"
    b = _fake_bin(tmp_path, {"apt-get": apt, "make": f"touch {marker}"})
    r = _ci_run(b)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "chromium" in r.stderr
    assert not marker.exists()  # the tests never ran with the report test skipped


def test_ci_run_fails_without_apt_get(tmp_path):
    marker = tmp_path / "make-called"
    r = _ci_run(_fake_bin(tmp_path, {"make": f"touch {marker}"}))
    assert r.returncode != 0 and not marker.exists()


def test_ci_run_installs_chromium_then_calls_make_test_in_ci_mode(tmp_path):
    log = tmp_path / "log"
    b = tmp_path / "bin"
    tools = {
        # apt-get "installs" chromium into the fake PATH
        "apt-get": f'[ "$1" = install ] && printf "#!/bin/bash\\n" > {b}/chromium && chmod +x {b}/chromium; exit 0',
        "make": f'echo "make $* CI=$CI" >> {log}',
    }
    r = _ci_run(_fake_bin(tmp_path, tools))
    assert r.returncode == 0, r.stderr
    assert log.read_text().strip() == "make test CI=true"
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme  # README's test command is what CI runs
