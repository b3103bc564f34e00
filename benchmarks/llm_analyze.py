"""frogwatch vs WeightWatcher 0.7.7 at LLM scale, same run: wall time, peak RSS, max |delta alpha|.

    python benchmarks/llm_fixtures.py --which tinyllama-4 tinyllama     # once
    python benchmarks/llm_analyze.py --model tinyllama-4 [--model gpt2 tinyllama] [--no-ww]

Each measurement runs in a fresh process that samples its own RSS every 5 ms (psutil) and reports
the peak above its post-import baseline:

- ``frogwatch``: ``frogwatch.analyze(DIR)`` on the bf16 sharded checkpoint (for GPT-2 small:
  on the random-init ``GPT2Model`` in memory, fp32), the whole call including every read;
- ``weightwatcher``: ``ww.WeightWatcher(model).analyze()`` on the model built from the same
  weights with ``transformers`` and cast to float32 (WeightWatcher 0.7.7 does not take bf16), timed
  around ``analyze()`` only; its RSS includes the loaded model, reported separately;
- ``floor``: the previous floor over the same matrices, float64 Gram + ``numpy.linalg.eigvalsh``,
  one matrix per core (frogwatch 0.1's own layout), reading each tensor once.

Prints a markdown table with the machine's load average (``os.getloadavg``) before and after:
on a shared machine the ratios are only as good as that load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

CHILD = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + r"""
import json, os, sys, threading, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np, psutil, torch
proc = psutil.Process()
peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
def cpu():
    t = proc.cpu_times()
    return t.user + t.system
mode, model, path = sys.argv[1], sys.argv[2], sys.argv[3]

def build(path, model):
    import transformers
    if model == "gpt2":
        torch.manual_seed(0)
        return transformers.GPT2Model(transformers.GPT2Config()).eval()
    from llm_fixtures import float32_llama
    return float32_llama(path)

out = {}
if mode == "frogwatch":
    import frogwatch
    target = build(path, model) if model == "gpt2" else path
    time.sleep(0.05); base = peak[0]
    t, c = time.perf_counter(), cpu()
    df = frogwatch.analyze(target, progress=False)
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, cpu() - c
    out["names"] = list(df["name"]); out["alpha"] = [float(a) for a in df["alpha"]]
elif mode == "weightwatcher":
    import logging, warnings, weightwatcher as ww
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    time.sleep(0.05); base = peak[0]
    t = time.perf_counter()
    m = build(path, model)
    out["load_seconds"] = time.perf_counter() - t
    time.sleep(0.05); out["model_mb"] = peak[0] - base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, c = time.perf_counter(), cpu()
        df = ww.WeightWatcher(model=m).analyze()
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, cpu() - c
    names = {id(mod): n for n, mod in m.named_modules()}
    out["names"] = list(df["longname"]) if "longname" in df.columns else list(df["name"])
    out["alpha"] = [float(a) for a in df["alpha"]]
else:  # floor
    from concurrent.futures import ThreadPoolExecutor
    from threadpoolctl import threadpool_limits
    import frogwatch
    from frogwatch.sources import layer_matrices
    target = build(path, model) if model == "gpt2" else path
    d = frogwatch.describe(target)
    keep = set(d.loc[d["analyzed"], "name"])
    lms = [lm for lm in layer_matrices(target) if lm.name in keep]
    lms.sort(key=lambda lm: -lm.M * lm.M * lm.N)
    time.sleep(0.05); base = peak[0]
    def one(lm):
        A = lm.load().double().numpy()
        A = A if A.shape[0] >= A.shape[1] else A.T
        return np.linalg.eigvalsh(A.T @ A)
    t, c = time.perf_counter(), cpu()
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(one, lms))
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, cpu() - c
time.sleep(0.05)
out["peak_mb"] = peak[0] - base
print(json.dumps(out))
"""


def run(mode: str, model: str, path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", CHILD, mode, model, path], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{mode} on {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def short(name: str) -> str:
    return name.removeprefix("model.")


def compare(fw: dict, ww: dict) -> tuple[float, int]:
    """max |delta alpha| over the matrices both analysed (matched by qualified name), and how many."""
    a = {short(n): x for n, x in zip(fw["names"], fw["alpha"])}
    b = {short(n): x for n, x in zip(ww["names"], ww["alpha"])}
    both = [n for n in a if n in b]
    if not both:  # WeightWatcher without long names: same order of modules
        return float("nan"), 0
    return max(abs(a[n] - b[n]) for n in both), len(both)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["tinyllama-4"], choices=["tinyllama-4", "tinyllama", "gpt2"])
    ap.add_argument("--no-ww", action="store_true", help="frogwatch and the floor only")
    args = ap.parse_args()
    import numpy
    import torch

    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {numpy.__version__}")  # fmt: skip
    print("\n| model | tool | wall s | CPU s (user+sys) | peak RSS MB above baseline | matrices | load avg before / after |")
    print("|---|---|---|---|---|---|---|")
    for model in args.model:
        path = "-" if model == "gpt2" else str(FIXTURES / model)
        if model != "gpt2" and not (FIXTURES / model / "model.safetensors.index.json").is_file():
            raise SystemExit(f"{path}: run benchmarks/llm_fixtures.py --which {model} first")
        res = {}
        for mode in ("frogwatch", "floor") + (() if args.no_ww else ("weightwatcher",)):
            before = os.getloadavg()[0]
            res[mode] = run(mode, model, path)
            after = os.getloadavg()[0]
            r = res[mode]
            extra = f" (model {r['model_mb']:.0f} MB, load {r['load_seconds']:.1f} s)" if "model_mb" in r else ""
            n = len(r.get("names", [])) or "-"
            print(f"| {model} | {mode} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mb']:.0f}{extra} | {n} | "
                  f"{before:.1f} / {after:.1f} |", flush=True)  # fmt: skip
        fw = res["frogwatch"]
        fl = res["floor"]
        line = (f"\n{model}: frogwatch / previous floor (fp64 Gram + eigvalsh per core) = "
                f"{fw['seconds'] / fl['seconds']:.2f} wall, {fw['cpu_seconds'] / fl['cpu_seconds']:.2f} CPU")
        if "weightwatcher" in res:
            d, n = compare(fw, res["weightwatcher"])
            w = res["weightwatcher"]
            line += (f"; speed-up over WeightWatcher = {w['seconds'] / fw['seconds']:.2f}x wall, "
                     f"{w['cpu_seconds'] / fw['cpu_seconds']:.2f}x CPU; "
                     f"max |delta alpha| = {d:.2e} over {n} matrices")  # fmt: skip
        print(line, flush=True)


if __name__ == "__main__":
    main()
