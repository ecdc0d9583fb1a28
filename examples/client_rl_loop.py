"""Your own GRPO loop on the client API: several adapters, one base, tiny two-digit sums.

    python examples/client_rl_loop.py                       # built-in tiny model (built once, cached)
    python examples/client_rl_loop.py --model PATH --steps 50 --ranks 1 8 32

Each step samples every adapter's prompts in one decoding batch, queues one forward_backward per
adapter, and the first optim_step runs all of them in one base forward + backward. The recipe is
the trainer's (``lora-engine train``, loss_type="grpo"): token weights 1 / (B * |o_b|) turn the
client's sum over tokens into its mean over sequences of per-sequence means, and AdamW with
betas (0.9, 0.999) and gradient clipping at 1.
"""
from __future__ import annotations

import argparse

import torch

from lora_engine.interop.client import Client
from lora_engine.rl.models import load_base
from lora_engine.rl.tasks import TinyArithmeticTask


def accuracy(client, task, adapters, n: int, max_new_tokens: int) -> dict:
    """Held-out greedy accuracy per adapter (None = the base model), all in one batch."""
    problems = task.eval_set(n)
    owners = [a for a in adapters for _ in problems]
    out = client.sample([p["prompt"] for _ in adapters for p in problems], adapter=owners, greedy=True,
                        max_new_tokens=max_new_tokens)
    scores = task.score(problems * len(adapters), out.text)
    return {("base" if a is None else a.id): sum(scores[k * n:(k + 1) * n]) / n for k, a in enumerate(adapters)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="local HF model directory, or 'tiny'")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per adapter per step")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--eval", type=int, default=200, help="held-out problems for the accuracy")
    ap.add_argument("--pool", type=int, default=2000, help="train problems to draw from")
    args = ap.parse_args(argv)

    model, tokenizer = load_base(args.model, device="cpu")
    client = Client(model, tokenizer)
    task = TinyArithmeticTask(seed=0, pool=args.pool)
    adapters = [client.create_adapter(rank=r, alpha=32, seed=i) for i, r in enumerate(args.ranks)]
    before = accuracy(client, task, [None] + adapters, args.eval, args.max_new_tokens)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        problems = [p for a in adapters for p in task.sample_train(args.prompts, gen)]
        owners = [a for a in adapters for _ in range(args.prompts)]
        samples = client.sample([p["prompt"] for p in problems], adapter=owners, n=args.samples,
                                max_new_tokens=args.max_new_tokens)
        rewards = task.score([problems[j] for j in samples.prompt_index], samples.text)
        for a in adapters:
            rows = [k for k, owner in enumerate(samples.adapters) if owner is a]
            batch = samples.for_adapter(a).to_batch(rewards=[rewards[k] for k in rows])  # groups = prompts
            batch.weights /= batch.weights.sum(-1, keepdim=True).clamp(min=1) * len(rows)
            a.forward_backward(batch, loss="grpo")
        # The first optim_step runs every adapter's queued work in one base forward + backward.
        stats = [a.optim_step(lr=args.lr, betas=(0.9, 0.999), grad_clip=1.0) for a in adapters]
        means = {a.id: sum(rewards[k] for k, o in enumerate(samples.adapters) if o is a)
                 / (args.prompts * args.samples) for a in adapters}
        print(f"step {step}: reward {means}, grad norms {[round(s['grad_norm'], 4) for s in stats]}")
    after = accuracy(client, task, [None] + adapters, args.eval, args.max_new_tokens)
    print(f"held-out greedy accuracy before {before} after {after}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
