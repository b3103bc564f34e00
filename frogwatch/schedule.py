"""Scheduling one analysis: order matrices by cost, read the next while the current is solved.

``analyze`` hands this module two functions, ``load(item)`` (read a tensor) and
``solve(item, loaded)`` (its spectrum, fit and row), and gets the results back in the order of the
items. Reading runs one tensor ahead in a background thread; solving runs on ``workers`` threads
(LAPACK and ctypes release the GIL), each with one BLAS thread when there are several. Matrices
start largest first so that the last ones to finish are small and no core idles at the end.

The last matrix does not get the idle cores: OpenBLAS's results depend on its thread count (the
eigenvalues of one 2000 x 900 Gram matrix differ by up to 2e-11 between 1 and 2 threads), so a row's
last bits would depend on which matrix happened to finish last. One BLAS thread per solver keeps
``analyze`` bit-reproducible, whatever the timing and whichever layers are analysed together.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from .sources import LayerMatrix

__all__ = ["num_workers", "layer_cost", "largest_first", "share_by_cost", "pipeline", "CostProgress"]


def num_workers() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def layer_cost(lm: LayerMatrix) -> float:
    """Relative cost of analysing one matrix: ``rf * M^2 * (N + M)``.

    ``M^2 N`` for the Gram matrix, ``~M^3`` for the eigensolver, times the number of conv slices.
    """
    return float(lm.rf) * float(lm.M) ** 2 * float(lm.N + lm.M)


def largest_first(costs: Sequence[float]) -> list[int]:
    """Positions ordered by decreasing cost (ties keep their order)."""
    return sorted(range(len(costs)), key=lambda k: -costs[k])


def share_by_cost(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split positions into ``parts`` groups of about equal total cost (largest first, greedy).

    Deterministic: every rank of a distributed run computes the same split. Each group's
    positions come back in ascending order.
    """
    if parts < 1:
        raise ValueError(f"share_by_cost: parts must be >= 1, got {parts!r}")
    loads = [0.0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for k in largest_first(costs):
        r = min(range(parts), key=lambda p: (loads[p], p))
        groups[r].append(k)
        loads[r] += costs[k]
    return [sorted(g) for g in groups]


class CostProgress:
    """A tqdm bar over matrices whose ETA weighs each matrix by its cost, not by its count."""

    def __init__(self, costs: Sequence[float], *, enabled: bool, desc: str = "frogwatch analyze"):
        self.total = float(sum(costs)) or 1.0
        self.done = 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=len(costs), desc=desc, unit="matrix", disable=not enabled, leave=False,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
        )  # fmt: skip

    def update(self, cost: float, label: str = "") -> None:
        self.done += cost
        elapsed = time.perf_counter() - self.start
        left = elapsed * (self.total - self.done) / self.done if self.done > 0 else float("nan")
        eta = f"ETA {left:.0f} s" if left == left else "ETA ?"
        self.bar.set_postfix_str(f"{eta} {label[-32:]}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _blas_threads(workers: int):
    if workers <= 1:  # one matrix at a time: BLAS keeps all its threads
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def pipeline(
    items: Sequence[Any],
    load: Callable[[Any], Any],
    solve: Callable[[Any, Any], Any],
    *,
    workers: int = 1,
    ahead: int = 1,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(position, solve(item, load(item)))`` for every item, as each finishes.

    Items are loaded in the given order by one background thread, at most ``workers + ahead``
    loaded and not yet solved at any time (this bounds the memory), and solved on ``workers``
    threads. An exception in ``load`` or ``solve`` is raised here. When the caller stops (an
    exception, Ctrl-C, closing the generator) nothing new starts; the matrices being solved
    finish in their threads and their results are dropped.
    """
    n = len(items)
    done: queue.Queue = queue.Queue()
    slots = threading.Semaphore(workers + ahead)
    stop = threading.Event()
    loader = ThreadPoolExecutor(1, thread_name_prefix="frogwatch-load")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="frogwatch-solve")

    def run_solve(pos: int, item: Any, loaded: Any) -> None:
        try:
            if not stop.is_set():
                done.put((pos, solve(item, loaded), None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done.put((pos, None, e))
        finally:
            slots.release()

    def run_load(pos: int, item: Any) -> None:
        try:
            if stop.is_set():
                slots.release()
                return
            loaded = load(item)
            pool.submit(run_solve, pos, item, loaded)
        except BaseException as e:  # noqa: BLE001
            slots.release()
            if not stop.is_set():
                done.put((pos, None, e))

    with _blas_threads(workers):
        try:
            started = got = 0
            while got < n:
                while started < n and slots.acquire(blocking=False):
                    loader.submit(run_load, started, items[started])
                    started += 1
                try:
                    pos, result, err = done.get(timeout=0.05)  # short: Ctrl-C stays responsive
                except queue.Empty:
                    continue
                if err is not None:
                    raise err
                got += 1
                yield pos, result
        finally:
            stop.set()
            loader.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=False, cancel_futures=True)
