"""A sweep's grid: the ``[grid]`` table (or ``[[grid]]`` tables) of a spec -> its runs.

One grid table is the product of its lists; ``[[grid]]`` (several tables) is the union of their
products, in order, a point an earlier table holds running once: study C's LoRA ranks x
regimes x seeds plus a full fine-tuning cell (``method = ["full"]``) at its own lr. A key a
table leaves out takes ``[fixed]``'s value (prompts_per_step, lr, alpha, reward_regime, popped
from ``fixed``: they are per-run values) or the default.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

GRID_KEYS = ("rank", "prompts_per_step", "seed", "lr", "method", "alpha", "reward_regime")


@dataclass(frozen=True)
class Run:
    rank: int
    prompts_per_step: int
    seed: int
    lr: float
    method: str
    alpha: float
    reward_regime: str = "outcome"

    @property
    def run_id(self) -> str:
        regime = "" if self.reward_regime == "outcome" else f"_{self.reward_regime}"  # older ids unchanged
        return f"r{self.rank}_p{self.prompts_per_step}_lr{self.lr:g}_{self.method}_a{self.alpha:g}{regime}_s{self.seed}"


def expand_grids(grids: list[dict], fixed: dict) -> list[Run]:
    """The runs of ``grids`` (one dict per grid table); pops the per-run keys from ``fixed``."""
    for grid in grids:
        bad = set(grid) - set(GRID_KEYS)
        if bad:
            raise ValueError(f"unknown grid key(s) {sorted(bad)}; grid keys: {GRID_KEYS}")
        if "rank" not in grid:
            raise ValueError("the grid needs a rank list, e.g. rank = [1, 4, 16]")
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"grid.{k} must be a non-empty list, got {v!r}")
    defaults = {"prompts_per_step": [fixed.pop("prompts_per_step", 8)], "seed": [0],
                "lr": [fixed.pop("lr", 1e-5)], "method": ["lora"], "alpha": [fixed.pop("alpha", 32.0)],
                "reward_regime": [fixed.pop("reward_regime", "outcome")]}
    runs: list[Run] = []
    for grid in grids:
        axes = [grid.get(k, defaults.get(k)) for k in GRID_KEYS]
        seen = set(runs)
        runs += [run for run in (Run(rank=int(r), prompts_per_step=int(p), seed=int(s), lr=float(lr), method=str(m),
                                     alpha=float(a), reward_regime=str(g))
                                 for r, p, s, lr, m, a, g in itertools.product(*axes))
                 if run not in seen]
    return runs
