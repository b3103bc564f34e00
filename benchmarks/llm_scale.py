"""FROG at LLM scale on one checkpoint directory, in one command: engine vs PEFT LoRA, merge, select.

On a sharded bf16 checkpoint (default ``benchmarks/fixtures/tinyllama``: TinyLlama-1.1B's shapes,
random init, written by ``benchmarks/llm_fixtures.py --which tinyllama``), every job in its own
fresh process, one after the other:

* ``engine``  ``benchmarks/engine_llm.py --fixture DIR``: PEFT LoRA rank r against FROG with the
  same trainable count (float32 master deltas), prepare memory, step CPU time and step peak RSS;
  the FROG run writes its trained delta file;
* ``merge``   ``frogwatch merge DIR DELTA OUT`` (streaming, one shard in memory at a time);
* ``select``  per-matrix ``frogwatch select DIR`` (1 %) with ``--score balanced`` and
  ``--score random``, against ``frogwatch analyze DIR`` on the same checkpoint.

Each CLI job is measured from outside: wall time, process CPU time (user + system, its children
included) and peak RSS from ``os.wait4``; the load average is recorded around every job (CPU time
is the robust measure on a shared machine, wall time is not). Prints Markdown tables.

Run: ``MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/llm_scale.py`` (the mmap threshold makes
glibc hand freed large blocks back at once, for every method alike; see BENCHMARKS.md section 7).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall and CPU seconds, peak RSS (MiB), load average before/after, stdout."""
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(p.pid, 0)  # reaps the child with its own rusage
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024,
            "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}", "stdout": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", default=str(HERE / "fixtures" / "tinyllama"))
    ap.add_argument("--parts", default="engine,merge,select", help="comma list: engine,merge,select")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget", default="1%", help="select budget (per matrix)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    import peft
    import torch
    import transformers

    import frogwatch
    from frogwatch.frog.select import select

    import torch.nn as nn

    default_score = select(nn.Linear(8, 8), budget=0.25, progress=False).meta["score"]  # per matrix
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}, frogwatch "
          f"{getattr(frogwatch, '__version__', '?')}; checkpoint {a.fixture}; "
          f"select()'s per-matrix default score: {default_score!r}\n")
    py = [sys.executable]
    cli = py + ["-m", "frogwatch.cli"]
    work = Path(tempfile.mkdtemp(prefix="llm_scale_"))
    delta = work / "delta.safetensors"
    try:
        if "engine" in parts:
            cmd = py + [str(HERE / "engine_llm.py"), "--fixture", a.fixture, "--methods", "lora,frog",
                        "--rank", str(a.rank), "--seq", str(a.seq), "--steps", str(a.steps),
                        "--save-delta", str(delta)]
            r = measure(cmd)
            print(f"engine (load {r['load']}):\n\n{r['stdout']}", flush=True)
        jobs = []
        if "merge" in parts:
            if not delta.exists():
                sys.exit("merge needs the engine part (it trains the delta that is merged)")
            jobs.append(("merge (streaming)", cli + ["merge", "--quiet", a.fixture, str(delta),
                                                    str(work / "merged")]))
        if "select" in parts:
            for score in ("balanced", "random"):
                jobs.append((f"select per-matrix {a.budget}, score={score}",
                             cli + ["select", a.fixture, "--budget", a.budget, "--score", score,
                                    "--no-progress", "--out", str(work / f"{score}.safetensors")]))
            jobs.append(("analyze", cli + ["analyze", a.fixture, "--quiet", "--out", str(work / "analyze")]))
        if jobs:
            print("| job | wall (s) | CPU (s) | peak RSS (MiB) | load average (before-after) |")
            print("|---|---:|---:|---:|---|")
        for name, cmd in jobs:
            r = measure(cmd)
            print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['load']} |",
                  flush=True)
            shutil.rmtree(work / "merged", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
