"""PPO on the embedded tiny task raises every adapter's held-out greedy accuracy.

Measured on the 2 shared CPU cores (2026-12-01, under a load average of ~9): the fast run below
(2 adapters, 6 steps of 4 prompts x 8 samples, 50 held-out problems) went 0.380 -> 0.540 (rank 1)
and 0.380 -> 0.480 (rank 16) in 63 s wall; the slow one (examples/tiny_ppo.toml at 15 steps,
4 adapters, 100 problems) 0.440 -> 0.750 / 0.790 / 0.810 / 0.880 (ranks 1, 4, 16, 64).
Without an update greedy evaluation is deterministic (gain exactly 0).
"""
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from lora_engine.rl.config import config_from_dict, load_config  # noqa: E402
from lora_engine.rl.trainer import GRPOTrainer  # noqa: E402


def _gains(summary):
    return {a: summary["final"][a]["pass@1"] - summary["initial"][a]["pass@1"] for a in summary["final"]}


def test_ppo_raises_held_out_accuracy_of_every_adapter_on_the_tiny_task(tmp_path):
    cfg = config_from_dict({
        "model": "tiny", "task": "tiny", "algorithm": "ppo", "steps": 6, "prompts_per_step": 4,
        "samples_per_prompt": 8, "max_new_tokens": 8, "critic_lr": 1e-3, "eval_problems": 50,
        "checkpoint_every": 0, "output_dir": str(tmp_path), "progress": False,
        "adapters": [{"rank": 1, "lr": 3e-4, "seed": 0}, {"rank": 16, "lr": 3e-4, "seed": 1}]})
    gains = _gains(GRPOTrainer(cfg).fit())
    assert all(g >= 0.06 for g in gains.values()), gains  # 3 of 50 problems


@pytest.mark.slow
def test_the_tiny_ppo_example_raises_every_adapter_by_a_wide_margin(tmp_path):
    cfg = load_config(Path(__file__).parent.parent / "examples" / "tiny_ppo.toml", [f"output_dir={tmp_path}", "steps=15", "eval_problems=100",
                                                  "eval_every=0", "checkpoint_every=0", "progress=false"])
    gains = _gains(GRPOTrainer(cfg).fit())
    assert len(gains) == 4 and all(g >= 0.2 for g in gains.values()), gains
