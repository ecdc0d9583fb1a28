"""An RL loop written against the Tinker SDK alone, run on lora-engine: 4 training clients of
ranks 1, 4, 16, 64 train at once on the tiny model's two-digit sums.

    export LORA_ENGINE_API_KEY=tml-$(openssl rand -hex 16)
    lora-engine serve --model tiny &                        # 127.0.0.1:8000
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=$LORA_ENGINE_API_KEY \\
        python examples/tinker_rl_loop.py --steps 40

Each client runs in its own thread: sample 8 prompts x 8 completions from its latest weights,
score them, group-normalise the rewards into advantages (GRPO), one forward_backward with the
"ppo" loss and one optim_step. The server batches the four clients' forward_backward calls into
one base forward + backward and their sampling into shared decoding batches. Advantages are
spread over each completion's tokens as A / (B * |o|), so Tinker's sum over tokens is the mean
over sequences of per-sequence means, the recipe of ``lora-engine train``. Only ``tinker`` talks
to the server; the task (prompts and the scorer) comes from lora_engine.rl.tasks.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import tinker
import torch
from tinker import types

from lora_engine.rl.tasks import TinyArithmeticTask


def accuracy(sampler, tok, task, n: int, max_tokens: int) -> float:
    """Held-out greedy accuracy: n sample calls in flight at once (the server batches them)."""
    problems = task.eval_set(n)
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[tok.eos_token_id])
    futures = [sampler.sample(types.ModelInput.from_ints(tok.encode(p["prompt"], add_special_tokens=False)), 1, params)
               for p in problems]
    texts = [tok.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures]
    return sum(task.score(problems, texts)) / n


def rl_datums(prompt: list[int], sequences, rewards: list[float], n_rows: int) -> list[types.Datum]:
    """One datum per completion with per-token advantages; empty when the group has no signal."""
    r = torch.tensor(rewards)
    adv = (r - r.mean()) / (r.std() + 1e-4)
    if float(adv.abs().max()) == 0.0:
        return []
    out = []
    for seq, a in zip(sequences, adv.tolist()):
        tokens, n_prompt = prompt + list(seq.tokens), len(prompt) - 1
        per_token = a / (n_rows * max(len(seq.tokens), 1))
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:],
                            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                            "advantages": [0.0] * n_prompt + [per_token] * len(seq.tokens)}))
    return out


def train_one(sc, rank: int, seed: int, args, results: dict) -> None:
    tc = sc.create_lora_training_client(base_model=args.base_model, rank=rank, seed=seed).result()
    tok = tc.get_tokenizer()
    task = TinyArithmeticTask(seed=0, pool=args.pool)
    sampler = tc.save_weights_and_get_sampling_client().result()
    before = accuracy(sampler, tok, task, args.eval, args.max_tokens)
    gen = torch.Generator().manual_seed(seed)
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop=[tok.eos_token_id], seed=None)
    for step in range(args.steps):
        problems = task.sample_train(args.prompts, gen)
        prompts = [tok.encode(p["prompt"], add_special_tokens=False) for p in problems]
        futures = [sampler.sample(types.ModelInput.from_ints(p), args.samples, params) for p in prompts]
        datums, reward_sum = [], 0.0
        for problem, prompt, fut in zip(problems, prompts, futures):
            seqs = fut.result().sequences
            rewards = task.score([problem] * len(seqs), [tok.decode(s.tokens, skip_special_tokens=True) for s in seqs])
            reward_sum += sum(rewards)
            datums += rl_datums(prompt, seqs, rewards, args.prompts * args.samples)
        if datums:
            tc.forward_backward(datums, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
            tc.optim_step(types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.999, grad_clip_norm=1.0))
        # Ordered after the step by seq_id: the next samples are on-policy.
        sampler = tc.save_weights_and_get_sampling_client().result()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"rank {rank:>2} step {step:>3}: reward {reward_sum / (args.prompts * args.samples):.3f}", flush=True)
    after = accuracy(sampler, tok, task, args.eval, args.max_tokens)
    results[rank] = {"before": before, "after": after}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="tiny", help="the name given to lora-engine serve --model")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per client per step")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--eval", type=int, default=200, help="held-out problems for the accuracy")
    ap.add_argument("--pool", type=int, default=2000, help="train problems to draw from")
    args = ap.parse_args(argv)
    if not os.environ.get("TINKER_BASE_URL"):
        raise SystemExit("set TINKER_BASE_URL (and TINKER_API_KEY) to the lora-engine serve address")

    t0, results, errors = time.time(), {}, []
    with tinker.ServiceClient() as sc:
        def run(rank, seed):
            try:
                train_one(sc, rank, seed, args, results)
            except Exception as e:  # report every client's failure, not just the first
                errors.append(f"rank {rank}: {type(e).__name__}: {e}")
        threads = [threading.Thread(target=run, args=(r, i)) for i, r in enumerate(args.ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    for rank in args.ranks:
        print(f"rank {rank:>2}: held-out greedy accuracy {results[rank]['before']:.3f} -> {results[rank]['after']:.3f}")
    print(f"{len(args.ranks)} clients x {args.steps} steps in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
