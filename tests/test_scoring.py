"""Scoring table: answer extraction, math-verify on the extracted answer (equivalent forms,
wrong answers, word golds), hostile completions that time out, exact and reasoning-gym scorers."""
import pytest

pytest.importorskip("math_verify")

from lora_engine.rl.answers import extract_last_number, make_extractor  # noqa: E402
from lora_engine.rl.rewards import RewardStats  # noqa: E402
from lora_engine.rl.tasks.scoring import AnswerScorer, is_word  # noqa: E402

# (completion, gold, expected) under the default extractors (boxed, then <answer>).
TABLE = [
    # equivalent forms
    pytest.param(r"so \boxed{\frac{1}{2}}", "0.5", 1.0, id="fraction-vs-decimal"),
    pytest.param(r"\boxed{0.5}", r"\frac12", 1.0, id="decimal-vs-short-frac"),
    pytest.param(r"\boxed{\dfrac{3}{4}}", "3/4", 1.0, id="dfrac-vs-slash"),
    pytest.param(r"\boxed{1,000}", "1000", 1.0, id="thousands-comma"),
    pytest.param(r"\boxed{x = 5}", "5", 1.0, id="equation"),
    pytest.param(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0, id="surd"),
    pytest.param(r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0, id="pi"),
    pytest.param(r"\boxed{(x+1)^2}", "x^2 + 2x + 1", 1.0, id="polynomial"),
    pytest.param(r"\boxed{5\text{ cm}}", "5", 1.0, id="units"),
    pytest.param(r"\boxed{50\%}", "0.5", 1.0, id="percent"),
    pytest.param("<answer>7</answer>", "7", 1.0, id="answer-tag"),
    pytest.param(r"\boxed{3} then \boxed{7}", "7", 1.0, id="last-box"),
    # wrong answers
    pytest.param(r"\boxed{8}", "7", 0.0, id="wrong"),
    pytest.param(r"\boxed{-7}", "7", 0.0, id="sign"),
    pytest.param(r"\boxed{0.33}", r"\frac{1}{3}", 0.0, id="rounded"),
    pytest.param(r"\boxed{7} then \boxed{3}", "7", 0.0, id="last-box-wrong"),
    pytest.param("The answer is 7.", "7", 0.0, id="no-box-no-answer"),
    pytest.param(r"\boxed{}", "7", 0.0, id="empty-box"),
    # word golds: compared as strings (math-verify calls "silent" equal to "listen")
    pytest.param(r"\boxed{Paris}", "Paris", 1.0, id="word"),
    pytest.param(r"\boxed{silent}", "listen", 0.0, id="anagram"),
]


def test_math_verify_scoring_table():
    scorer = AnswerScorer("math_verify", timeout=60.0)  # generous: the machine may be busy
    completions, golds, expected = zip(*[p.values for p in TABLE])
    stats = RewardStats()
    got = scorer([{"prompt": "", "answer": g} for g in golds], list(completions), stats=stats)
    bad = [(p.id, g, e) for p, g, e in zip(TABLE, got, expected) if g != e]
    assert not bad, f"(case, got, expected): {bad}"
    assert stats.timeouts == 0 and stats.errors == 0 and stats.skipped == 2  # the two word golds


@pytest.mark.parametrize("completion", [
    pytest.param(r"\boxed{9^{9^{9^{9}}}}", id="power-tower"),
    pytest.param(r"\boxed{(10^{10})!}", id="huge-factorial"),
])
def test_hostile_completions_time_out_to_zero_and_are_counted(completion):
    scorer = AnswerScorer("math_verify", timeout=1.0)
    scorer([{"prompt": "", "answer": "1"}], [r"\boxed{1}"])  # workers up outside the deadline
    hostile = RewardStats()
    assert scorer([{"prompt": "", "answer": "5"}], [completion], stats=[hostile]) == [0.0]
    assert hostile.timeouts == 1 and hostile.errors == 1
    # the killed worker was replaced; a benign check (its own, generous deadline: a busy
    # machine can take over a second for sympy) still passes and counts nothing
    fine = RewardStats()
    assert AnswerScorer("math_verify", timeout=60.0)([{"prompt": "", "answer": "5"}], [r"\boxed{5}"],
                                                     stats=[fine]) == [1.0]
    assert fine.as_dict() == {"samples": 1, "skipped": 0, "errors": 0, "timeouts": 0}


def test_last_number_is_an_opt_in_fallback():
    problems = [{"prompt": "", "answer": "1234"}] * 3
    texts = ["so the total is 1,234.", r"\boxed{1234}", "I do not know"]
    assert AnswerScorer("math_verify", timeout=60.0)(problems, texts) == [0.0, 1.0, 0.0]
    with_fallback = AnswerScorer("math_verify", ["boxed", "last_number"], timeout=60.0)
    assert with_fallback(problems, texts) == [1.0, 1.0, 0.0]
    assert extract_last_number("x = -3.5, then 12/4.") == "12/4"
    assert extract_last_number("costs $1,000,000 and 1,2,3") == "3"
    with pytest.raises(ValueError, match="answer extractors"):
        make_extractor(["boxd"])


def test_exact_and_reasoning_gym_scorers():
    problems = [{"prompt": "", "answer": "-4"}] * 3
    texts = [r"\boxed{-4}", r"\boxed{-4.0}", r"\boxed{24 + -28}"]
    assert AnswerScorer("exact")(problems, texts) == [1.0, 0.0, 0.0]
    assert AnswerScorer("math_verify", timeout=60.0)(problems, texts) == [1.0, 1.0, 1.0]  # equal as numbers
    pytest.importorskip("reasoning_gym")
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0)[0]
    rg = AnswerScorer("reasoning_gym", dataset="basic_arithmetic")
    got = rg([{"prompt": entry["question"], "answer": entry["answer"], "entry": entry}] * 2,
             [rf"\boxed{{{entry['answer']}}}", r"\boxed{nonsense}"])
    assert got == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs a reasoning-gym task"):
        AnswerScorer("reasoning_gym")


@pytest.mark.parametrize("gold, word", [("Paris", True), ("apple, banana", True), ("x^2 + 1", False),
                                        (r"\frac{\pi}{2}", False), (r"5\text{ cm}", False), ("A", False)])
def test_is_word(gold, word):
    assert is_word(gold) is word
