"""Tasks the trainer can run: where prompts come from and how a completion is scored.

- ``"tiny"``: the embedded arithmetic default (``tasks.tiny``);
- ``"reasoning_gym:<dataset>"``: a procedural reasoning-gym dataset with its settings from
  ``task_options`` (``tasks.reasoning_gym``);
- ``"math:<path>"``: a local math dataset (GSM8K/MATH-style JSONL, JSON, parquet, CSV or a
  ``save_to_disk`` folder; ``tasks.math``).

The protocol (``sample_train``, ``eval_set``, ``encode_prompt``, ``score``) is in ``tasks.base``;
prompts (system prompt, instruction, chat template, few-shot, thinking) in ``rl.prompts``;
scoring (math-verify in the sandboxed pool by default) in ``tasks.scoring``.
"""
from __future__ import annotations

from lora_engine.rl.prompts import PromptFormat
from lora_engine.rl.tasks.base import DataTask, score_problems, stop_ids
from lora_engine.rl.tasks.math import MathTask, load_eval_problems
from lora_engine.rl.tasks.reasoning_gym import ReasoningGymTask
from lora_engine.rl.tasks.scoring import DEFAULT_EXTRACTORS, SCORERS, AnswerScorer
from lora_engine.rl.tasks.tiny import TinyArithmeticTask

__all__ = ["AnswerScorer", "DataTask", "MathTask", "PromptFormat", "ReasoningGymTask", "TinyArithmeticTask",
           "load_task", "score_problems", "stop_ids", "task_from_config"]


def load_task(name: str, seed: int = 0, options: dict | None = None, *, prompt: PromptFormat | None = None,
              scorer: str = "auto", extractors=DEFAULT_EXTRACTORS, verify_timeout: float = 5.0,
              few_shot: int = 0, eval_data: str = ""):
    """The task called ``name``: ``"tiny"``, ``"reasoning_gym:<dataset>"`` or ``"math:<path>"``."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if name == "tiny":
        if options or few_shot or eval_data or scorer != "auto" or (prompt is not None and prompt != PromptFormat()):
            raise ValueError("task \"tiny\" has its own prompts, data and scorer: leave task_options, prompt, "
                             "few-shot, eval_data and scorer at their defaults, or use a reasoning_gym:/math: task")
        return TinyArithmeticTask(seed=seed)
    kind, _, arg = name.partition(":")
    if kind not in ("reasoning_gym", "math") or not arg:
        raise ValueError(f"unknown task {name!r}: use 'tiny', 'reasoning_gym:<dataset>' (e.g. "
                         "reasoning_gym:basic_arithmetic) or 'math:<path to a local data file or folder>'")
    check = AnswerScorer("math_verify" if scorer == "auto" else scorer, extractors, verify_timeout,
                         dataset=arg if kind == "reasoning_gym" else None)
    common = dict(prompt=prompt, scorer=check, few_shot=few_shot)
    if kind == "reasoning_gym":
        held = load_eval_problems(eval_data, {}) if eval_data else None
        return ReasoningGymTask(arg, seed=seed, options=options, eval_problems=held, **common)
    return MathTask(arg, seed=seed, options=options, eval_data=eval_data, **common)


def task_from_config(cfg):
    """The task a ``TrainConfig`` describes (its task, data, prompt and scoring fields)."""
    prompt = PromptFormat(system_prompt=cfg.system_prompt, instruction=cfg.instruction,
                          chat_template=cfg.chat_template, enable_thinking=cfg.enable_thinking,
                          few_shot=cfg.few_shot_examples)
    return load_task(cfg.task, seed=cfg.data_seed, options=dict(cfg.task_options), prompt=prompt,
                     scorer=cfg.scorer, extractors=cfg.answer_extractors, verify_timeout=cfg.verify_timeout,
                     few_shot=cfg.few_shot, eval_data=cfg.eval_data)
