"""End-to-end GRPO step throughput with 1, 8 and 32 concurrent adapters on one base.

GPU: a Qwen3-architecture model of ~0.6B parameters (hidden 1024, 28 layers, 16 query / 8 KV
heads of 128, MLP 3072, vocab 151936) with random bf16 weights. CPU: a tiny model of the same
family (the numbers only show that the script runs). Prompts are random token ids; the reward
is a cheap function of the sampled tokens, so the loop does real GRPO work (rollout, log-probs,
fused loss, per-adapter AdamW) without a dataset or a tokenizer.

Sequences go through the forward/backward `--micro-batch` at a time (gradient accumulation).
Reports, per adapter count: tokens/s (prompt + completion tokens of all adapters' rollouts per
second of a whole step), seconds per step, and peak memory.

    python bench/bench_trainer.py                   # adapters 1,8,32
    python bench/bench_trainer.py --adapters 1,8 --steps 3
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import CSV_PATH, append_rows  # noqa: E402

from lora_engine.rl.config import config_from_dict  # noqa: E402
from lora_engine.rl.trainer import GRPOTrainer  # noqa: E402


class IdTokenizer:
    """Just what the trainer needs: ids in, 'strings' of ids out."""

    pad_token_id = 0
    eos_token_id = 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) > 1) for row in ids]


class RandomPromptTask:
    """Random prompts of a fixed length; reward = share of even token ids (varies per sample)."""

    def __init__(self, vocab: int, prompt_len: int):
        self.vocab, self.prompt_len = vocab, prompt_len

    def sample_train(self, n, generator):
        return [{"prompt": torch.randint(2, self.vocab, (self.prompt_len,), generator=generator).tolist(),
                 "answer": ""} for _ in range(n)]

    def eval_set(self, n):
        return self.sample_train(n, torch.Generator().manual_seed(0))

    def encode_prompt(self, tokenizer, problem):
        return problem["prompt"]

    def score(self, problems, completions):
        return [sum(int(t) % 2 == 0 for t in c.split()) / max(len(c.split()), 1) for c in completions]


def model_config(size: str):
    if size == "0.6b":
        return transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                        head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True)
    return transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                    max_position_embeddings=256)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="1,8,32")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step per adapter")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward/backward (default: 16 with the 0.6b model, else all)")
    p.add_argument("--model", choices=["0.6b", "tiny"], default=None,
                   help="0.6b: the Qwen3-0.6B shape (default on a GPU); tiny: 2 layers, vocab 512 (CPU default)")
    p.add_argument("--output-dir", default=None, help="trainer logs (default: a fresh temporary folder)")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    prompt_len = args.prompt_len or (256 if gpu else 8)
    new_tokens = args.new_tokens or (256 if gpu else 8)
    torch.manual_seed(0)
    size = args.model or ("0.6b" if gpu else "tiny")
    cfg = model_config(size)
    micro = args.micro_batch if args.micro_batch is not None else (16 if size == "0.6b" else 0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(
        device="cuda" if gpu else "cpu", dtype=torch.bfloat16 if gpu else torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_trainer_")
    rows = []
    for n_adapters in [int(a) for a in args.adapters.split(",")]:
        tcfg = config_from_dict({
            "adapters": [{"rank": args.rank, "seed": i, "lr": 1e-5} for i in range(n_adapters)],
            "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
            "max_new_tokens": new_tokens, "steps": args.steps + 1, "eval_problems": 1, "micro_batch_size": micro,
            "dtype": "bfloat16" if gpu else "float32", "progress": False, "output_dir": out_dir})
        trainer = GRPOTrainer(tcfg, model=model, tokenizer=IdTokenizer(), task=RandomPromptTask(cfg.vocab_size, prompt_len))
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens, wall = 0, 0.0
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            out = trainer.step(step)
            if gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if step == 0:
                continue  # warm-up: Triton compilation, cuBLAS heuristics
            tokens += sum(r["tokens_step"] for r in out.values())
            wall += dt
        # GPU: peak CUDA memory of this adapter count; CPU: the process's peak RSS so far (monotone).
        peak = (torch.cuda.max_memory_allocated() if gpu else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        tok_s = tokens / wall
        print(f"{n_adapters:3d} adapters (rank {args.rank}): {tok_s:10.1f} tokens/s  {wall / args.steps:7.2f} s/step  "
              f"{'peak' if gpu else 'max RSS'} {peak:6.2f} GiB  (base {n_params / 1e6:.0f}M params)")
        shape = f"adapters={n_adapters},model={size},rank={args.rank},prompts={args.prompts}x{args.samples},P={prompt_len},C={new_tokens},micro={micro}"
        mem_metric = "peak_gib" if gpu else "max_rss_gib"
        for metric, value in (("tokens_per_s", tok_s), ("s_per_step", wall / args.steps), (mem_metric, peak)):
            rows.append({"op": "grpo_step", "provider": "lora_engine", "shape": shape, "metric": metric,
                         "value": f"{value:.4f}"})
        trainer.engine.detach()
    if not args.no_csv:
        append_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
