"""Cost of a GRPO step against the number of adapters on one base: 1 to 1,024, tokens per adapter fixed.

Each adapter count runs in its own process (so max RSS is that count's own), builds a
``GRPOTrainer`` over A adapters with ranks cycling 1..8, takes one warm-up step and measures
``--steps`` more. Every adapter samples the same number of prompts x samples x new tokens, so
the work grows linearly with A: a flat adapter-steps/s is the ideal.

    python bench/bench_scaling.py                          # 1,8,64,256,1024 on the embedded tiny model (CPU)
    python bench/bench_scaling.py --adapters 1,8 --steps 1
    python bench/bench_scaling.py --plot-only              # redraw bench/figures/scaling.png from the CSV

Models: ``tiny`` (``lora_engine.rl.models.load_base("tiny")``, the CPU default), ``random`` (a
random 2-layer Qwen3, vocab 512: the smoke test), ``0.6b`` (the Qwen3-0.6B shape, random bf16
weights: the GPU default). Metrics per adapter count (rows of ``bench/results.csv``, op
``grpo_scaling``):

    s_per_step            median wall time of a measured step
    adapter_steps_per_s   A / s_per_step
    tokens_per_s          prompt + completion tokens of all adapters per second of a step
    host_ms_per_forward   time inside the engine's wrapped layers outside the LoRA kernels
                          (routing, layout and kernel-pair lookup, DoRA scale, dispatch), summed over
                          the layers of one forward, averaged over every forward of the measured
                          steps (decode steps and training passes; the per-batch routing is O(T),
                          and a step's prefill has 16 x A sequences of prompt tokens). On a CPU the
                          kernels run synchronously, so their time is compute and is left out; on
                          a GPU kernel launches return at once, so the whole layer time is host time.
    host_ms_per_decode    the same for one decode-sized forward at fixed work: 256 sequences of one
                          token spread over the bank's adapters, inside one routing context (as
                          generation), median of 20: what a bank of A adapters costs the host per
                          token, whatever the batch.
    max_rss_gib           the process's peak resident memory (CPU); peak_gib: peak CUDA memory (GPU)
    build_s               time to build the engine and add the A adapters
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import CSV_PATH, append_rows, env_info  # noqa: E402

OP = "grpo_scaling"
METRICS = ("s_per_step", "adapter_steps_per_s", "tokens_per_s", "host_ms_per_forward", "host_ms_per_decode",
           "max_rss_gib", "peak_gib", "build_s")
DECODE_ROWS = 256


class LayerClock:
    """Wall time inside every ``MultiLoRALinear.forward`` minus the time inside the LoRA kernels
    (``ops.lora_linear``, ``ops.lora_column_scale``) when those run synchronously (CPU)."""

    def __init__(self, exclude_kernels: bool):
        from lora_engine import ops
        from lora_engine.engine.layers import MultiLoRALinear

        self.ops, self.cls, self.exclude = ops, MultiLoRALinear, exclude_kernels
        self.layer_s = self.kernel_s = 0.0
        self.forwards = 0
        self.first: str | None = None
        self._saved = (MultiLoRALinear.forward, ops.lora_linear, ops.lora_column_scale)

    def __enter__(self):
        real_fwd, real_lin, real_col = self._saved
        clock = self

        def forward(layer, x):
            if clock.first is None:
                clock.first = layer.name
            if layer.name == clock.first and layer.state.adapter_ids is not None:
                clock.forwards += 1
            t0 = time.perf_counter()
            out = real_fwd(layer, x)
            clock.layer_s += time.perf_counter() - t0
            return out

        def timed(fn):
            def run(*args, **kwargs):
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                clock.kernel_s += time.perf_counter() - t0
                return out
            return run

        self.cls.forward = forward
        self.ops.lora_linear, self.ops.lora_column_scale = timed(real_lin), timed(real_col)
        return self

    def __exit__(self, *exc):
        self.cls.forward, self.ops.lora_linear, self.ops.lora_column_scale = self._saved

    def reset(self):
        self.layer_s = self.kernel_s = 0.0
        self.forwards = 0

    def host_ms_per_forward(self) -> float:
        host = self.layer_s - (self.kernel_s if self.exclude else 0.0)
        return 1e3 * host / max(self.forwards, 1)


def _trainer(args, n_adapters: int, out_dir: str):
    from lora_engine.rl.config import config_from_dict
    from lora_engine.rl.trainer import GRPOTrainer

    gpu = args.device == "cuda"
    adapters = [{"rank": 1 + i % 8, "alpha": 16, "seed": i, "lr": 1e-4} for i in range(n_adapters)]
    cfg = {"adapters": adapters, "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
           "max_new_tokens": args.new_tokens, "steps": args.steps + 1, "eval_problems": 1,
           "micro_batch_size": args.micro_batch, "dtype": "bfloat16" if gpu else "float32",
           "device": args.device, "progress": False, "output_dir": out_dir, "checkpoint_every": 0}
    if args.model == "tiny":
        return GRPOTrainer(config_from_dict(cfg))
    import transformers
    from bench_trainer import IdTokenizer, RandomPromptTask, model_config

    mcfg = model_config("0.6b" if args.model == "0.6b" else "tiny")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(mcfg).to(
        device=args.device, dtype=torch.bfloat16 if gpu else torch.float32).eval()
    return GRPOTrainer(config_from_dict(cfg), model=model, tokenizer=IdTokenizer(),
                       task=RandomPromptTask(mcfg.vocab_size, args.prompt_len))


@torch.no_grad()
def _decode_host_ms(engine, clock: LayerClock, gpu: bool, reps: int = 20) -> float:
    """Host ms of one forward of DECODE_ROWS one-token sequences over the bank's adapters (median)."""
    ids = engine.adapter_ids
    adapters = torch.tensor([ids[k % len(ids)] for k in range(DECODE_ROWS)])
    device = next(engine.model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, engine.model.config.vocab_size, (DECODE_ROWS, 1), generator=gen)
    out = []
    with engine.use_adapters(adapters):
        engine.model(tokens.to(device))  # the routing and the kernel pairs, once per context
        for _ in range(reps):
            clock.reset()
            engine.model(tokens.to(device))
            if gpu:
                torch.cuda.synchronize()
            out.append(clock.host_ms_per_forward())
    return statistics.median(out)


def run_one(args, n_adapters: int) -> dict:
    """One adapter count, in this process: {metric: value}."""
    gpu = args.device == "cuda"
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_scaling_")
    t0 = time.perf_counter()
    trainer = _trainer(args, n_adapters, out_dir)
    build_s = time.perf_counter() - t0
    times, tokens = [], 0
    with LayerClock(exclude_kernels=not gpu) as clock:
        for step in range(args.steps + 1):
            if step == 1:
                clock.reset()  # the warm-up step (first routings, Triton compilation) is not counted
            t0 = time.perf_counter()
            out = trainer.step(step)
            if gpu:
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
                tokens += sum(r["tokens_step"] for r in out.values())
        host_step = clock.host_ms_per_forward()
        res_decode = _decode_host_ms(trainer.engine, clock, gpu)
    s_step = statistics.median(times)
    res = {"s_per_step": s_step, "adapter_steps_per_s": n_adapters / s_step,
           "tokens_per_s": tokens / sum(times), "host_ms_per_forward": host_step,
           "host_ms_per_decode": res_decode, "build_s": build_s}
    if gpu:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        res["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return res


def _child(args, n: int) -> dict:
    """``run_one`` in a fresh interpreter (max RSS is per process and never goes down)."""
    argv = [sys.executable, __file__, "--one", str(n), "--steps", str(args.steps), "--prompts", str(args.prompts),
            "--samples", str(args.samples), "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
            "--micro-batch", str(args.micro_batch), "--model", args.model, "--device", args.device,
            "--threads", str(args.threads)]
    if args.output_dir:
        argv += ["--output-dir", args.output_dir]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"error": f"exit {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def shape_of(args, n: int) -> str:
    return (f"adapters={n},model={args.model},ranks=1..8,prompts={args.prompts}x{args.samples},"
            f"C={args.new_tokens},micro={args.micro_batch},threads={args.threads or torch.get_num_threads()}")


def plot(csv_path: Path, out: Path, device: str | None = None) -> Path:
    """Four panels against the number of adapters, one line per git sha (before / after a change)."""
    import csv
    from collections import defaultdict

    from matplotlib.figure import Figure

    cells: dict = defaultdict(dict)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["op"] != OP or (device and device not in row["device"]):
                continue
            n = int(row["shape"].split(",")[0].split("=")[1])
            cells[(row["git_sha"], row["metric"])][n] = float(row["value"])
    shas = sorted({sha for sha, _ in cells})
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    panels = (("s_per_step", "s / step"), ("adapter_steps_per_s", "adapter-steps / s"),
              ("host_ms_per_forward", "host ms / forward outside kernels\n(solid: step average, dashed: decode)"),
              ("max_rss_gib", "max RSS (GPU: peak) GiB"))
    for ax, (metric, label) in zip(axes, panels):
        for k, sha in enumerate(shas):
            pts = sorted(cells.get((sha, metric), {}).items()) or sorted(cells.get((sha, "peak_gib"), {}).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sha, color=f"C{k}")
            decode = sorted(cells.get((sha, "host_ms_per_decode"), {}).items())
            if decode and metric == "host_ms_per_forward":
                ax.plot([p[0] for p in decode], [p[1] for p in decode], marker="x", ls="--", color=f"C{k}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("adapters")
        ax.set_ylabel(label)
        ax.legend(fontsize="small", title="git sha")
    fig.suptitle("GRPO step vs number of adapters (ranks 1..8, tokens per adapter fixed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="1,8,64,256,1024")
    p.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per adapter per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (random/0.6b models)")
    p.add_argument("--micro-batch", type=int, default=256, help="sequences per forward/backward (0: all)")
    p.add_argument("--model", choices=["tiny", "random", "0.6b"], default=None,
                   help="tiny: the embedded model (CPU default); 0.6b: the Qwen3-0.6B shape (GPU default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On 2 cores shared with other jobs, 1 thread "
                        "avoids OpenMP wake-ups: a 4,096-row masked select took 17 ms with 2, 0.03 ms with 1")
    p.add_argument("--in-process", action="store_true", help="no subprocess per count (max RSS is then cumulative)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per adapter count")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--plot", type=Path, default=HERE / "figures" / "scaling.png")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("0.6b" if args.device == "cuda" else "tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot_only:
        print(plot(args.csv, args.plot))
        return []
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return []
    rows, info = [], env_info()
    for n in [int(a) for a in args.adapters.split(",")]:
        res = run_one(args, n) if args.in_process else _child(args, n)
        if "error" in res:
            print(f"{n:5d} adapters: FAILED {res['error']}", flush=True)
            continue
        mem = res.get("max_rss_gib", res.get("peak_gib"))
        print(f"{n:5d} adapters: {res['s_per_step']:8.3f} s/step {res['adapter_steps_per_s']:8.2f} adapter-steps/s "
              f"{res['tokens_per_s']:9.0f} tok/s  host {res['host_ms_per_forward']:7.3f} ms/fwd "
              f"{res['host_ms_per_decode']:6.3f} ms/decode  "
              f"mem {mem:6.2f} GiB  build {res['build_s']:6.2f} s  ({info['device']})", flush=True)
        rows += [{"op": OP, "provider": "lora_engine", "shape": shape_of(args, n), "metric": k,
                  "value": f"{res[k]:.6g}"} for k in METRICS if k in res]
    if not args.no_csv and rows:
        append_rows(rows, args.csv)
        if os.environ.get("LORA_ENGINE_BENCH_QUICK") != "1":
            print(plot(args.csv, args.plot))
    return rows


if __name__ == "__main__":
    main()
