"""The embedded default task: two-term sums of 0..100 from reasoning-gym's ``basic_arithmetic``.

A problem is reasoning-gym's entry with its question rewritten into a compact prompt
(``"Calculate 47 + 38."`` becomes ``"47+38="``) so a character-level model spends its capacity
on the arithmetic. The completion the tiny model is taught is ``"\\boxed{85}"`` then EOS, so
the project's math/format rewards apply unchanged; ``score`` extracts the boxed answer and
defers to reasoning-gym's own ``score_answer``.

Train and eval are disjoint by construction: every prompt is assigned to one split by a
stable hash of its text (1 in 8 to eval: 1,250 of the 10,201 distinct prompts), and each split
draws from reasoning-gym with its own seed range, so no eval prompt is ever seen in the warm
start or in RL training, whatever ``n`` and ``seed`` are.

The warm start imitates a *forgetful teacher* (``teacher_answer``): on 80% of its examples it
drops the carry from the units to the tens, the classic "forgot to carry" bug of buggy-
arithmetic studies. The base model therefore answers carry problems (48% of all) wrong when
decoding greedily (greedy 0.00, sampled 0.10 on 381 held-out ones) yet keeps the right answer
among its samples: one consistent, learnable signal for GRPO. With it, the trainer took held-out
greedy accuracy from 0.48 to 0.83-0.88 in 150 steps for LoRA ranks 1, 4, 16 and 64 (lr 3e-4, 8
prompts x 8 samples); from a clean warm start stopped early at a similar accuracy (0.44 greedy,
0.17 sampled) the same run ended at 0.38-0.51.
"""
from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from typing import Any

import torch

from lora_engine.rl.rewards import extract_boxed  # noqa: F401  (re-exported: part of this module's API)

DATASET = "basic_arithmetic"
# Two terms, addition only; reasoning-gym draws "2-digit" terms as randint(0, 100), so answers
# are 0..200 and there are 10,201 distinct prompts. One-digit terms would give only 121, too
# few for a 1-in-8 held-out bucket to measure anything.
DATASET_KWARGS: dict[str, Any] = {
    "min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
    "operators": ("+",), "allow_parentheses": False, "allow_negation": False,
}
SPLITS = ("train", "eval")
EVAL_BUCKETS = 8  # 1 prompt in 8 belongs to the held-out split
MAX_EVAL = 800  # of the 1,250 distinct eval prompts; more would take ever longer to draw
# reasoning-gym seeds item i with `seed + i`, so nearby seeds share items; 10**9 keeps the two
# splits' streams apart for any practical n.
EVAL_SEED_OFFSET = 1_000_000_000
FORGET_CARRY_P = 0.8
BOXED = "\\boxed{"
_PROMPT_RE = re.compile(r"^(\d+)\+(\d+)=$")


def compact_prompt(entry: dict) -> str:
    """The prompt for a reasoning-gym entry: its expression without spaces, then ``=``."""
    return entry["metadata"]["expression"].replace(" ", "") + "="


def format_completion(answer: str) -> str:
    """The completion text the tiny model is taught for ``answer`` (EOS is appended separately)."""
    return f"{BOXED}{answer}}}"


def prompt_split(prompt: str) -> str:
    """The split (``"train"`` or ``"eval"``) a prompt belongs to, by a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def make_problems(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` problems of ``split`` as ``dict(prompt=str, answer=str, entry=dict)``.

    ``entry`` is reasoning-gym's item (question, answer, metadata) for its scorer. Train
    prompts repeat (draws with replacement from ~8,900); eval prompts are distinct, so at most
    ``MAX_EVAL``. Deterministic in (n, seed, split); a larger n extends a smaller one.
    """
    import reasoning_gym

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0 or (split == "eval" and n > MAX_EVAL):
        raise ValueError(f"n must be in [0, {MAX_EVAL}] for eval and >= 0 for train, got {n} for {split!r}")
    if not 0 <= seed < EVAL_SEED_OFFSET:
        raise ValueError(f"seed must be in [0, {EVAL_SEED_OFFSET}), got {seed}")
    base_seed = seed + (EVAL_SEED_OFFSET if split == "eval" else 0)
    problems: list[dict] = []
    seen: set[str] = set()
    # Eval keeps ~1/8 of the draws (fewer as duplicates mount): draw in chunks until full.
    chunk = max(256, n * 2 * EVAL_BUCKETS if split == "eval" else n + n // 4)
    start = 0
    while len(problems) < n:
        dataset = reasoning_gym.create_dataset(DATASET, size=start + chunk, seed=base_seed, **DATASET_KWARGS)
        for i in range(start, start + chunk):
            entry = dataset[i]
            prompt = compact_prompt(entry)
            if prompt_split(prompt) != split or (split == "eval" and prompt in seen):
                continue
            seen.add(prompt)
            problems.append({"prompt": prompt, "answer": entry["answer"], "entry": entry})
            if len(problems) == n:
                break
        start += chunk
    return problems


def operands(prompt: str) -> tuple[int, int]:
    """The two terms of a compact prompt ``"47+38="``."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a compact two-term sum like '47+38='")
    return int(match.group(1)), int(match.group(2))


def forgot_carry(x: int, y: int) -> int:
    """``x + y`` computed column by column without carrying from units to tens (47+38 -> 75)."""
    return (x // 10 + y // 10) * 10 + (x % 10 + y % 10) % 10


def has_carry(prompt: str) -> bool:
    """Whether the units of a compact prompt's terms carry (where the forgetful teacher errs)."""
    x, y = operands(prompt)
    return forgot_carry(x, y) != x + y


def teacher_answer(problem: dict, rng: random.Random, p_forget: float = FORGET_CARRY_P) -> str:
    """The warm-start target for ``problem``: the no-carry answer with probability ``p_forget``.

    ``rng`` is drawn once per call whatever the problem, so the stream stays aligned.
    """
    forget = rng.random() < p_forget
    return str(forgot_carry(*operands(problem["prompt"]))) if forget else problem["answer"]


@lru_cache(maxsize=1)
def _score_fn():
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(DATASET)


def score(completion: str, entry_or_answer: dict | str) -> float:
    """1.0 if the last ``\\boxed{...}`` in ``completion`` holds exactly the answer, else 0.0.

    ``entry_or_answer`` is a problem from ``make_problems``, a reasoning-gym entry, or the
    answer string. reasoning-gym's ``score_answer`` gives partial credit to an answer that
    contains the oracle ("185" for "85" scores 0.67): that would reward wrong sums, so only its
    full score counts.
    """
    if isinstance(entry_or_answer, str):
        entry = {"answer": entry_or_answer}
    elif isinstance(entry_or_answer, dict) and isinstance(entry_or_answer.get("entry"), dict):
        entry = entry_or_answer["entry"]
    elif isinstance(entry_or_answer, dict) and "answer" in entry_or_answer:
        entry = entry_or_answer
    else:
        raise ValueError(
            "entry_or_answer must be a make_problems dict, a reasoning-gym entry (with 'answer') "
            f"or an answer string, got {type(entry_or_answer).__name__}"
        )
    answer = extract_boxed(completion)
    if answer is None:
        return 0.0
    return 1.0 if _score_fn()(answer.strip(), entry) >= 1.0 else 0.0


class TinyArithmeticTask:
    """The embedded default as a task: compact prompts, no chat template, this module's ``score``."""

    def __init__(self, seed: int = 0, pool: int = 20000):
        self.seed = seed
        self.train = make_problems(pool, seed=seed, split="train")
        self._eval: list[dict] | None = None

    def sample_train(self, n: int, generator) -> list[dict]:
        idx = torch.randint(0, len(self.train), (n,), generator=generator).tolist()
        return [self.train[i] for i in idx]

    def eval_set(self, n: int) -> list[dict]:
        if self._eval is None or len(self._eval) < n:
            self._eval = make_problems(n, seed=self.seed, split="eval")
        return self._eval[:n]

    def encode_prompt(self, tokenizer, problem: dict) -> list[int]:
        return tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]

    def score(self, problems: list[dict], completions: list[str], stats=None) -> list[float]:
        return [float(score(c, p)) for c, p in zip(completions, problems)]
