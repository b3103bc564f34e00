"""Offline fine-tuning benchmark of FROG's selection, α blend, init and noise (issue 6).

Usage::

    python benchmarks/finetune/run.py [--quick] [--tasks digits,planted,minilm] [--seeds 0,1,2,3,4]
        [--budgets 0.001,0.005,0.01,0.05] [--out DIR] [--jobs N]

Writes to ``DIR`` (default ``benchmarks/finetune/results``, ``results-quick`` with ``--quick``):

* ``results.csv`` — one row per (task, method, budget, seed) at the learning rate chosen on the
  validation split: task, method, budget, seed, lr, target_metric, source_metric, trainable,
  peak_mem_mb, seconds, plus val_metric, val_loss, state_mb, config, lr_at_edge, delta_cos,
  delta_relerr, final_loss.
* ``runs.csv`` — every run (every lr of the sweep on every seed; ``selected`` marks the chosen lr).
* ``summary.md`` and ``*.png`` — see :mod:`report`.

Protocol, per (task, method, budget):

1. **lr sweep on every seed**: one run per (lr of the method family's grid, seed)
   (``Problem.lr_grid``).
2. **lr choice on validation**: the lr whose validation metric, averaged over all seeds, is best
   wins (ties: lower mean val loss, then the smaller lr). Every seed's row is its run at that lr;
   the test split never takes part in the choice. (Until issue 10's confirmation the lr was picked
   on the first seed alone; two methods drawn from the same distribution could then end up at
   different lrs by chance — results produced that way say so in their ``summary.md`` command.)

Every run evaluates the *merged* plain model on a test split the sweep never sees. Batches depend
on the seed only, so for a given seed every method sees the same batches (paired comparisons).
Each worker process uses one torch thread (fastest for these small models on a shared 2-core
machine); ``--jobs 2`` runs two workers.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402

TASK_GROUPS = {"digits": ["digits"], "planted": ["planted_sparse", "planted_lowrank"], "minilm": ["minilm"],
               "pydoc": ["pydoc"], "planted_sparse": ["planted_sparse"], "planted_lowrank": ["planted_lowrank"]}
TEXT_TASKS = ("minilm", "pydoc")

#: Methods on the cheap tasks (digits, planted): everything.
CHEAP_METHODS = (
    "pretrained", "full", "frog_pm", "frog_global", "frog_blend_under", "frog_blend_over",
    "frog_init", "frog_noise", "frog_init_noise", "random", "magnitude", "lift", "lora", "default",
)
#: ``--quick`` on the cheap tasks: the default against random, the candidate scores and the
#: references; the FROG ablations (global, α blend, init, noise) and LIFT run in the full benchmark
#: only (each costs ~7 CPU s over the three cheap tasks; ``--quick`` must stay under 3 minutes).
QUICK_CHEAP_METHODS = ("pretrained", "full", "default", "random", "frog_pm", "balanced", "magnitude", "lora")
#: MiniLM: one run costs ~15-30 s of CPU here, so methods x budgets are cut to fit 30 minutes:
#: at 0.1 % (where accuracy is not saturated) FROG, both α blends and the three baselines; at 1 %
#: FROG and the baselines; full fine-tuning and the head alone once. (method -> budgets)
MINILM_PLAN: dict[str, tuple[float, ...]] = {
    "head_only": (0.0,), "full": (1.0,),
    "frog_pm": (0.001, 0.01), "frog_blend_under": (0.001,), "frog_blend_over": (0.001,),
    "random": (0.001, 0.01), "magnitude": (0.001, 0.01), "lora": (0.001, 0.01),
}
QUICK_MINILM_PLAN: dict[str, tuple[float, ...]] = {"default": (0.001,), "random": (0.001,)}
#: The real-text task (stdlib docstrings -> package; 300 steps): the data-free candidates against
#: random and the data-aware reference, at 0.1 % and 1 %.
PYDOC_PLAN: dict[str, tuple[float, ...]] = {
    "head_only": (0.0,), "default": (0.001, 0.01), "frog_pm": (0.001, 0.01), "random": (0.001, 0.01),
    "balanced": (0.001, 0.01), "mix50": (0.001, 0.01), "grad": (0.001, 0.01),
}
QUICK_PYDOC_PLAN: dict[str, tuple[float, ...]] = {"default": (0.01,), "random": (0.01,)}


@dataclass(frozen=True)
class Unit:
    """One (task, method, budget) cell: an lr sweep on ``seeds[0]`` then the other seeds."""

    task: str
    method: str
    budget: float
    seeds: tuple[int, ...]
    quick: bool
    max_lrs: int | None = None  # cut the lr grid to its middle value(s) (quick MiniLM)
    lr_override: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (family, lrs) replacing the task's grid


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------

_PROBLEMS: dict = {}


def _problem(task: str, seed: int, quick: bool):
    key = (task, seed, quick)
    if key not in _PROBLEMS:
        if task == "digits":
            import tasks_digits as mod

            _PROBLEMS[key] = mod.make_problem(seed, quick)
        elif task.startswith("planted_"):
            import tasks_planted as mod

            _PROBLEMS[key] = mod.make_problem(seed, quick, variant=task.split("_", 1)[1])
        elif task == "minilm":
            import tasks_minilm as mod

            _PROBLEMS[key] = mod.make_problem(seed, quick)
        elif task == "pydoc":
            import tasks_pydoc as mod

            _PROBLEMS[key] = mod.make_problem(seed, quick)
        else:
            raise ValueError(f"unknown task {task!r}")
    return _PROBLEMS[key]


def _worker_init() -> None:
    from train import set_threads

    set_threads(1)
    warnings.filterwarnings("ignore")


def _row(unit: Unit, seed: int, method, problem, budget: float, res) -> dict:
    row = {
        "task": unit.task, "method": unit.method, "budget": budget, "seed": seed, "lr": res.lr,
        "target_metric": res.metrics["target_metric"], "source_metric": res.metrics["source_metric"],
        "trainable": res.trainable, "peak_mem_mb": res.peak_mem_mb, "seconds": res.seconds,
        "cpu_seconds": res.cpu_seconds,
        "val_metric": res.metrics["val_metric"], "val_loss": res.metrics.get("val_loss", math.nan),
        "state_mb": res.state_mb, "final_loss": res.final_loss,
        "delta_cos": res.metrics.get("delta_cos", math.nan),
        "delta_relerr": res.metrics.get("delta_relerr", math.nan),
        "config": method.config(problem, budget), "n_targeted": problem.n_targeted(),
        "higher_is_better": problem.higher_is_better,
    }
    return row


def _sweep_key(lr_rows: list[dict], higher: bool) -> tuple:
    """Order of one lr's runs (one per seed): mean val metric (best first), mean val loss, lr."""
    v = sum(r["val_metric"] for r in lr_rows) / len(lr_rows)
    losses = [r["val_loss"] for r in lr_rows if not math.isnan(r["val_loss"])]
    loss = sum(losses) / len(losses) if losses else 0.0
    return ((-v if higher else v), loss, lr_rows[0]["lr"])


def run_unit(unit: Unit) -> tuple[list[dict], float]:
    """Run one cell; returns its rows (every lr x seed) and its wall time."""
    from methods import METHODS
    from train import fine_tune

    t0 = time.perf_counter()
    method = METHODS[unit.method]
    budget = unit.budget
    first = _problem(unit.task, unit.seeds[0], unit.quick)
    grids = {**first.lr_grid, **dict(unit.lr_override)}
    grid = list(grids.get(method.family, [0.0])) if method.family != "none" else [0.0]
    if unit.max_lrs is not None and len(grid) > unit.max_lrs:
        mid = len(grid) // 2
        grid = grid[mid - unit.max_lrs // 2: mid - unit.max_lrs // 2 + unit.max_lrs]
    by_lr: dict[float, list[dict]] = {}
    for lr in grid:
        for seed in unit.seeds:
            p = _problem(unit.task, seed, unit.quick)
            by_lr.setdefault(lr, []).append(
                _row(unit, seed, method, p, budget, fine_tune(p, method, budget, seed, lr)))
    best_lr = min(by_lr.values(), key=lambda rs: _sweep_key(rs, first.higher_is_better))[0]["lr"]
    edge = len(grid) > 1 and best_lr in (min(grid), max(grid))
    rows = [r for rs in by_lr.values() for r in rs]
    for r in rows:
        r["selected"] = r["lr"] == best_lr
        r["lr_at_edge"] = edge
    return rows, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _lr_override(specs: list[str] | None) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``["sparse=0.03,0.1", ...]`` -> ``(("sparse", (0.03, 0.1)), ...)``."""
    out = []
    for spec in specs or []:
        family, _, lrs = spec.partition("=")
        if not lrs:
            raise SystemExit(f"--lr-grid expects FAMILY=lr1,lr2,... (got {spec!r})")
        out.append((family.strip(), tuple(_floats(lrs))))
    return tuple(out)


def build_units(args: argparse.Namespace) -> list[Unit]:
    """The cells to run, MiniLM first (longest jobs first balances the workers)."""
    from methods import METHODS

    units: list[Unit] = []
    tasks = [t for g in args.tasks.split(",") for t in TASK_GROUPS[g.strip()]]
    for task in tasks:
        if task in TEXT_TASKS:
            pre = "minilm" if task == "minilm" else "pydoc"
            seeds = tuple(_ints(getattr(args, f"{pre}_seeds")))
            full_plan, quick_plan = (MINILM_PLAN, QUICK_MINILM_PLAN) if pre == "minilm" else (PYDOC_PLAN, QUICK_PYDOC_PLAN)
            methods_arg, budgets_arg = getattr(args, f"{pre}_methods"), getattr(args, f"{pre}_budgets")
            if methods_arg or budgets_arg:
                names = (methods_arg or ",".join(full_plan)).split(",")
                budgets = _floats(budgets_arg or "0.001,0.01")
                plan = {n: budgets for n in names}
            else:
                plan = quick_plan if args.quick else full_plan
        else:
            seeds = tuple(_ints(args.seeds))
            plan = {n: _floats(args.budgets) for n in args.methods.split(",")}
        for name, budgets in plan.items():
            m = METHODS[name]
            cells = budgets if m.budgeted else [1.0 if m.family == "full" else 0.0]
            for b in cells:
                units.append(Unit(task, name, b, seeds, args.quick, 1 if (args.quick and task in TEXT_TASKS) else None,
                                  _lr_override(args.lr_grid)))
    units.sort(key=lambda u: u.task not in TEXT_TASKS)
    return units


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "pandas", "scikit-learn", "matplotlib", "transformers", "peft", "frogwatch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 3 minutes)")
    ap.add_argument("--tasks", default="digits,planted,minilm,pydoc", help="comma list of digits, planted, minilm, pydoc")
    ap.add_argument("--seeds", default=None, help="seeds of the cheap tasks (default 0,1,2,3,4; quick 0,1,2)")
    ap.add_argument("--budgets", default=None, help="budgets of the cheap tasks (default 0.001,0.005,0.01,0.05; quick 0.01,0.05)")
    ap.add_argument("--methods", default=None, help="methods of the cheap tasks (default: CHEAP_METHODS; quick QUICK_CHEAP_METHODS)")
    ap.add_argument("--minilm-seeds", default=None, help="MiniLM seeds (default 0,1,2; quick 0,1)")
    ap.add_argument("--minilm-budgets", default=None, help="MiniLM budgets for every MiniLM method (default: MINILM_PLAN)")
    ap.add_argument("--minilm-methods", default=None, help="MiniLM methods (default: MINILM_PLAN)")
    ap.add_argument("--pydoc-seeds", default=None, help="seeds of the docstring task (default 0,1,2,3,4; quick 0,1)")
    ap.add_argument("--pydoc-budgets", default=None, help="docstring-task budgets for every method (default: PYDOC_PLAN)")
    ap.add_argument("--pydoc-methods", default=None, help="docstring-task methods (default: PYDOC_PLAN)")
    ap.add_argument("--pydoc-steps", type=int, default=None, help="training steps of the docstring task (default 300)")
    ap.add_argument("--pydoc-batch", type=int, default=None, help="batch size of the docstring task (default 4)")
    ap.add_argument("--pydoc-max-tokens", type=int, default=None, help="token cap of a docstring (default 16)")
    ap.add_argument("--lr-grid", action="append", default=None, metavar="FAMILY=LR,LR,...",
                    help="replace a method family's lr grid (sparse, lora, full, head) in every task; repeatable")
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (one torch thread each; default 2)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4")
    args.methods = args.methods or ",".join(QUICK_CHEAP_METHODS if args.quick else CHEAP_METHODS)
    args.budgets = args.budgets or ("0.01,0.05" if args.quick else "0.001,0.005,0.01,0.05")
    args.minilm_seeds = args.minilm_seeds or ("0,1" if args.quick else "0,1,2")
    if args.pydoc_steps:
        os.environ["FROGWATCH_PYDOC_STEPS"] = str(args.pydoc_steps)  # inherited by the spawned workers
    if args.pydoc_max_tokens:
        os.environ["FROGWATCH_PYDOC_MAX_TOKENS"] = str(args.pydoc_max_tokens)
    if args.pydoc_batch:
        os.environ["FROGWATCH_PYDOC_BATCH"] = str(args.pydoc_batch)
    args.pydoc_seeds = args.pydoc_seeds or ("0,1" if args.quick else "0,1,2,3,4")
    out = Path(args.out) if args.out else HERE / ("results-quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)

    _worker_init()
    units = build_units(args)
    print(f"{len(units)} cells, {args.jobs} worker(s), out={out}", flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    done = 0

    def collect(unit: Unit, result: tuple[list[dict], float]) -> None:
        nonlocal done
        unit_rows, secs = result
        rows.extend(unit_rows)
        done += 1
        sel = [r for r in unit_rows if r.get("selected")]
        mean = sum(r["target_metric"] for r in sel) / max(1, len(sel))
        print(f"[{done:3d}/{len(units)} {time.perf_counter() - t0:7.1f}s] {unit.task:16s} {unit.method:17s} "
              f"b={unit.budget:<6g} lr={sel[0]['lr']:<8g} target={mean:.4f} ({secs:.1f}s)", flush=True)
        pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)

    if args.jobs <= 1:
        for u in units:
            collect(u, run_unit(u))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            futures = {pool.submit(run_unit, u): u for u in units}
            for f in as_completed(futures):
                collect(futures[f], f.result())
    wall = time.perf_counter() - t0

    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    results = runs[runs["selected"]].drop(columns=["selected"]).sort_values(["task", "method", "budget", "seed"])
    results.to_csv(out / "results.csv", index=False)

    import report

    meta = {
        "command": " ".join(["python benchmarks/finetune/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                                 for f in ("ru_utime", "ru_stime")), 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU; one torch thread per worker, {args.jobs} worker(s)",
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": _versions(),
    }
    report.make_report(out, meta)
    print(f"done in {wall:.1f}s; wrote {out / 'results.csv'} and {out / 'summary.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
