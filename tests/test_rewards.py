"""Rewards: boxed answers, math-verify (timeouts, threads, crashes), reasoning-gym, pass@k."""
import itertools
import math
import os
import signal
import threading
import time
from functools import partial

import pytest

from lora_engine.rl.metrics import avg_at_k, pass_at_k
from lora_engine.rl.rewards import (
    RewardStats,
    boxed_format_reward,
    combine,
    extract_boxed,
    length_penalty,
    math_verify_reward,
    reasoning_gym_reward,
)
from lora_engine.rl.verifier import VerifyPool


def _call(fn, completions, answers, **kw):
    return fn([""] * len(completions), completions, answers, **kw)


# --- boxed answers --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    pytest.param(r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}", id="nested-braces"),
    pytest.param(r"\boxed{\boxed{3}}", "3", id="box-in-box"),
    pytest.param(r"\boxed{\boxed{1}+1}", r"\boxed{1}+1", id="box-inside-expression"),
    pytest.param(r"\boxed{1} no, \boxed{2}", "2", id="last-wins"),
    pytest.param(r"\boxed{\{1, 2\}}", r"\{1, 2\}", id="escaped-set-braces"),
    pytest.param(r"\boxed {7}", "7", id="space-before-brace"),
    pytest.param(r"\boxed{3 and then \boxed{4}", "4", id="unclosed-then-closed"),
    pytest.param(r"\boxed{3", None, id="unclosed"),
    pytest.param("the answer is 3", None, id="no-box"),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_boxed_format_reward():
    completions = [r"\boxed{4}", "4", r"\boxed{\boxed{4}}", r"\boxed{3} or \boxed{4}", r"\boxed{ }", None]
    stats = RewardStats()
    assert _call(boxed_format_reward, completions, ["4"] * 6, stats=stats) == [0.1, -0.1, 0.1, 0.0, -0.1, -0.1]
    assert stats.errors == 1 and stats.samples == 6
    custom = partial(boxed_format_reward, bonus=1.0, missing=-2.0, multiple=-0.5)
    assert _call(custom, completions[:4], ["4"] * 4) == [1.0, -2.0, 1.0, -0.5]


# --- length penalty -------------------------------------------------------------------------

def test_length_penalty_values():
    # soft cap 80, buffer 20: 0 up to 80, linear to -coef at 100, -coef beyond
    pen = length_penalty(100, buffer=20, coef=0.5)
    lengths = [10, 80, 90, 100, 150]
    assert _call(pen, ["x"] * 5, ["a"] * 5, completion_lengths=lengths) == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.5])
    by_chars = length_penalty(10, buffer=5, coef=1.0, length_fn=len)
    assert _call(by_chars, ["abc", "abcdefgh", "a" * 12], ["a"] * 3) == pytest.approx([0.0, -0.6, -1.0])
    with pytest.raises(ValueError, match="completion_lengths"):
        _call(pen, ["x"], ["a"])
    with pytest.raises(ValueError, match="buffer"):
        length_penalty(10, buffer=11)


# --- math-verify --------------------------------------------------------------------------

MATH_CASES = [
    pytest.param(r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0, id="frac"),
    pytest.param(r"\boxed{0.5}", "1/2", 1.0, id="decimal-vs-fraction"),
    pytest.param(r"\boxed{\boxed{3}}", "3", 1.0, id="box-in-box"),
    pytest.param(r"\boxed{5\text{ cm}}", "5", 1.0, id="units"),
    pytest.param(r"\boxed{x^2+1}", "x^2 + 1", 1.0, id="bare-expression-gold"),
    pytest.param(r"\boxed{1}", "x^2 + 1", 0.0, id="not-the-last-number"),
    pytest.param(r"I think $5$. \boxed{4}", "4", 1.0, id="box-beats-earlier-math"),
    pytest.param(r"\boxed{7}", "8", 0.0, id="wrong"),
    pytest.param("I am not sure.", "5", 0.0, id="no-answer"),
    pytest.param(r"\boxed{4}", r"so $x=4$, hence \boxed{4}.", 1.0, id="solution-text-gold"),
    pytest.param(r"\boxed{1}", r"\frac{", None, id="unparsable-gold"),
    pytest.param(r"\boxed{1}", "", None, id="empty-gold"),
]


def test_math_verify_reward_table():
    completions, golds, expected = zip(*[p.values for p in MATH_CASES])
    stats = RewardStats()
    got = _call(math_verify_reward, list(completions), list(golds), stats=stats)
    bad = [(p.id, g, e) for p, g, e in zip(MATH_CASES, got, expected) if g != e]
    assert not bad, f"(case, got, expected): {bad}"
    assert stats.as_dict() == {"samples": len(MATH_CASES), "skipped": 2, "errors": 0, "timeouts": 0}


def test_math_verify_malformed_completion_is_a_counted_error():
    stats = RewardStats()
    assert _call(math_verify_reward, [None, r"\boxed{2}"], ["2", "2"], stats=stats) == [0.0, 1.0]
    assert stats.errors == 1 and stats.timeouts == 0


def test_math_verify_timeout_then_recovers():
    # sympy tries to evaluate 9^(9^(9^9)) (a number with ~10^8 digits) and never returns in time
    _call(math_verify_reward, [r"\boxed{1}"], ["1"])  # start the workers outside the timing
    stats = RewardStats()
    t0 = time.monotonic()
    got = _call(math_verify_reward, [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{5}"], ["5", "5"], stats=stats, timeout=1.0)
    elapsed = time.monotonic() - t0
    assert got == [0.0, 1.0]
    assert stats.timeouts == 1 and stats.errors == 1
    assert elapsed < 1.0 + 2.0, f"took {elapsed:.1f} s for a 1 s bound"
    # the killed worker was replaced: the pool keeps answering
    assert _call(math_verify_reward, [r"\boxed{6}"] * 3, ["6"] * 3, timeout=5.0) == [1.0] * 3


def test_math_verify_from_a_worker_thread():
    out, errors = [], []

    def run():
        try:
            out.append(_call(math_verify_reward, [r"\boxed{\frac{2}{4}}", r"\boxed{3}"], ["1/2", "2"]))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=60)
    assert not errors and out == [[1.0, 0.0]]


def test_worker_crash_is_a_counted_error():
    pool = VerifyPool(workers=1)
    try:
        assert pool.check([("2", r"\boxed{2}")], timeout=5.0) == [("ok", 1.0)]  # workers are up
        pid = pool._workers[0].proc.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        stats = RewardStats()
        got = _call(math_verify_reward, [r"\boxed{9^{9^{9^{9}}}}"], ["5"], pool=pool, timeout=30.0, stats=stats)
        assert got == [0.0] and stats.errors == 1 and stats.timeouts == 0
        assert time.monotonic() - t0 < 5.0
        assert pool.check([("3", r"\boxed{3}")], timeout=5.0) == [("ok", 1.0)]
    finally:
        pool.close()


def test_mismatched_lengths_name_the_fix():
    with pytest.raises(ValueError, match="once per completion"):
        math_verify_reward(["p"], [r"\boxed{1}", r"\boxed{2}"], ["1", "2"])


# --- reasoning-gym --------------------------------------------------------------------------

def test_reasoning_gym_chain_sum():
    import reasoning_gym

    data = reasoning_gym.create_dataset("chain_sum", size=2, seed=7)
    entries = [data[0], data[0], data[1], data[1]]
    answers = [e["answer"] for e in entries]
    wrong = str(int(entries[2]["answer"]) + 1)
    completions = [f"<answer>{answers[0]}</answer>", "<answer>nope</answer>",
                   rf"so \boxed{{{answers[2]}}}", f"<answer>{wrong}</answer>"]
    reward = reasoning_gym_reward("chain_sum")
    stats = RewardStats()
    assert _call(reward, completions, answers, entries=entries, stats=stats) == [1.0, 0.0, 1.0, 0.0]
    assert stats.samples == 4 and stats.errors == 0
    # no entries: exact match of the extracted answer against the answer string
    assert _call(reward, completions, answers) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not registered"):
        reasoning_gym_reward("no_such_task")


# --- combine ------------------------------------------------------------------------------

def test_combine_weights_and_skips():
    def const(value):
        return lambda prompts, completions, answers, **kw: [value(i) for i in range(len(completions))]

    f = const(lambda i: float(i))
    g = const(lambda i: None if i == 1 else 1.0)
    total = combine((2.0, f), (0.5, g), f)
    assert _call(total, ["a", "b", "c"], ["x"] * 3) == [0.5, None, 6.5]

    bad = const(lambda i: 0.0)
    short = lambda prompts, completions, answers, **kw: [0.0]  # noqa: E731
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        _call(combine(bad, short), ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="weight, function"):
        combine((1.0, 2.0))


def test_combine_forwards_stats_to_builtins():
    reward = combine((1.0, math_verify_reward), (1.0, boxed_format_reward), length_penalty(10, buffer=5, coef=1.0))
    stats = RewardStats()
    got = _call(reward, [r"\boxed{2}", "2"], ["2", "2"], completion_lengths=[2, 8], stats=stats)
    assert got == pytest.approx([1.1, 1.0 - 0.1 - 0.6])
    assert stats.samples == 6  # two samples seen by each of the three parts


# --- evaluation metrics ---------------------------------------------------------------------

def _pass_at_k_brute(n, c, k):
    """Share of k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_bad_input():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-12)
    for args in [(4, 5, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*args)


def test_avg_at_k():
    assert avg_at_k([1, 0, 1, 1]) == 0.75
    assert avg_at_k([1, 0, 1, 1], k=2) == 0.5
    with pytest.raises(ValueError, match="1 <= k"):
        avg_at_k([1, 0], k=3)
