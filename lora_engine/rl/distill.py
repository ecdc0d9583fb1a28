"""Distillation rewards: a local teacher's per-token reverse-KL reward for the student's samples.

    r_t = log pi_T(o_t | q, o_<t) - log pi(o_t | q, o_<t)         on every completion token

``pi`` is the student (the adapter being trained, as it sampled: the rollout's sampling log-probs),
``pi_T`` a second, frozen base model in memory: any size, but the student's vocabulary
(:func:`check_same_vocab`, a clear error otherwise). Both log-probs are taken at the sampling
temperature, so a teacher identical to the student gives r_t = 0 (up to rounding). The
expectation of -r_t over the student's samples is KL(pi || pi_T): maximising the summed reward
is on-policy distillation (the GKD / Tinker cookbook reverse-KL reward). The teacher's log-probs go through the fused path: one decoder
pass to the final hidden states, then ``ops.masked_token_logprobs`` on the completion tokens
only (no [T, V] logits on the GPU path).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lora_engine import ops


def check_same_vocab(teacher_tokenizer, student_tokenizer, teacher_model) -> None:
    """Raise ``ValueError`` unless the teacher reads token ids exactly as the student writes them."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        raise ValueError(f"the teacher's vocabulary differs from the student's ({len(tv)} vs {len(sv)} tokens, "
                         f"{diff} entries differ): distillation compares log-probs of the same token ids, so "
                         "use a teacher with the student's tokenizer (same model family)")
    rows = teacher_model.get_output_embeddings().weight.shape[0]
    if rows < len(sv):
        raise ValueError(f"the teacher's LM head has {rows} rows for a vocabulary of {len(sv)} tokens: "
                         "use a teacher trained with the student's tokenizer")


class Teacher:
    """A frozen teacher base model and its fused per-token log-probs."""

    def __init__(self, model, tokenizer, student_tokenizer=None):
        if student_tokenizer is not None:
            check_same_vocab(tokenizer, student_tokenizer, model)
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer

    @classmethod
    def load(cls, name: str, student_tokenizer, dtype: str = "auto", device: str = "auto",
             progress: bool = False) -> "Teacher":
        """``name``: a local Hugging Face folder (``tiny_judges.build_tiny_teacher`` builds one)."""
        from lora_engine.rl.models import load_base
        if not Path(name).is_dir():
            raise ValueError(f"teacher_model {name!r} is neither 'tiny' nor a local folder holding a causal LM")
        model, tokenizer = load_base(name, dtype, device, progress=progress)
        return cls(model, tokenizer, student_tokenizer)

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
        """``[B, L]`` fp32: ``log pi_T(input_ids[b, l] | input_ids[b, :l])`` where ``score_mask != 0``,
        0 elsewhere (left padding is fine: position ids follow the attention mask)."""
        dev = self.model.device
        ids, att, score = input_ids.to(dev), attention_mask.to(dev), score_mask.to(dev)
        decoder = getattr(self.model, self.model.base_model_prefix)
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        hidden = decoder(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
        head = self.model.get_output_embeddings().weight
        logp = ops.masked_token_logprobs(hidden[:, :-1], head, ids[:, 1:], score[:, 1:], temperature=temperature)
        return torch.nn.functional.pad(logp, (1, 0)).to(input_ids.device)


def distillation_rewards(teacher: Teacher, ro, student_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N, C]`` fp32: ``r_t = log pi_T(o_t) - log pi(o_t)`` on the completion tokens of rollouts
    ``ro`` (``rl.rollout.Rollouts``), 0 after EOS; ``student_logp [N, C]`` is the student's."""
    P = ro.prompt_len
    score = torch.nn.functional.pad(ro.completion_mask, (P, 0))
    t_logp = teacher.token_logprobs(ro.input_ids, ro.attention_mask, score, temperature)[:, P:]
    m = ro.completion_mask.to(t_logp.device).bool()
    return torch.where(m, t_logp - student_logp.to(t_logp.device).float(), torch.zeros((), device=m.device))
