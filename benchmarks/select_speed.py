"""Time and peak memory of ``frogwatch.select`` on GPT-2 small; exact vs randomized relevance S.

    python benchmarks/select_speed.py [--repeats 3] [--skip-gpt2]

1. Writes a randomly initialised GPT-2 small (``transformers.GPT2LMHeadModel(GPT2Config())``, no
   download) to a temporary directory as safetensors. In fresh subprocesses it times ``select`` at a
   1 % budget (48 targeted Conv1D matrices, 85 M weights) — in memory and streamed from the file,
   per-matrix and global, exact and randomized S — and samples the resident memory every 2 ms to
   report the peak above the RSS just before ``select`` (so a loaded model and the LAPACK code,
   loaded by a warm-up call, are not counted). For scale: the largest targeted matrix is 18 MiB in
   float64, the 85 M targeted weights are 324 MiB in float32.
2. Times S alone on GPT-2's four matrix shapes: the SVD formula (``torch.linalg.svd``),
   frogwatch's exact path (Gram eigenvectors) and the randomized SVD at rank M/4 and M/2.
3. On the real all-MiniLM-L6-v2: Jaccard overlap of the 1 % selections from exact and randomized S
   and the spectral energy captured, for a query matrix, an FFN matrix, and the mean/min over all
   37 targeted matrices.

Prints markdown tables.

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before torch is imported: on a shared,
oversubscribed CPU, OpenMP threads that spin-wait made MKL's symmetric eigensolver up to 150x slower
(11.6 s instead of 0.08 s for a 768x768 Gram matrix with two threads while other processes ran).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, here and in children

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import psutil, torch
import frogwatch.frog as frog
from transformers import GPT2LMHeadModel
proc = psutil.Process()
path, source, strategy, method = sys.argv[1:5]
model = GPT2LMHeadModel.from_pretrained(path) if source == "memory" else path
if source == "memory":  # page in every weight, so the baseline holds the whole loaded model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
frog.relevance(torch.randn(64, 48))  # warm-up: load MKL's LAPACK kernels before the baseline
frog.relevance(torch.randn(64, 48), method="randomized", rank=8)
peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        time.sleep(0.002)
time.sleep(0.05)
base = proc.memory_info().rss / 2**20
peak[0] = base
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
masks = frog.select(model, 0.01, strategy=strategy, method=method, score="relevance", progress=False)  # times S
wall = time.perf_counter() - t
time.sleep(0.05)
df = masks.summary()
print(json.dumps({"wall_s": wall, "base_mb": base, "extra_mb": peak[0] - base, "n_matrices": len(masks),
                  "n_selected": masks.n_selected, "n_total": masks.n_total,
                  "min_energy": float(df["energy"].min())}))
"""


def versions() -> str:
    import numpy
    import torch
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def write_gpt2(root: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(root)


def gpt2_select_table(root: Path) -> list[str]:
    rows = [
        "| source | strategy | S | wall (s) | peak RSS above start (MiB) | matrices | selected | min energy |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    cases = [
        ("memory", "per_matrix", "exact"),
        ("memory", "global", "exact"),
        ("memory", "per_matrix", "randomized"),
        ("file", "per_matrix", "exact"),
        ("file", "global", "exact"),
    ]
    for source, strategy, method in cases:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), source, strategy, method],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            f"| {'in memory' if source == 'memory' else 'safetensors file'} | {strategy} | {method} | "
            f"{r['wall_s']:.1f} | {r['extra_mb']:.0f} | {r['n_matrices']} | "
            f"{r['n_selected']:,} of {r['n_total']:,} | {r['min_energy']:.3f} |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def shape_cost_table(repeats: int) -> list[str]:
    import torch

    from frogwatch.frog.scores import relevance_2d

    def svd_formula(W):
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U.abs() * s) @ Vh.abs()

    rows = [
        "| shape (GPT-2 small) | count | SVD formula (s) | exact, Gram (s) | randomized M/4 (s) | randomized M/2 (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = [0.0] * 4
    g = torch.Generator().manual_seed(0)
    for shape, count in [((768, 2304), 12), ((768, 768), 12), ((768, 3072), 12), ((3072, 768), 12)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.02
        m = min(shape)
        t = [
            best_of(lambda: svd_formula(W), repeats),
            best_of(lambda: relevance_2d(W), repeats),
            best_of(lambda: relevance_2d(W, method="randomized", rank=m // 4), repeats),
            best_of(lambda: relevance_2d(W, method="randomized", rank=m // 2), repeats),
        ]
        totals = [a + count * b for a, b in zip(totals, t)]
        rows.append(f"| {shape[0]}x{shape[1]} | {count} | " + " | ".join(f"{x:.3f}" for x in t) + " |")
    rows.append("| **all 48 targets** | 48 | " + " | ".join(f"**{x:.1f}**" for x in totals) + " |")
    return rows


def minilm_overlap_table() -> list[str]:
    import torch

    from frogwatch.frog import resolve_targets
    from frogwatch.frog.budget import topk_flat
    from frogwatch.frog.scores import relevance_2d
    from frogwatch.sources import load_default_model

    model = load_default_model()
    lms = resolve_targets(model)
    fractions = (8, 4, 2)  # rank = M / f
    per = {f: [] for f in fractions}
    detail = {}
    for lm in lms:
        W = lm.load().to(torch.float64)
        k = round(0.01 * W.numel())
        exact = set(topk_flat(relevance_2d(W)[0], k).tolist())
        for f in fractions:
            S, energy = relevance_2d(W, method="randomized", rank=min(W.shape) // f)
            got = set(topk_flat(S, k).tolist())
            j = len(exact & got) / len(exact | got)
            per[f].append((j, energy))
            if lm.name in ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense"):
                detail[(lm.name, f)] = (j, energy)
    rows = [
        "| MiniLM matrix | rank | Jaccard of 1 % selections (exact vs randomized) | energy captured |",
        "|---|---:|---:|---:|",
    ]
    for (name, f), (j, e) in detail.items():
        rows.append(f"| {name} | M/{f} = {384 // f} | {j:.3f} | {e:.3f} |")
    for f in fractions:
        js, es = zip(*per[f])
        rows.append(
            f"| all {len(lms)} targets: mean (min) | M/{f} | {statistics.mean(js):.3f} ({min(js):.3f}) | "
            f"{statistics.mean(es):.3f} ({min(es):.3f}) |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gpt2", action="store_true", help="skip the whole-model runs")
    args = parser.parse_args()
    print(f"# frogwatch select benchmark\n\n{versions()}\n")
    if not args.skip_gpt2:
        with tempfile.TemporaryDirectory() as tmp:
            write_gpt2(Path(tmp))
            print("## select on GPT-2 small (random init), budget 1 %\n")
            print("\n".join(gpt2_select_table(Path(tmp))), "\n")
    print(f"## cost of S per matrix, float64, median of {args.repeats}\n")
    print("\n".join(shape_cost_table(args.repeats)), "\n")
    print("## exact vs randomized S on the real all-MiniLM-L6-v2\n")
    print("\n".join(minilm_overlap_table()))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
