"""FROG against PEFT LoRA on a TinyLlama-1.1B-shaped bf16 model, at equal trainable count.

The model is built from a ``transformers.LlamaConfig`` with TinyLlama-1.1B's shapes (hidden 2048,
MLP 5632, 32 heads / 4 KV heads, vocab 32000) and random init, in bfloat16; ``--layers`` keeps
the first N of its 22 decoder blocks (a slice, when the full model is too slow for the machine).
Every method runs in its own fresh subprocess, all in the same run:

* ``lora``       PEFT LoRA, rank ``r`` on every projection of every block (q, k, v, o, gate, up, down);
* ``frog``       ``frogwatch.prepare`` with ``k_i = r * (in_i + out_i)`` entries per matrix (exactly
  LoRA's trainable count; the top-|W| entries stand in for a FROG selection: the engine's cost
  depends on k and on how the entries spread, not on which ones they are);
* ``frog+noise`` the same with dynamic noise (the one-byte noise codes of S are kept per matrix).

Measured per method: RSS before and after ``prepare`` / ``get_peft_model`` (what the method adds
to the process), the median wall and CPU time of a training step (AdamW, batch 1 x ``--seq``
tokens, LM loss, after one warm-up step; one torch thread by default, so CPU time is robust to
other load on the machine) and the peak RSS during the steps (sampled every 2 ms by a second
thread). CPU time is given for the whole process and for the training thread alone: with one
torch thread all of a CPU step runs on the training thread, while the process time also holds
the sampler's, which grows with the step's wall time (a step slowed by other load is charged
more sampling). The model's own size is reported for the ratio ``prepare adds / model size``.

Run: ``python benchmarks/engine_llm.py --layers 4 --steps 3`` (CPU); ``--seq 64,128,256
--repeat 3`` measures each token count in 3 rounds, every method once per round (alternated, so
a change in the machine's load hits both), with each FROG / LoRA ratio taken within its round and
the median over rounds; ``--device cuda`` on a GPU
(peak memory is then ``torch.cuda.max_memory_allocated``); ``--profile N`` prints where one step's CPU
time goes (the N ops with the most self time, per method); ``--fixture DIR`` loads a sharded bf16
checkpoint (the full 1.1B: ``benchmarks/fixtures/tinyllama``) instead. Prints a Markdown table.
``benchmarks/llm_scale.py`` runs this together with select, analyze and merge on the checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Max RSS sampled by a background thread while the ``with`` block runs."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()  # one handle: sampling costs the process less CPU
        self.peak, self._stop = rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def run_one(method: str, layers: int, rank: int, seq: int, steps: int, device: str,
            threads: int, fixture: str | None = None, save_delta: str | None = None,
            profile: int = 0) -> dict:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if fixture:  # a bf16 checkpoint directory (benchmarks/llm_fixtures.py), all of its blocks
        model = transformers.LlamaForCausalLM.from_pretrained(fixture, dtype=torch.bfloat16).to(device)
        cfg = model.config
    else:
        cfg = transformers.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
        model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    masks = None
    if method.startswith("frog"):
        from frogwatch.frog.masks import Masks

        idx, shapes, scores = {}, {}, {}
        for n in names:
            w = model.get_submodule(n).weight
            k = rank * (w.shape[0] + w.shape[1])
            top = w.detach().abs().reshape(-1).topk(k)
            order = top.indices.argsort()
            idx[n] = top.indices[order].to(torch.int32).cpu()
            scores[n] = top.values[order].float().cpu()  # given, as a selection ships S: no recompute
            shapes[n] = tuple(w.shape)
        masks = Masks.from_indices(idx, shapes, scores=scores)  # int32 indices, as a selection's
        del idx, scores, top, order
    from peft import LoraConfig, get_peft_model  # imported before measuring: code is not state

    from frogwatch.frog.io import save_delta as write_delta
    from frogwatch.frog.model import prepare

    gc.collect()
    mem = (lambda: torch.cuda.memory_allocated()) if device == "cuda" else rss
    before = mem()
    t0 = time.perf_counter()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
    else:
        prepare(model, masks, noise_scale=0.01 if method == "frog+noise" else 0.0)
    prepare_s = time.perf_counter() - t0
    gc.collect()
    after = mem()
    del masks
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    model.train()
    times = []

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()  # warm-up: optimizer state allocated, kernels chosen
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu_times, thread_times = [], []
    with PeakRSS() as peak:
        for _ in range(steps):
            t, c, th = time.perf_counter(), time.process_time(), time.thread_time()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
            thread_times.append(time.thread_time() - th)
    step_peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak.peak
    if save_delta and method.startswith("frog"):
        write_delta(model, save_delta)
    if profile:  # one more step, after the timed ones and the saved delta: per-op CPU, to stderr
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile),
              file=sys.stderr)
    return {"method": method, "trainable": trainable, "model_mb": model_bytes / 2**20,
            "prepare_add_mb": (after - before) / 2**20, "prepare_s": prepare_s,
            "step_s": statistics.median(times), "step_cpu_s": statistics.median(cpu_times),
            "step_thread_cpu_s": statistics.median(thread_times),
            "step_peak_mb": step_peak / 2**20}


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder blocks kept (TinyLlama has 22)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank; FROG gets the same count")
    ap.add_argument("--seq", default="64", help="tokens per step; a comma list runs each in turn")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per token count; each round runs every method once, in order")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="lora,frog,frog+noise")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (CPU); step CPU time is then robust to a shared machine")
    ap.add_argument("--fixture", help="load this bf16 Llama checkpoint directory instead of a random "
                    "--layers slice (e.g. benchmarks/fixtures/tinyllama, the full 1.1B)")
    ap.add_argument("--save-delta", help="FROG: write the trained delta file here (for frogwatch merge)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N ops with the most self CPU time in one more step (torch.profiler)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    seqs = [int(s) for s in str(a.seq).split(",")]
    if a.one:
        print(json.dumps(run_one(a.one, a.layers, a.rank, seqs[0], a.steps, a.device, a.threads,
                                 a.fixture, a.save_delta, a.profile)))
        return
    rows = []
    for seq in seqs:
        for rnd in range(1, a.repeat + 1):
            for m in a.methods.split(","):
                cmd = [sys.executable, __file__, "--one", m, "--layers", str(a.layers),
                       "--rank", str(a.rank), "--seq", str(seq), "--steps", str(a.steps),
                       "--device", a.device, "--threads", str(a.threads)]
                cmd += ["--fixture", a.fixture] if a.fixture else []
                cmd += ["--save-delta", a.save_delta] if a.save_delta else []
                cmd += ["--profile", str(a.profile)] if a.profile else []
                before = _load()
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    sys.exit(f"{m} failed:\n{out.stderr[-3000:]}")
                if a.profile:
                    print(f"## {m}: one step, torch.profiler\n{out.stderr}", file=sys.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(dict(r, seq=seq, round=rnd, load=f"{before}–{_load()}"))
                print(f"# {rows[-1]}", file=sys.stderr)
    blocks = f"{a.fixture} (all blocks)" if a.fixture else f"{a.layers} of 22 blocks"
    print(f"TinyLlama-1.1B shapes, {blocks}, bf16, rank {a.rank}, {a.steps} timed steps, "
          f"device {a.device}; model {rows[0]['model_mb']:.0f} MiB\n")
    print("| tokens | round | method | trainable | prepare adds (MiB) | adds / model | prepare (s) "
          "| step wall (s) | step CPU (s) | step CPU, training thread (s) | step peak (MiB) "
          "| step CPU / LoRA | thread CPU / LoRA | step peak / LoRA | load (1 min, before–after) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[tuple, list] = {}
    for r in rows:
        lora = next((q for q in rows if q["method"] == "lora" and q["seq"] == r["seq"]
                     and q["round"] == r["round"]), None)
        rt = rth = rp = "-"
        if lora:
            rt = f"{r['step_cpu_s'] / lora['step_cpu_s']:.2f}"
            rth = f"{r['step_thread_cpu_s'] / lora['step_thread_cpu_s']:.3f}"
            rp = f"{r['step_peak_mb'] / lora['step_peak_mb']:.3f}"
            ratios.setdefault((r["seq"], r["method"]), []).append(
                (r["step_thread_cpu_s"] / lora["step_thread_cpu_s"], r["step_peak_mb"] / lora["step_peak_mb"]))
        print(f"| {r['seq']} | {r['round']} | {r['method']} | {r['trainable']:,} | "
              f"{r['prepare_add_mb']:.1f} | {r['prepare_add_mb'] / r['model_mb']:.1%} | "
              f"{r['prepare_s']:.1f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | "
              f"{r['step_thread_cpu_s']:.3f} | {r['step_peak_mb']:.0f} | {rt} | {rth} | {rp} | {r['load']} |")
    if a.repeat > 1 and ratios:
        print("\n| tokens | method | rounds | thread CPU / LoRA: median (min–max) | step peak / LoRA: median (min–max) |")
        print("|---|---|---|---|---|")
        for (seq, m), v in ratios.items():
            if m == "lora":
                continue
            t, p = [x[0] for x in v], [x[1] for x in v]
            print(f"| {seq} | {m} | {len(v)} | {statistics.median(t):.3f} ({min(t):.3f}–{max(t):.3f}) | "
                  f"{statistics.median(p):.3f} ({min(p):.3f}–{max(p):.3f}) |")


if __name__ == "__main__":
    main()
