"""FROG engine cost against full fine-tuning, PEFT LoRA and a naive masked full fine-tune.

For the real pretrained MiniLM (``frogwatch.sources.load_default_model()``; or GPT-2 small from
``GPT2Config()`` with ``--model gpt2``) at budgets G, one AdamW training step (forward, backward,
optimizer step) on synthetic tokens is measured for:

* ``full``   every parameter trainable (reference upper bound);
* ``frog``   ``frogwatch.prepare`` with the masks of ``frogwatch.frog.select.select`` (top-|W| per
  matrix when the selection module is unavailable), no noise; ``frog+noise`` adds noise;
* ``lora``   PEFT LoRA on the same modules, rank r = round(k / Σ(in + out)) (at least 1), so its
  trainable count is as close to k as a rank allows (the table shows both counts);
* ``naive``  the targeted weights trainable with a gradient hook that zeroes the unselected
  entries (dense gradients and dense AdamW state);
* ``frog-dense`` (only when named in ``--methods``) FROG with delta's gradient always gathered
  from the full dense weight gradient, to compare the engine's gradient paths.

Every configuration runs in a fresh subprocess, so allocator state does not leak between them.
What is measured:

* ``step ms``: median over ``--steps`` steps (after ``--warmup`` warm-up steps) of the CPU time
  of the training thread, with torch limited to one thread (default): on a machine shared with
  other work this is far steadier than wall time, which is shown beside it (``wall ms``). With
  ``--threads N > 1`` the step time is wall time.
* ``peak MB``: the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs
  after model loading and setup, so load-time spikes do not count) over the timed steps; this is
  what the OS had to give the training loop (model, activations, gradients, optimizer state,
  allocator slack, the torch runtime). ``overhead MB`` = that peak minus the RSS right after the
  base model was loaded, i.e. what training added on top of holding the model; ``of which setup``
  is the part already resident before the first step (prepare / get_peft_model / hooks).
* ``live peak MB``: the same peak over two further steps after telling glibc to serve
  allocations >= 64 KiB with mmap and trimming its heap (``mallopt`` / ``malloc_trim``), so that
  freed blocks go back to the OS at once: RSS then follows live memory rather than what the
  allocator keeps for reuse. ``peak MB`` is what a user sees by default; ``live peak MB`` is what
  the method itself needs. They differ by allocator slack, which depends on the allocation pattern.
* ``state MB``: exact bytes of trainable parameters + their gradients + AdamW state (+ FROG's
  indices and noise relevance buffers).
* ``saved/layer KB`` and ``saved total MB``: bytes saved for backward during one forward, taken with
  ``torch.autograd.graph.saved_tensors_hooks``; tensors that are model parameters or buffers (no
  copy) are excluded, storages are counted once. Per layer: mean over the targeted modules of the
  storages saved while that module ran; total: the whole model, deduplicated.

Run: ``python benchmarks/engine_memory.py`` (about 4-5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

METHODS = ("full", "frog", "frog+noise", "lora", "naive")
EXTRA_METHODS = ("frog-dense",)  # FROG forced to gather delta's gradient from the dense dL/dW


# --------------------------------------------------------------------------------------------
# memory probes (Linux)
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _malloc_returns_memory() -> bool:
    """Make glibc serve allocations >= 64 KiB with mmap (freed at once) and trim its heap.

    Afterwards RSS tracks live memory instead of what the allocator keeps for reuse.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# model, masks
# --------------------------------------------------------------------------------------------


def load_model(which: str) -> nn.Module:
    if which == "minilm":
        from frogwatch.sources import load_default_model

        return load_default_model()
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config())


def make_masks(model: nn.Module, budget: float, selection: str = "select") -> tuple[dict, str]:
    """{name: (shape, int32 indices)} and how they were chosen."""
    select = None
    if selection == "select":
        try:
            from frogwatch.frog.select import select
        except ImportError:
            pass
    if select is not None:
        m = select(model, budget, progress=False)
        return {n: (tuple(m[n].shape), m.indices(n).to(torch.int32)) for n in m}, "frogwatch select"
    out = {}
    for n, mod in model.named_modules():
        if type(mod) is nn.Linear or type(mod).__name__ == "Conv1D":
            w = mod.weight.detach().abs().reshape(-1)
            k = max(1, round(budget * w.numel()))
            out[n] = (tuple(mod.weight.shape), w.topk(k).indices.sort().values.to(torch.int32))
    return out, "top-|W| per matrix"


# --------------------------------------------------------------------------------------------
# one configuration (subprocess)
# --------------------------------------------------------------------------------------------


def setup(method: str, model: nn.Module, masks: dict) -> tuple[nn.Module, list, dict]:
    names = list(masks)
    info: dict = {}
    if method == "full":
        params = list(model.parameters())
    elif method.startswith("frog"):
        from frogwatch.frog.model import prepare

        bool_masks = {}
        for n, (shape, idx) in masks.items():
            b = torch.zeros(shape, dtype=torch.bool)
            b.view(-1)[idx.long()] = True
            bool_masks[n] = b
        if method == "frog-dense":
            from frogwatch.frog import ops

            ops._SDDMM_COST, ops._SDDMM_COST_LOW = {}, float("inf")  # never the SDDMM path
            ops._BLOCK_GRAD_MAX_FRACTION = 0.0
        prepare(model, bool_masks, noise_scale=0.01 if method == "frog+noise" else 0.0)
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        k = sum(idx.numel() for _, idx in masks.values())
        mods = dict(model.named_modules())
        fan = sum(sum(mods[n].weight.shape) for n in names)
        r = max(1, round(k / fan))
        info["lora_rank"] = r
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=names, bias="none")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "naive":
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        mods = dict(model.named_modules())
        for n, (shape, idx) in masks.items():
            w = mods[n].weight
            keep = torch.zeros(shape, dtype=w.dtype, device=w.device)
            keep.view(-1)[idx.to(w.device).long()] = 1.0
            w.requires_grad_(True)
            w.register_hook(lambda g, keep=keep: g * keep)
            params.append(w)
    else:
        raise ValueError(method)
    return model, params, info


def state_bytes(model: nn.Module, params: list) -> int:
    """Trainable params + grads + AdamW exp_avg and exp_avg_sq, + FROG buffers."""
    b = sum(4 * p.numel() * p.element_size() for p in params)
    for n, buf in model.named_buffers():
        if ".frog." in f".{n}":  # indices and noise codes, in each layer's ``frog`` child
            b += buf.numel() * buf.element_size()
    return b


def saved_bytes(model: nn.Module, batch: dict, targets: list[str]) -> tuple[float, int]:
    """(mean bytes saved per targeted module, total unique bytes saved) for one forward."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    current: list[str] = []
    per_layer: dict[str, set] = {}
    sizes: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in owned:
            sizes[ptr] = st.nbytes()
            if current:
                per_layer.setdefault(current[-1], set()).add(ptr)
        return t

    handles = []
    for n, m in model.named_modules():
        if any(n == t or n.endswith("." + t) for t in targets) and not n.endswith("base_layer"):
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: current.append(n)))
            handles.append(m.register_forward_hook(lambda mod, a, o: (current.pop(), None)[1]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch).last_hidden_state
    for h in handles:
        h.remove()
    loss = out.float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    layer_sums = [sum(sizes[p] for p in ptrs) for ptrs in per_layer.values()]
    per = statistics.fmean(layer_sums) if layer_sums else 0.0
    return per, sum(sizes.values())


class _Probe:
    """Memory in use: the process's RSS on CPU, torch's allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status_kb("VmRSS") * 1024

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_kb("VmHWM") * 1024


def run_one(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probe = _Probe(device)
    model = load_model(args.model).to(device)
    model.train()
    gc.collect()
    mem_model = probe.current()
    masks = torch.load(args.masks)
    k = sum(idx.numel() for _, idx in masks.values())
    model, params, info = setup(args.method, model, masks)
    gc.collect()
    mem_setup = probe.current()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(1, 1000, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    per_layer, saved_total = saved_bytes(model, batch, list(masks))

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        if probe.cuda:
            torch.cuda.synchronize()

    probe.reset()
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        step()
        if i >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    peak = probe.peak()
    peak_live = float(peak) if probe.cuda else float("nan")  # CUDA's allocated bytes are live
    if not probe.cuda and _malloc_returns_memory():
        probe.reset()
        for _ in range(2):
            step()
        peak_live = probe.peak()
    trainable = sum(p.numel() for p in params)
    use_cpu_time = args.threads == 1 and not probe.cuda
    return {
        "method": args.method, "budget": args.budget, "k": k, "trainable": trainable,
        "step_ms": 1e3 * statistics.median(cpu if use_cpu_time else wall),
        "wall_ms": 1e3 * statistics.median(wall), "peak": peak, "overhead": peak - mem_model,
        "peak_live": peak_live, "setup": mem_setup - mem_model,
        "state": state_bytes(model, params), "saved_layer": per_layer, "saved_total": saved_total,
        **info,
    }


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------


def versions() -> str:
    import platform

    import peft
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}")


def table(rows: list[dict]) -> str:
    head = ("| G | method | trainable | step ms | × LoRA time | wall ms | peak MB | × LoRA peak "
            "| overhead MB | of which setup MB | live peak MB | × LoRA live | state MB "
            "| saved/layer KB | saved total MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        lora = next((r for r in group if r["method"] == "lora"), None)
        for r in group:
            name = r["method"] + (f" (r={r['lora_rank']})" if "lora_rank" in r else "")
            tx = f"{r['step_ms'] / lora['step_ms']:.2f}" if lora else "-"
            px = f"{r['peak'] / lora['peak']:.3f}" if lora else "-"
            lx = f"{r['peak_live'] / lora['peak_live']:.3f}" if lora else "-"
            lines.append(
                f"| {budget:.1%} | {name} | {r['trainable']:,} | {r['step_ms']:.0f} | {tx} | "
                f"{r['wall_ms']:.0f} | {r['peak'] / 2**20:.0f} | {px} | {r['overhead'] / 2**20:.0f} | "
                f"{r['setup'] / 2**20:.0f} | {r['peak_live'] / 2**20:.0f} | {lx} | "
                f"{r['state'] / 2**20:.2f} | {r['saved_layer'] / 1024:.0f} | "
                f"{r['saved_total'] / 2**20:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("minilm", "gpt2"), default="minilm")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.001, 0.01, 0.05])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; with 1, step time is the thread's CPU time (robust to "
                         "other load on a shared machine), else wall time")
    ap.add_argument("--noise-budgets", type=float, nargs="*", default=[0.01],
                    help="budgets at which frog+noise runs (it is skipped elsewhere)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, memory is torch's "
                    "allocated bytes and step time is wall time after synchronising)")
    ap.add_argument("--selection", choices=("select", "magnitude"), default="select",
                    help="masks from frogwatch's select (default) or per-matrix top-|W|")
    ap.add_argument("--json", type=Path, help="also write the raw rows here")
    # internal: one configuration
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--masks", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    base = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            masks, how = make_masks(base, budget, args.selection)
            mpath = os.path.join(tmp, f"masks_{budget}.pt")
            torch.save(masks, mpath)
            k = sum(i.numel() for _, i in masks.values())
            print(f"G={budget:.1%}: k={k:,} over {len(masks)} matrices ({how})", flush=True)
            for method in args.methods:
                if method == "full" and budget != args.budgets[0]:
                    continue  # does not depend on G
                if method == "frog+noise" and budget not in args.noise_budgets:
                    continue
                cmd = [sys.executable, __file__, "--one", "--model", args.model, "--method", method,
                       "--budget", str(budget), "--masks", mpath, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--threads", str(args.threads), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not line:
                    raise RuntimeError(f"{method} at G={budget} failed:\n{out.stderr[-3000:]}")
                row = json.loads(line[-1][len("RESULT "):])
                rows.append(row)
                print(f"  {method:<11} {row['step_ms']:8.0f} ms  peak {row['peak'] / 2**20:7.0f} MB",
                      flush=True)
    full = [r for r in rows if r["method"] == "full"]
    for budget in args.budgets[1:]:  # show the full fine-tune once per budget group
        rows += [{**r, "budget": budget} for r in full]
    print()
    print(f"model {args.model} on {args.device}, batch {args.batch} x seq {args.seq}, "
          f"{args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up; {versions()}; "
          f"wall {time.perf_counter() - t_start:.0f} s")
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
