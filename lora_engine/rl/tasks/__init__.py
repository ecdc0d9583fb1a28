"""Tasks the trainer can run: where prompts come from and how a completion is scored.

A task gives ``sample_train(n, generator)``, ``eval_set(n)``, ``encode_prompt(tokenizer,
problem)`` and ``score(problems, completions) -> list[float]`` (1.0 correct, 0.0 not).
Problems are dicts with at least ``prompt`` and ``answer``.
"""
from __future__ import annotations

import torch


class TinyArithmeticTask:
    """The embedded default: two-term additions from reasoning-gym's basic_arithmetic (``lora_engine.rl.tasks.tiny``)."""

    def __init__(self, seed: int = 0, pool: int = 20000):
        from lora_engine.rl.tasks import tiny as tiny_task

        self._tt = tiny_task
        self.seed = seed
        self.train = tiny_task.make_problems(pool, seed=seed, split="train")
        self._eval: list[dict] | None = None

    def sample_train(self, n: int, generator: torch.Generator) -> list[dict]:
        idx = torch.randint(0, len(self.train), (n,), generator=generator).tolist()
        return [self.train[i] for i in idx]

    def eval_set(self, n: int) -> list[dict]:
        if self._eval is None or len(self._eval) < n:
            self._eval = self._tt.make_problems(n, seed=self.seed, split="eval")
        return self._eval[:n]

    def encode_prompt(self, tokenizer, problem: dict) -> list[int]:
        return tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]

    def score(self, problems: list[dict], completions: list[str]) -> list[float]:
        return [float(self._tt.score(c, p)) for c, p in zip(completions, problems)]


class ReasoningGymTask:
    """Any reasoning-gym dataset: its question as the prompt, its own scorer on the answer.

    The completion's answer is read from ``<answer>...</answer>`` or the last ``\\boxed{}``.
    """

    def __init__(self, name: str, seed: int = 0, size: int = 20000):
        try:
            import reasoning_gym
        except ImportError as e:
            raise ValueError("task 'reasoning_gym:...' needs reasoning-gym: pip install 'lora-engine[rl]'") from e
        self.name = name
        self.train = list(reasoning_gym.create_dataset(name, seed=seed, size=size))
        self._eval_data = list(reasoning_gym.create_dataset(name, seed=seed + 10**9, size=min(2000, size)))
        self._scorer = reasoning_gym.get_score_answer_fn(name)

    @staticmethod
    def _problem(entry) -> dict:
        return {"prompt": entry["question"], "answer": str(entry["answer"]), "entry": entry}

    def sample_train(self, n, generator):
        idx = torch.randint(0, len(self.train), (n,), generator=generator).tolist()
        return [self._problem(self.train[i]) for i in idx]

    def eval_set(self, n):
        return [self._problem(e) for e in self._eval_data[:n]]

    def encode_prompt(self, tokenizer, problem):
        if getattr(tokenizer, "chat_template", None):
            # Render to text, then tokenize: apply_chat_template(tokenize=True) returns a dict in
            # transformers 5 and a list in 4.x; the rendered text already holds BOS if any.
            text = tokenizer.apply_chat_template([{"role": "user", "content": problem["prompt"]}],
                                                 add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(problem["prompt"], add_special_tokens=True)["input_ids"]

    def score(self, problems, completions):
        from lora_engine.rl.rewards import extract_answer

        out = []
        for p, c in zip(problems, completions):
            ans = extract_answer(c)
            out.append(float(self._scorer(ans, p["entry"])) if ans is not None else 0.0)
        return out


def load_task(name: str, seed: int = 0):
    """``"tiny"`` or ``"reasoning_gym:<dataset name>"``."""
    if name == "tiny":
        return TinyArithmeticTask(seed=seed)
    if name.startswith("reasoning_gym:"):
        return ReasoningGymTask(name.split(":", 1)[1], seed=seed)
    raise ValueError(f"unknown task {name!r}: use 'tiny' or 'reasoning_gym:<dataset>' "
                     "(e.g. reasoning_gym:basic_arithmetic)")
