"""The embedded default: tokenizer, task splits, scorer, forgetful teacher, cached build."""
import json
import random

import pytest
import torch

pytest.importorskip("reasoning_gym")

from lora_engine.rl import tiny_model as tiny  # noqa: E402
from lora_engine.rl.tasks import tiny as tiny_task  # noqa: E402
from lora_engine.rl.tiny_model import build_tiny_model, build_tokenizer, evaluate  # noqa: E402
from lora_engine.rl.tasks.tiny import make_problems, score  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", [
    pytest.param("47+38=\\boxed{85}", id="task"),
    pytest.param("Hello, world!\n  x = {1, 2}; \\boxed", id="ascii"),
    pytest.param("", id="empty"),
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_character_level_with_boxed_as_one_token(tokenizer):
    ids = tokenizer("47+38=\\boxed{85}", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["4", "7", "+", "3", "8", "=", "\\boxed{", "8", "5", "}"]
    assert tokenizer("1+2=")["input_ids"] == tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    assert {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id} == {0, 1, 2}
    batch = tokenizer(["1+2=", "10+20="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2  # left padding, for generation


def test_problems_are_compact_deterministic_and_splits_disjoint():
    train = make_problems(2000, seed=0, split="train")
    held_out = make_problems(300, seed=0, split="eval")
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held_out})
    assert len({p["prompt"] for p in held_out}) == 300  # eval prompts are distinct
    assert make_problems(50, seed=0, split="eval") == held_out[:50]  # a larger n extends a smaller
    assert make_problems(10, seed=1, split="train") != train[:10]
    for p in train[:20] + held_out[:20]:
        x, y = tiny_task.operands(p["prompt"])
        assert 0 <= x <= 100 and 0 <= y <= 100 and p["answer"] == str(x + y) == p["entry"]["answer"]


@pytest.mark.parametrize("kwargs, match", [
    pytest.param({"n": 5, "split": "test"}, "split", id="split"),
    pytest.param({"n": -1}, "n must", id="negative-n"),
    pytest.param({"n": 10_000, "split": "eval"}, "n must", id="eval-too-large"),
    pytest.param({"n": 5, "seed": -1}, "seed", id="seed"),
])
def test_make_problems_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_problems(**kwargs)


@pytest.mark.parametrize("completion, expected", [
    pytest.param("\\boxed{85}", 1.0, id="right"),
    pytest.param("\\boxed{ 85 }", 1.0, id="spaces"),
    pytest.param("\\boxed{12}\\boxed{85}", 1.0, id="last-box-counts"),
    pytest.param("\\boxed{84}", 0.0, id="wrong"),
    pytest.param("\\boxed{185}", 0.0, id="superstring-no-partial-credit"),
    pytest.param("85", 0.0, id="no-box"),
    pytest.param("\\boxed{85", 0.0, id="unclosed"),
    pytest.param("", 0.0, id="empty"),
])
def test_score(completion, expected):
    problem = {"prompt": "47+38=", "answer": "85", "entry": {"answer": "85"}}
    assert score(completion, problem) == expected
    assert score(completion, "85") == expected
    assert score(completion, problem["entry"]) == expected


def test_score_rejects_bad_reference():
    with pytest.raises(ValueError, match="entry_or_answer"):
        score("\\boxed{1}", 1)


def test_forgetful_teacher_drops_only_carries():
    assert tiny_task.forgot_carry(47, 38) == 75 and tiny_task.forgot_carry(97, 33) == 120
    assert tiny_task.forgot_carry(12, 34) == 46
    assert tiny_task.has_carry("47+38=") and not tiny_task.has_carry("12+34=")
    rng = random.Random(0)
    answers = [tiny_task.teacher_answer({"prompt": "47+38=", "answer": "85"}, rng, 0.8) for _ in range(2000)]
    assert set(answers) == {"75", "85"} and 0.75 < answers.count("75") / 2000 < 0.85
    assert {tiny_task.teacher_answer({"prompt": "12+34=", "answer": "46"}, rng) for _ in range(50)} == {"46"}


def test_evaluate_rejects_bad_input(tokenizer):
    model = tiny.make_model(tokenizer)
    problems = make_problems(2, split="eval")
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tokenizer, [])
    with pytest.raises(ValueError, match="temperature"):
        evaluate(model, tokenizer, problems, greedy=False, temperature=0.0)


def test_build_caches_and_loads_offline(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_tiny_model(cache_dir=tmp_path, steps=3, progress=False, eval_problems=4)
    assert path == str(tiny.cache_path(tmp_path, steps=3)) and path != str(tiny.cache_path(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[1]]  # no temp dir left
    record = json.loads((tmp_path / path.rsplit("/", 1)[1] / tiny.RECIPE_FILE).read_text())
    assert record["recipe"]["train"]["steps"] == 3 and 0.0 <= record["eval_greedy_accuracy"] <= 1.0

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tok)
    assert tok.decode(tok("47+38=\\boxed{85}")["input_ids"]) == "47+38=\\boxed{85}"
    assert tok.padding_side == "left" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert 0.0 <= evaluate(model, tok, make_problems(4, split="eval"), greedy=False, n=2) <= 1.0

    # A second call returns the cache without rebuilding; force rebuilds the same weights.
    mtime = (tmp_path / path.rsplit("/", 1)[1] / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cache_dir=tmp_path, steps=3, progress=False) == path
    assert (tmp_path / path.rsplit("/", 1)[1] / "model.safetensors").stat().st_mtime_ns == mtime
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_tiny_model(cache_dir=tmp_path, steps=3, force=True, progress=False, eval_problems=0)
    rebuilt = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(before[k], rebuilt[k]) for k in before)


def test_build_leaves_caller_state_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(cache_dir=tmp_path, steps=1, progress=False, eval_problems=2)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_CACHE", str(tmp_path))
    assert tiny.cache_path().parent == tmp_path
    with pytest.raises(ValueError, match="steps"):
        tiny.cache_path(steps=-1)
