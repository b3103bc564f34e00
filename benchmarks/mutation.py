"""Mutation testing of the core modules with mutmut, each against its own test files.

For every module below, a scratch copy of the repository is made, mutmut (``pip install
'frogwatch[dev]'``) mutates only that module and runs only that module's tests against each
mutant. A mutant is *killed* when a test fails. The kill rate is ``killed / (killed + survived)``;
mutants that no test reaches count as survived.

    python benchmarks/mutation.py                      # all modules, table on stdout
    python benchmarks/mutation.py frogwatch/metrics.py # one module
    python benchmarks/mutation.py --show-survivors     # also print each surviving mutant's diff
    python benchmarks/mutation.py MODULE --mutants KEY ... # re-run only these mutants (e.g. survivors)

Equivalent mutants (a change no test can observe, e.g. ``dtype=None`` where the default is the
same dtype) are listed with the reason in ``benchmarks/mutation_equivalents.txt``; the table gives
the raw kill rate and the rate with those listed survivors left out. A mutant whose test run hangs
or exceeds mutmut's CPU limit counts as killed (column ``timeout``), as mutmut counts it: mutmut
sends a mutant's test process SIGXCPU after ``timeout_multiplier x (estimated test time + 1 s)``
of wall-clock time, scores it "timeout" and counts timeouts with the killed mutants in its own
score. ``--timeout-multiplier`` sets that factor (mutmut's default is 15; a mutant that deadlocks,
e.g. in a progress bar's lock after the fork, then blocks for 15x the test time).

Results and the command line that produced them are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the test files that guard it
MODULES: dict[str, list[str]] = {
    "frogwatch/powerlaw_fit.py": ["tests/test_powerlaw_fit.py", "tests/test_powerlaw_fit_ties.py",
                                  "tests/test_numerics_reference.py"],
    "frogwatch/metrics.py": ["tests/test_numerics_reference.py"],
    "frogwatch/frog/budget.py": ["tests/test_frog_budget.py"],
    "frogwatch/frog/scores.py": ["tests/test_frog_scores.py"],
    "frogwatch/spectra.py": ["tests/test_spectra.py", "tests/test_numerics_reference.py"],
    "frogwatch/frog/select.py": ["tests/test_frog_select.py"],
    "frogwatch/frog/masks.py": ["tests/test_frog_masks.py"],
    # the engine (frogwatch/frog/engine.py only re-exports these three)
    "frogwatch/frog/ops.py": ["tests/test_frog_ops.py", "tests/test_engine.py", "tests/test_engine_w0cache.py",
                              "tests/test_engine_hold.py"],
    "frogwatch/frog/patch.py": ["tests/test_engine_w0cache.py", "tests/test_engine_hold.py", "tests/test_engine.py",
                                "tests/test_frog_ops.py"],
    "frogwatch/frog/layer.py": ["tests/test_frog_layer.py", "tests/test_engine.py", "tests/test_engine_w0cache.py",
                                "tests/test_engine_hold.py"],
    "frogwatch/frog/model.py": ["tests/test_frog_model.py", "tests/test_engine.py", "tests/test_engine_merge.py"],
}


EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")


def equivalents() -> dict[str, str]:
    """Mutant key -> why it is equivalent, from ``mutation_equivalents.txt`` (``key  reason`` lines)."""
    out = {}
    if EQUIVALENTS.exists():
        for line in EQUIVALENTS.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, why = line.strip().partition(" ")
                out[key] = why.strip()
    return out


def run_module(module: str, tests: list[str], show: bool, jobs: int, only: list[str] | None = None,
               timeout_multiplier: float = 15.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="frogwatch-mutation-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "frogwatch", work / "frogwatch",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        # mutmut forks every mutant's test process from one that has run the tests before; tqdm's
        # monitor thread, started there by a progress bar, may hold tqdm's lock at the fork, and the
        # child then deadlocks at its first bar (a "hang" that is no property of the mutant). No
        # monitor thread, same bars:
        (work / "_mutation_no_tqdm_monitor.py").write_text("import tqdm\n\ntqdm.tqdm.monitor_interval = 0\n")
        cfg = (ROOT / "pyproject.toml").read_text()
        cfg += (
            "\n[tool.mutmut]\n"
            f"source_paths = [{json.dumps(module)}]\n"
            'also_copy = ["frogwatch", "_mutation_no_tqdm_monitor.py"]\n'
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "_mutation_no_tqdm_monitor", "-x", "-q"]\n'
            f"timeout_multiplier = {float(timeout_multiplier)}\n"
            # a fresh fork server forks each mutant's tests: the default ("fork") forks them from
            # the process that ran the tests before, with torch and mutmut's threads in it, and
            # its children began to deadlock part-way through frog/select.py's run
            'process_isolation = "forkserver"\n'
        )
        (work / "pyproject.toml").write_text(cfg)
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        t0, load0 = time.time(), os.getloadavg()[0]
        r = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *(only or [])],
                           cwd=work, env=env, capture_output=True, text=True,
                           # no terminal: a mutant that touches it cannot be stopped by SIGTTOU/SIGTTIN
                           stdin=subprocess.DEVNULL, start_new_session=True)
        secs, load1 = time.time() - t0, os.getloadavg()[0]
        meta_path = work / "mutants" / (module + ".meta")
        if not meta_path.exists():
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            raise SystemExit(f"mutmut produced no results for {module}")
        codes = json.loads(meta_path.read_text())["exit_code_by_key"]
        if only:
            codes = {k: c for k, c in codes.items() if k in only}
        if all(c is None for c in codes.values()):
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            raise SystemExit(f"mutmut checked none of the mutants of {module}")
        count = collections.Counter(codes.values())
        killed = sum(n for c, n in count.items() if c not in (0, None, 33, 34))
        timeout = sum(n for c, n in count.items() if c is not None and c < 0)  # CPU limit, hang
        survivors = sorted(k for k, c in codes.items() if c in (0, 33))  # 33: no test reached it
        survived = len(survivors)
        eq = [k for k in survivors if k in equivalents()]
        if show:
            for key in survivors:
                d = subprocess.run([sys.executable, "-m", "mutmut", "show", key], cwd=work,
                                   env=env, capture_output=True, text=True).stdout
                tag = " (equivalent: " + equivalents()[key] + ")" if key in eq else ""
                print(f"--- survived: {key}{tag}\n{d}")
        return {"module": module, "mutants": len(codes), "killed": killed, "timeout": timeout,
                "survived": survived, "equivalent": len(eq), "other": len(codes) - killed - survived,
                "kill_rate": killed / max(1, killed + survived),
                "kill_rate_eq": killed / max(1, killed + survived - len(eq)), "seconds": round(secs),
                "load": f"{load0:.0f}-{load1:.0f}", "tests": ", ".join(tests)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=list(MODULES))
    ap.add_argument("--show-survivors", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mutants", nargs="+", metavar="KEY", help="run only these mutants (one module)")
    ap.add_argument("--timeout-multiplier", type=float, default=15.0,
                    help="mutmut's timeout_multiplier: a mutant's tests get this many times their "
                         "estimated time (+1 s) before mutmut stops them and scores a timeout (default 15)")
    args = ap.parse_args()
    rows = []
    for m in args.modules:
        rows.append(run_module(m, MODULES[m], args.show_survivors, args.jobs, args.mutants,
                               args.timeout_multiplier))
        r = rows[-1]
        print(f"{m}: {r['killed']}/{r['killed'] + r['survived']} killed "
              f"({100 * r['kill_rate']:.1f} %; {100 * r['kill_rate_eq']:.1f} % without "
              f"{r['equivalent']} listed equivalents)", flush=True)
    print("| module | tests | mutants | killed (timeout) | survived (equivalent) | raw kill rate | "
          "kill rate excl. equivalents | time | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['module']} | {r['tests']} | {r['mutants']} | {r['killed']} ({r['timeout']}) | "
              f"{r['survived']} ({r['equivalent']}) | {100 * r['kill_rate']:.1f} % | "
              f"{100 * r['kill_rate_eq']:.1f} % | {r['seconds']} s | {r['load']} |")
    k = sum(r["killed"] for r in rows)
    s = sum(r["survived"] for r in rows)
    e = sum(r["equivalent"] for r in rows)
    print(f"\nall: {k} killed, {s} survived ({e} listed equivalent), kill rate {100 * k / max(1, k + s):.1f} %, "
          f"{100 * k / max(1, k + s - e):.1f} % without the equivalents")


if __name__ == "__main__":
    main()
