"""Per-matrix cost of Llama-3-8B shapes and the extrapolated 8B total, CPU (and a torch device).

    python benchmarks/llm_fixtures.py --which llama3-8b-slice     # once
    python benchmarks/llm_cost.py [--device cuda] [--repeats 1]

For each distinct matrix shape of the Llama-3-8B slice (4096 x 4096, 1024 x 4096, 14336 x 4096,
4096 x 14336 and the 128256 x 4096 embedding, which ``max_N`` skips by default) it times what
``frogwatch.analyze`` runs per matrix: read the bf16 tensor, Gram matrix, eigenvalues, fit. On the
CPU: one matrix per core, so one BLAS thread, and the previous floor (float64 Gram +
``numpy.linalg.eigvalsh``) alongside. With ``--device``: the torch path on that device.

Then extrapolates Llama-3-8B (32 blocks: q, o 4096 x 4096; k, v 1024 x 4096; gate, up
14336 x 4096; down 4096 x 14336; embedding and head 128256 x 4096, skipped by default) as the sum of
per-matrix times over the cores. Prints a markdown table and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SLICE = HERE / "fixtures" / "llama3-8b-slice"
LLAMA3_8B_COUNTS = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "o_proj": 32, "gate_proj": 32,
                    "up_proj": 32, "down_proj": 32, "embed_tokens": 2}  # embedding + untied head  # fmt: skip


def time_matrix(lm, device: str | None, repeats: int, floor_too: bool = True) -> tuple[float, float | None]:
    """(frogwatch seconds, previous-floor seconds or None) for one matrix, median of repeats.

    On the CPU these are process CPU seconds (one BLAS and one torch thread, so CPU time is the
    work and a busy machine inflates it much less than wall time); on a device, wall seconds.
    """
    from frogwatch.analyze import _load_checked
    from frogwatch.powerlaw_fit import fit_power_law
    from frogwatch.spectra import resolve_device, spectrum

    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev is not None and dev.type == "cuda" else (lambda: None)
    clock = time.process_time if dev is None else time.perf_counter
    fw, floor = [], []
    for _ in range(repeats):
        t = clock()
        W, _ = _load_checked(lm)
        spec = spectrum([W], device=dev)
        fit_power_law(spec.evals)
        sync()
        fw.append(clock() - t)
        if dev is None and floor_too:
            t = clock()
            A = lm.load().double().numpy()
            A = A if A.shape[0] >= A.shape[1] else A.T
            np.linalg.eigvalsh(A.T @ A)
            floor.append(clock() - t)
            del A
    return statistics.median(fw), (statistics.median(floor) if floor else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--path", type=Path, default=SLICE)
    ap.add_argument("--skip", nargs="*", default=[], help="matrix names to leave out, e.g. embed_tokens")
    ap.add_argument("--no-floor", action="store_true", help="do not time the previous floor")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from frogwatch.sources import layer_matrices

    if not (args.path / "model.safetensors.index.json").is_file():
        raise SystemExit(f"{args.path}: run benchmarks/llm_fixtures.py --which llama3-8b-slice first")
    cores = len(os.sched_getaffinity(0))
    lms = {}
    for lm in layer_matrices(args.path):
        key = lm.name.split(".")[-1]
        lms.setdefault(key, lm)
    print(f"{cores} cores, torch {torch.__version__}, numpy {np.__version__}, device {args.device or 'cpu (LAPACK)'}; "
          f"load average before: {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    torch.set_num_threads(1)
    unit = "CPU s" if args.device is None else "s"
    print(f"| matrix | shape | frogwatch {unit} | previous floor {unit} (fp64 Gram + eigvalsh) | count in Llama-3-8B |")
    print("|---|---|---|---|---|")
    total = total_floor = 0.0
    limit = threadpool_limits(1, user_api="blas") if args.device is None else None
    for key, lm in sorted(lms.items(), key=lambda kv: kv[1].size):
        if key in args.skip:
            continue
        t, f = time_matrix(lm, args.device, args.repeats, floor_too=not args.no_floor)
        n = LLAMA3_8B_COUNTS.get(key, 0)
        fs = f"{f:.2f}" if f is not None else "-"
        print(f"| {key} | {lm.shape[0]} x {lm.shape[1]} | {t:.2f} | {fs} | {n} |", flush=True)
        if key != "embed_tokens":  # skipped by max_N = 50000 by default
            total += n * t
            total_floor += n * (f or 0.0)
    if limit is not None:
        limit.unregister()
    workers = cores if args.device is None else 1
    print(f"\nLlama-3-8B extrapolated (224 block matrices; the two 128256-row matrices skipped by max_N): "
          f"{total / workers / 60:.1f} min on {workers} worker(s)"
          + (f"; previous floor {total_floor / workers / 60:.1f} min" if total_floor else "")
          + f"; load average after: {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
