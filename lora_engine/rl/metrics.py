"""Evaluation metrics over sampled completions: unbiased pass@k and avg@k."""
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

    def row(self, adapter: int, rows) -> dict:
        """Log fields of ``adapter`` (its sample indices ``rows``): ``reward_<part>`` means that sum to
        reward_mean, ``format_rate``, and ``verify_timeouts/errors/skipped`` (a timeout is a hostile
        or runaway completion, scored 0)."""
        out = {f"reward_{k}": float(v[rows].mean()) for k, v in self.parts.items()}
        out["format_rate"] = float(self.format[rows].mean())
        counts = self.stats[adapter].as_dict() if adapter in self.stats else {}
        out.update({f"verify_{k}": counts.get(k, 0) for k in ("timeouts", "errors", "skipped")})
        return out
