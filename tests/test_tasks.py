"""Tasks: math data in every format with field mapping and splits, reasoning-gym settings,
few-shot selection, task loading errors, and the trainer on a math task end to end."""
import importlib.util
import json

import pytest
import torch

datasets = pytest.importorskip("datasets")

from lora_engine.rl.answers import gold_answer, worked_solution  # noqa: E402
from lora_engine.rl.tasks import MathTask, ReasoningGymTask, load_task  # noqa: E402
from lora_engine.rl.tasks.base import in_eval_split  # noqa: E402

GSM8K = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
          "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
         for a in range(1, 9) for b in range(1, 6)]
MATH = [{"problem": f"What is $\\frac{{1}}{{{k}}} + \\frac{{1}}{{{k}}}$?",
         "solution": f"Adding gives $\\frac{{2}}{{{k}}}$, so the answer is $\\boxed{{\\frac{{2}}{{{k}}}}}$.",
         "level": "Level 1"} for k in range(3, 43)]


def _write(rows, path, fmt):
    """``rows`` as a file (jsonl, json, parquet, csv) or a save_to_disk folder (disk, diskdict)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif fmt == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "diskdict":
        half = len(rows) // 2
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:half]),
                              "test": datasets.Dataset.from_list(rows[half:])}).save_to_disk(str(path))
    return path


FORMATS = ["jsonl", "json", "parquet", "csv", "disk"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gsm8k_format_in_every_file_format(tmp_path, fmt):
    path = _write(GSM8K, tmp_path / f"gsm8k.{fmt}", fmt)
    task = load_task(f"math:{path}", seed=0)
    problems = task.train + task.eval
    assert len(problems) == len(GSM8K) and task.eval and task.train
    by_q = {r["question"]: r for r in GSM8K}
    for p in problems:
        ref = by_q[p["prompt"]]
        assert p["answer"] == ref["answer"].rsplit("#### ", 1)[1] and p["solution"] == ref["answer"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_math_format_boxed_inside_the_solution(tmp_path, fmt):
    task = MathTask(str(_write(MATH, tmp_path / f"math.{fmt}", fmt)))
    got = {p["prompt"]: p["answer"] for p in task.train + task.eval}
    assert got[MATH[0]["problem"]] == "\\frac{2}{3}" and len(got) == len(MATH)


@pytest.mark.parametrize("reference, gold", [
    pytest.param("3 + 4 = 7\n#### 7", "7", id="gsm8k"),
    pytest.param("#### 1,234", "1234", id="gsm8k-thousands"),
    pytest.param("#### -3.5", "-3.5", id="gsm8k-negative"),
    pytest.param("so $\\boxed{\\frac{1}{2}}$ and not \\boxed{1}... wait \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", id="math"),
    pytest.param("  42 ", "42", id="bare"),
    pytest.param("x^2 + 1", "x^2 + 1", id="bare-expression"),
])
def test_gold_answer(reference, gold):
    assert gold_answer(reference) == gold


def test_worked_solution_for_few_shot():
    assert worked_solution("He has 3+4=<<3+4=7>>7.\n#### 7", "7") == "He has 3+4=7.\nThe answer is \\boxed{7}."
    assert worked_solution("so \\boxed{2}.", "2") == "so \\boxed{2}."
    assert worked_solution("2", "2") == "The answer is \\boxed{2}."


def test_field_mapping_options_and_errors(tmp_path):
    rows = [{"q": f"{i} + 1?", "gold_value": str(i + 1), "id": i} for i in range(30)]
    path = _write(rows, tmp_path / "custom.jsonl", "jsonl")
    with pytest.raises(ValueError, match=r"no question field among \['gold_value', 'id', 'q'\].*question_field"):
        load_task(f"math:{path}")
    task = load_task(f"math:{path}", options={"question_field": "q", "answer_field": "gold_value"})
    assert {p["prompt"]: p["answer"] for p in task.train + task.eval}["3 + 1?"] == "4"
    with pytest.raises(ValueError, match="no field 'nope'"):
        load_task(f"math:{path}", options={"question_field": "nope"})
    with pytest.raises(ValueError, match="unknown task_options"):
        load_task(f"math:{path}", options={"question_feild": "q"})
    with pytest.raises(ValueError, match="does not exist"):
        load_task(f"math:{tmp_path / 'missing.jsonl'}")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data format"):
        load_task(f"math:{tmp_path / 'data.txt'}")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_task(f"math:{tmp_path / 'folder'}")


def test_split_is_fixed_seeded_and_disjoint(tmp_path):
    rows = GSM8K + GSM8K[:10]  # duplicated questions must land in one split only
    path = _write(rows, tmp_path / "dup.jsonl", "jsonl")
    a, b = load_task(f"math:{path}", seed=0), load_task(f"math:{path}", seed=0)
    assert a.train == b.train and a.eval == b.eval
    assert {p["prompt"] for p in a.train}.isdisjoint({p["prompt"] for p in a.eval})
    assert len({p["prompt"] for p in a.eval}) == len(a.eval)  # eval problems are distinct
    other = load_task(f"math:{path}", seed=1)
    assert {p["prompt"] for p in other.eval} != {p["prompt"] for p in a.eval}
    wide = load_task(f"math:{path}", options={"eval_fraction": 0.5})
    assert len(wide.eval) > len(a.eval)
    assert all(in_eval_split(p["prompt"], 0, 0.1) for p in a.eval)


def test_separate_eval_data_and_datasetdict_splits(tmp_path):
    train = _write(GSM8K, tmp_path / "train.jsonl", "jsonl")
    test = _write(MATH[:5], tmp_path / "test.parquet", "parquet")
    task = load_task(f"math:{train}", eval_data=str(test))
    assert len(task.train) == len(GSM8K) and [p["answer"] for p in task.eval][0] == "\\frac{2}{3}"
    folder = _write(GSM8K, tmp_path / "dd", "diskdict")
    task = load_task(f"math:{folder}")
    assert len(task.train) == len(GSM8K) // 2 and len(task.eval) == len(GSM8K) - len(GSM8K) // 2
    with pytest.raises(ValueError, match="not 'validation'"):
        load_task(f"math:{folder}", options={"split": "validation"})


def test_seeded_sampling_and_few_shot(tmp_path):
    path = _write(GSM8K, tmp_path / "gsm8k.jsonl", "jsonl")
    task = load_task(f"math:{path}", few_shot=2)
    shots = task.prompt.few_shot
    assert len(shots) == 2 and all(s[1].endswith("}.") and "<<" not in s[1] for s in shots)
    assert not {q for q, _ in shots} & {p["prompt"] for p in task.train + task.eval}  # shots leave the pool
    draw = [task.sample_train(5, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    with pytest.raises(ValueError, match="few_shot must be"):
        load_task(f"math:{path}", few_shot=10_000)


def test_reasoning_gym_settings_from_options():
    pytest.importorskip("reasoning_gym")
    task = load_task("reasoning_gym:basic_arithmetic", seed=0,
                     options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                              "operators": ["+"], "allow_parentheses": False, "size": 300,
                              "eval_size": 200})
    assert isinstance(task, ReasoningGymTask)
    for p in task.train[:50] + task.eval:
        e = p["entry"]["metadata"]["expression"]
        x, y = (int(t) for t in e.split("+"))
        assert abs(x) <= 10 and abs(y) <= 10 and p["answer"] == str(x + y)  # rg: "1 digit" is -10..10
    # a space of 100 questions: the held-out ones never appear in training
    assert task.eval and {p["prompt"] for p in task.eval}.isdisjoint({p["prompt"] for p in task.train})
    with pytest.raises(ValueError, match="not settings of reasoning-gym's 'basic_arithmetic'.*min_terms"):
        load_task("reasoning_gym:basic_arithmetic", options={"min_termz": 2})
    with pytest.raises(ValueError, match="rejected task_options"):
        load_task("reasoning_gym:basic_arithmetic", options={"min_terms": 0})
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        load_task("reasoning_gym:no_such_dataset")


@pytest.mark.parametrize("name, kw, match", [
    pytest.param("nope", {}, "unknown task", id="unknown"),
    pytest.param("math:", {}, "unknown task", id="no-path"),
    pytest.param("tiny", {"few_shot": 2}, "its own prompts", id="tiny-options"),
    pytest.param("tiny", {"scorer": "nope"}, "scorer must be", id="bad-scorer"),
])
def test_load_task_errors(name, kw, match):
    with pytest.raises(ValueError, match=match):
        load_task(name, **kw)


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="champ-dataset not installed")
def test_champ_eval_set_when_installed():
    from lora_engine.rl.tasks.math import champ_problems

    problems = champ_problems()
    assert len(problems) == 270 and all(p["prompt"] and p["answer"] for p in problems)


def test_trainer_on_a_gsm8k_file_logs_every_reward_part(tmp_path):
    """``task = "math:PATH"`` through the config: math-verify scores, the parts sum to the reward."""
    from test_trainer import _model

    from lora_engine.rl.config import config_from_dict
    from lora_engine.rl.tiny_model import build_tokenizer
    from lora_engine.rl.trainer import GRPOTrainer

    path = _write(GSM8K, tmp_path / "gsm8k.jsonl", "jsonl")
    tok = build_tokenizer()
    cfg = config_from_dict({"task": f"math:{path}", "adapters": [{"rank": 2, "seed": 0}, {"rank": 4, "seed": 1}],
                            "steps": 1, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                            "eval_problems": 3, "output_dir": str(tmp_path / "run"), "progress": False,
                            "format_weight": 1.0, "length_weight": 0.5, "instruction": "Box it.",
                            "rollout_batch_size": 3, "answer_extractors": ["boxed", "last_number"]})
    tr = GRPOTrainer(cfg, model=_model(tok), tokenizer=tok)
    rows = tr.step(0)
    for a, r in rows.items():
        parts = r["reward_correct"] + r["reward_format"] + r["reward_length"]
        assert parts == pytest.approx(r["reward_mean"], abs=1e-6)
        assert -0.1 - 1e-6 <= r["reward_format"] <= 0.1 + 1e-6 and -0.5 - 1e-6 <= r["reward_length"] <= 0.0
        assert {"verify_timeouts", "verify_errors", "verify_skipped"} <= set(r)
    ev = tr.evaluate()
    assert set(ev[0]) >= {"pass@1", "format_rate"}


def test_reward_log_columns_are_per_adapter_means():
    """The log's reward parts and format rate are segmented means over interleaved adapter rows."""
    import torch

    from lora_engine.rl.metrics import RewardLog
    from lora_engine.rl.rewards import RewardStats

    texts = [r"\boxed{1}", "no box", r"\boxed{2}", r"\boxed{3} \boxed{4}", r"\boxed{5}"]
    ids = torch.tensor([2, 0, 2, 0, 2])
    stats = {0: RewardStats(), 2: RewardStats()}
    stats[2].add("errors")
    log = RewardLog({"correct": [1.0, 0.0, 0.0, 1.0, 1.0], "format": [0.1, -0.1, 0.1, 0.0, 0.1]}, texts, stats)
    cols = log.columns(ids, 3)
    assert cols["reward_correct"][[0, 2]].tolist() == pytest.approx([0.5, 2 / 3])
    assert cols["reward_format"][[0, 2]].tolist() == pytest.approx([-0.05, 0.1])
    assert cols["format_rate"][[0, 2]].tolist() == pytest.approx([0.0, 1.0])
    assert log.counts(2) == {"verify_timeouts": 0, "verify_errors": 1, "verify_skipped": 0}
    assert log.counts(1) == {"verify_timeouts": 0, "verify_errors": 0, "verify_skipped": 0}
