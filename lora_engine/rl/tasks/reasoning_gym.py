"""Any reasoning-gym dataset as a task, with its settings (terms, digits, ...) from the config.

    task = "reasoning_gym:basic_arithmetic"
    [task_options]
    min_terms = 2
    max_terms = 2
    max_digits = 1

``task_options`` are the dataset's own config fields, except ``size`` (the training pool, 20,000
by default), ``eval_size`` (held-out questions drawn, 2,000) and ``eval_fraction`` (share of
distinct questions reserved for the held-out split, 0.1). Train and eval come from different
reasoning-gym seeds and are made disjoint by a hash of the question text: a small space (two
one-digit terms: 100 questions) repeats questions across seeds, so without it the "held-out"
set would be training data.
"""
from __future__ import annotations

from lora_engine.rl.tasks.base import EVAL_FRACTION, DataTask, check_fraction, in_eval_split

OWN_OPTIONS = ("size", "eval_size", "eval_fraction")
EVAL_SEED_OFFSET = 10**9  # reasoning-gym seeds item i with seed + i: keep the two streams apart


def create_dataset(name: str, seed: int, size: int, options: dict):
    """``reasoning_gym.create_dataset`` with its errors as one-line ``ValueError``s naming the fix."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise ValueError("task 'reasoning_gym:...' needs reasoning-gym: pip install 'lora-engine[rl]'") from e
    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset {name!r}: use one of reasoning_gym.factory.DATASETS, "
                         "e.g. task = \"reasoning_gym:basic_arithmetic\"")
    config_cls = DATASETS[name][1]
    known = sorted(f for f in getattr(config_cls, "__dataclass_fields__", {}) if f not in ("seed", "size"))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task_options {unknown} are not settings of reasoning-gym's {name!r}; "
                         f"its settings: {known} (plus {list(OWN_OPTIONS)})")
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **options)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"reasoning-gym {name!r} rejected task_options {options}: {e}") from None


class ReasoningGymTask(DataTask):
    """A reasoning-gym dataset: its question as the prompt, its answer as the gold.

    Scored by math-verify by default (``scorer``), reasoning-gym's own scorer when asked for.
    """

    def __init__(self, name: str, seed: int = 0, size: int = 20000, options: dict | None = None, *,
                 prompt=None, scorer=None, few_shot: int = 0, eval_problems: list[dict] | None = None):
        from lora_engine.rl.tasks.scoring import AnswerScorer

        options = dict(options or {})
        size = int(options.pop("size", size))
        eval_size = int(options.pop("eval_size", min(2000, size)))
        fraction = check_fraction(options.pop("eval_fraction", EVAL_FRACTION))
        if size < 1 or eval_size < 1:
            raise ValueError(f"task_options.size and eval_size must be >= 1, got {size} and {eval_size}")
        self.dataset_name = name
        data = create_dataset(name, seed, size, options)
        self.train = [self._problem(e) for e in data if not in_eval_split(e["question"], seed, fraction)]
        if eval_problems is None:
            held = create_dataset(name, seed + EVAL_SEED_OFFSET, eval_size, options)
            seen: set[str] = set()
            eval_problems = []
            for e in held:
                q = e["question"]
                if in_eval_split(q, seed, fraction) and q not in seen:
                    seen.add(q)
                    eval_problems.append(self._problem(e))
        self.eval = eval_problems
        self._finish(f"reasoning_gym:{name}", prompt, scorer or AnswerScorer(), few_shot, seed)

    @staticmethod
    def _problem(entry) -> dict:
        return {"prompt": entry["question"], "answer": str(entry["answer"]), "entry": entry}
