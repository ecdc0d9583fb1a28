"""Evaluation metrics over sampled completions: unbiased pass@k and avg@k; the end-of-run table."""
from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1..n} (1 - k / i)`` (Chen et al. 2021), which never forms the
    binomials (C(200, 100) ~ 9e58 overflows float arithmetic long before n gets large).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float], k: int | None = None) -> float:
    """avg@k: mean score of the first ``k`` samples of one problem (all of them if k is None).

    Average the result over problems for a benchmark number, as for pass@k.
    """
    k = len(scores) if k is None else k
    if not 1 <= k <= len(scores):
        raise ValueError(f"avg_at_k needs 1 <= k <= len(scores)={len(scores)}, got k={k}")
    return float(sum(float(s) for s in scores[:k]) / k)


def format_ok(completions: Sequence[str]):
    """[N] float tensor: 1 where a completion holds exactly one non-empty ``\\boxed{}`` (the
    boxed-format term's success: the "format rate" when averaged)."""
    import torch

    from lora_engine.rl.answers import count_boxes

    return torch.tensor([float(count_boxes(c) == 1) for c in completions])


class RewardLog:
    """One step's reward parts, format successes and verifier counts, read back per adapter."""

    def __init__(self, parts: dict, completions: Sequence[str], stats: dict):
        import torch

        self.parts = {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}
        self.total = sum(self.parts.values())
        self.format = format_ok(completions)
        self.stats = stats

    def columns(self, ids, num_slots: int) -> dict:
        """Per-slot means over the rows' adapter ids ``ids`` (a segmented sum, index_add, not a pass
        per adapter): ``reward_<part>`` (they sum to reward_mean) and ``format_rate``."""
        import torch

        n = torch.bincount(ids, minlength=num_slots).double()

        def mean(x):
            return torch.zeros(num_slots, dtype=torch.float64).index_add_(0, ids, x.double()) / n

        out = {f"reward_{k}": mean(v) for k, v in self.parts.items()}
        out["format_rate"] = mean(self.format)
        return out

    def counts(self, adapter: int) -> dict:
        """``verify_timeouts/errors/skipped`` of ``adapter``'s samples this step (a timeout is a
        hostile or runaway completion, scored 0)."""
        counts = self.stats[adapter].as_dict() if adapter in self.stats else {}
        return {f"verify_{k}": counts.get(k, 0) for k in ("timeouts", "errors", "skipped")}


def print_summary(summary: dict, ranks: Sequence[int]) -> None:
    """The held-out accuracy table a training run prints at its end (``summary.json``'s numbers)."""
    print(f"\nheld-out greedy accuracy (base model: {summary['base']:.3f})")
    print(f"{'adapter':>8} {'rank':>5} {'initial':>8} {'final':>8} {'gain':>8} {'tokens':>10}")
    for i, rank in enumerate(ranks):
        ini, fin = summary["initial"][str(i)]["pass@1"], summary["final"][str(i)]["pass@1"]
        print(f"{i:>8} {rank:>5} {ini:>8.3f} {fin:>8.3f} {fin - ini:>+8.3f} "
              f"{summary['tokens'].get(str(i), 0):>10}")
