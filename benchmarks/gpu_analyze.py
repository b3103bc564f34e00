"""The one prepared GPU check: the 1.1B fixture on the GPU vs the CPU vs WeightWatcher's CUDA path.

    python benchmarks/gpu_analyze.py [--out DIR] [--fixtures DIR] [--ww-timeout 300] [--quick]

Run it whenever a GPU machine is lent (device tool: ``run``), e.g.
``python benchmarks/gpu_analyze.py --out $OUT``. It needs only torch (CUDA build), numpy, scipy,
pandas, safetensors, tqdm, threadpoolctl and powerlaw; transformers and weightwatcher are used
when installed and skipped with a note when not. Steps, each timed on its own:

1. writes the bf16 fixtures (TinyLlama-1.1B shapes, the Llama-3-8B slice) if absent (no download);
2. ``frogwatch.analyze(DIR, device="cuda")`` after a warm-up: wall time, peak CUDA memory;
3. ``frogwatch.analyze(DIR)`` on the CPU (all cores, LAPACK): wall time;
4. WeightWatcher 0.7.7 ``analyze()`` on the same weights as a float32 ``LlamaForCausalLM``: with
   CUDA present it computes singular values with torch on the GPU (its CUDA path), in a
   subprocess killed after ``--ww-timeout`` seconds;
5. max |delta alpha| GPU vs CPU and vs WeightWatcher over the matrices they share;
6. per-matrix GPU cost of the Llama-3-8B shapes and the extrapolated 8B total.

Writes ``gpu_analyze.json`` and ``gpu_analyze.md`` into ``--out`` (default ``$OUT`` or ``.``) and
prints the markdown. ``--quick`` uses a tiny 2-block fixture (a dry run of the script; it also
runs on a CPU-only machine, where "cuda" falls back to the CPU with a warning).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import llm_fixtures  # noqa: E402

import frogwatch  # noqa: E402

WW_CHILD = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + r"""
import json, logging, sys, time, warnings
import weightwatcher as ww
from llm_fixtures import float32_llama
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
m = float32_llama(sys.argv[1])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    df = ww.WeightWatcher(model=m).analyze()
    sec = time.perf_counter() - t
names = list(df["longname"]) if "longname" in df.columns else list(df["name"])
print(json.dumps({"seconds": sec, "names": names, "alpha": [float(a) for a in df["alpha"]],
                  "version": ww.__version__}))
"""


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def max_dalpha(a_names, a_alpha, b_names, b_alpha) -> tuple[float, int]:
    a = {n.removeprefix("model."): x for n, x in zip(a_names, a_alpha)}
    b = {n.removeprefix("model."): x for n, x in zip(b_names, b_alpha)}
    both = [n for n in a if n in b and np.isfinite(a[n]) and np.isfinite(b[n])]
    return (max(abs(a[n] - b[n]) for n in both) if both else float("nan")), len(both)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--fixtures", type=Path, default=Path(os.environ.get("FW_FIXTURES", "/tmp/frogwatch-fixtures")))
    ap.add_argument("--ww-timeout", type=float, default=300)
    ap.add_argument("--quick", action="store_true", help="a tiny 2-block fixture, no 8B slice: a dry run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    res: dict = {
        "machine": platform.node(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "load_before": os.getloadavg()[0],
    }  # fmt: skip
    name = "llama-tiny" if args.quick else "tinyllama"
    t, d = timed(lambda: llm_fixtures.write_fixture(name, args.fixtures))
    res["fixture"], res["fixture_seconds"] = name, t
    print(f"fixture {d} ready in {t:.0f} s", flush=True)

    # 2. GPU (warm-up on a small model first: CUDA context, cuSOLVER handles)
    frogwatch.analyze({"w.weight": torch.randn(300, 200)}, device="cuda", progress=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t, gdf = timed(lambda: frogwatch.analyze(d, device="cuda", progress=False))
    res["gpu_seconds"] = t
    res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(f"frogwatch cuda: {t:.1f} s, {len(gdf)} matrices", flush=True)

    # 3. CPU
    t, cdf = timed(lambda: frogwatch.analyze(d, progress=False))
    res["cpu_seconds"] = t
    res["dalpha_gpu_cpu"], _ = max_dalpha(gdf["name"], gdf["alpha"], cdf["name"], cdf["alpha"])
    print(f"frogwatch cpu: {t:.1f} s; max |dalpha| gpu vs cpu {res['dalpha_gpu_cpu']:.2e}", flush=True)

    # 4. WeightWatcher
    try:
        r = subprocess.run([sys.executable, "-c", WW_CHILD, str(d)], capture_output=True, text=True,
                           timeout=args.ww_timeout)  # fmt: skip
        if r.returncode == 0:
            w = json.loads(r.stdout.strip().splitlines()[-1])
            res["ww_seconds"], res["ww_version"] = w["seconds"], w["version"]
            res["dalpha_gpu_ww"], res["ww_matrices"] = max_dalpha(gdf["name"], gdf["alpha"], w["names"], w["alpha"])
            print(f"weightwatcher: {w['seconds']:.1f} s; max |dalpha| vs frogwatch gpu {res['dalpha_gpu_ww']:.2e}",
                  flush=True)  # fmt: skip
        else:
            res["ww_error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    except subprocess.TimeoutExpired:
        res["ww_error"] = f"did not finish within {args.ww_timeout:.0f} s"
    print(f"weightwatcher: {res.get('ww_error', 'ok')}", flush=True)

    # 6. Llama-3-8B shapes on the GPU
    if not args.quick:
        from llm_cost import LLAMA3_8B_COUNTS, time_matrix

        from frogwatch.sources import layer_matrices

        s = llm_fixtures.write_fixture("llama3-8b-slice", args.fixtures)
        per, total = {}, 0.0
        for lm in layer_matrices(s):
            key = lm.name.split(".")[-1]
            if key in per:
                continue
            t, _ = time_matrix(lm, "cuda", 2)
            per[key] = {"shape": list(lm.shape), "seconds": t, "count_8b": LLAMA3_8B_COUNTS.get(key, 0)}
            if key != "embed_tokens":
                total += t * LLAMA3_8B_COUNTS.get(key, 0)
        res["llama3_8b_per_matrix"], res["llama3_8b_extrapolated_min"] = per, total / 60
        print(f"Llama-3-8B extrapolated on the GPU: {total / 60:.1f} min", flush=True)
    res["load_after"] = os.getloadavg()[0]

    md = [f"GPU: {res['gpu']}, {res['cores']} cores, torch {res['torch']}, fixture {name}, "
          f"load {res['load_before']:.1f} -> {res['load_after']:.1f}", "",
          "| run | wall s | note |", "|---|---|---|",
          f"| frogwatch `device=\"cuda\"` | {res['gpu_seconds']:.1f} | peak CUDA memory "
          f"{res['gpu_peak_mb'] or 0:.0f} MB |",
          f"| frogwatch CPU (LAPACK, {res['cores']} cores) | {res['cpu_seconds']:.1f} | max abs dalpha vs GPU "
          f"{res['dalpha_gpu_cpu']:.1e} |"]  # fmt: skip
    if "ww_seconds" in res:
        md.append(f"| WeightWatcher {res['ww_version']} (CUDA path) | {res['ww_seconds']:.1f} | max abs dalpha vs "
                  f"frogwatch GPU {res['dalpha_gpu_ww']:.1e} over {res['ww_matrices']} matrices |")  # fmt: skip
    else:
        md.append(f"| WeightWatcher | - | {res.get('ww_error')} |")
    if "llama3_8b_per_matrix" in res:
        md += ["", "| Llama-3-8B matrix | shape | GPU s | count |", "|---|---|---|---|"]
        md += [f"| {k} | {v['shape'][0]} x {v['shape'][1]} | {v['seconds']:.3f} | {v['count_8b']} |"
               for k, v in res["llama3_8b_per_matrix"].items()]  # fmt: skip
        md.append(f"\nLlama-3-8B extrapolated on the GPU (224 block matrices): "
                  f"{res['llama3_8b_extrapolated_min']:.1f} min")  # fmt: skip
    text = "\n".join(md)
    (args.out / "gpu_analyze.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "gpu_analyze.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
