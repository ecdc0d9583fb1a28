"""Batched sampling where every sequence uses its own adapter (built-in Hugging Face path).

One KV-cached decoding loop serves all adapters of a batch. Randomness is drawn per adapter:
before decoding, the rows of adapter a get their uniforms from a generator seeded by (adapter
seed, step), ``[steps, rows]`` in row order (the numbers a per-step draw would give), so an
adapter's samples depend neither on which other adapters share the batch nor on how the batch
is cut into decoding chunks (``max_batch``: a cap on sequences decoded at once, so peak memory
is set by the config and not by the number of adapters).

Tokens are drawn by inverse-CDF sampling of the temperature-scaled, top-p-filtered
distribution. The returned sampling log-probs are those of the temperature-scaled distribution
(before top-p), computed like the trainer's: in fp32 from the final hidden states and the LM
head (``ops.token_logprobs``), not from logits rounded to the model's dtype (bf16 logits are off
by up to ~0.03 nats at |z| ~ 10, enough to bias the importance ratio).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from lora_engine import ops


@dataclass
class Rollouts:
    """A [B, P + C] batch: left-padded prompts followed by right-padded completions."""

    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] 1 on generated tokens up to and including the stop token
    sampling_logp: torch.Tensor     # [B, C] fp32
    truncated: torch.Tensor         # [B] bool: no stop token within max_new_tokens
    adapter_ids: torch.Tensor       # [B]
    prompt_len: int                 # P
    prompt_tokens: torch.Tensor     # [B] real (unpadded) prompt lengths

    def select(self, idx: torch.Tensor) -> "Rollouts":
        """The rows ``idx`` (same prompt width P and completion width C); self for every row in order."""
        B = self.input_ids.shape[0]
        if idx.numel() == B and bool((idx.cpu() == torch.arange(B)).all()):
            return self
        def take(t):
            return t[idx.to(t.device)]
        return Rollouts(input_ids=take(self.input_ids), attention_mask=take(self.attention_mask),
                        completion_ids=take(self.completion_ids), completion_mask=take(self.completion_mask),
                        sampling_logp=take(self.sampling_logp), truncated=take(self.truncated),
                        adapter_ids=take(self.adapter_ids), prompt_len=self.prompt_len,
                        prompt_tokens=take(self.prompt_tokens))


def left_pad(token_lists: list[list[int]], pad_id: int, device, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and mask, prompts right-aligned; ``width`` pads to more than the longest."""
    P = max([len(t) for t in token_lists] + [width or 0])
    ids = torch.full((len(token_lists), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), P), dtype=torch.long)
    for b, t in enumerate(token_lists):
        if t:
            ids[b, P - len(t):] = torch.tensor(t)
            mask[b, P - len(t):] = 1
    return ids.to(device), mask.to(device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index j per row with cdf[j] >= u * total, never a zero-probability entry.

    The first j with cdf[j] >= x (``searchsorted`` at its default, left) is a zero-probability
    entry when x lands on the flat start of the cdf (u = 0 with p_0 = 0): such a row takes the
    first entry whose cdf exceeds x instead (``right=True``), which has p > 0. Every other row
    keeps the left answer, so samples are unchanged wherever they were valid. Rounding can put
    x at the total itself; such a row gets its last nonzero entry.
    """
    cdf = probs.cumsum(-1)
    x = (u * cdf[:, -1]).unsqueeze(-1)
    j = torch.searchsorted(cdf, x).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    zero = probs.gather(-1, j.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(zero.any()):
        j = torch.where(zero, torch.searchsorted(cdf, x, right=True).squeeze(-1), j)
        idx = torch.arange(probs.shape[-1], device=probs.device)
        last_nonzero = torch.where(probs > 0, idx, torch.zeros_like(idx)).amax(-1)
        j = torch.minimum(j, last_nonzero)
    return j


def _sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample per row from softmax(logits / T) restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        sp = sp / sp.sum(-1, keepdim=True)
        return si.gather(-1, inverse_cdf(sp, u).unsqueeze(-1)).squeeze(-1)
    return inverse_cdf(probs, u)


def draw_uniforms(adapter_ids: Sequence[int], seeds: dict[int, int] | None, steps: int) -> torch.Tensor:
    """[B, steps] uniforms: adapter a's rows from its own generator, step-major in row order
    (``torch.rand(steps, n_a)`` is the same stream as ``steps`` draws of ``torch.rand(n_a)``)."""
    ids = torch.as_tensor(list(adapter_ids), dtype=torch.long)
    u = torch.empty(len(ids), steps)
    for a in sorted(set(ids.tolist())):
        rows = (ids == a).nonzero().squeeze(-1)
        g = torch.Generator().manual_seed(int((seeds or {}).get(a, 0)))
        u[rows] = torch.rand(steps, len(rows), generator=g).T
    return u


def cache_kwarg(module) -> str:
    """The name ``module.forward`` takes its KV cache by: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated and goes in 5.40) or ``past_key_values`` (5.17 and older)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(engine, prompt_ids: list[list[int]], adapter_ids: list[int], *, eos_id: int | Sequence[int],
             pad_id: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             seeds: dict[int, int] | None = None, max_batch: int = 0) -> Rollouts:
    """Sample one completion per prompt with its own adapter (-1 = base model).

    Args:
        engine: a ``MultiLoRAModel``.
        prompt_ids: B token lists. adapter_ids: B ints.
        eos_id: the stop token id, or several (EOS and the chat template's end of turn).
        seeds: adapter id -> seed of its sampling generator this call (ignored when greedy).
        max_batch: decode at most this many sequences at once (0: all); the samples are the same.
    """
    if len(prompt_ids) != len(adapter_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(adapter_ids)} adapter ids: give one per prompt")
    if not greedy and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use greedy=True for argmax decoding")
    if max_batch < 0:
        raise ValueError(f"max_batch must be >= 0 (0 = the whole batch at once), got {max_batch}")
    stops = [int(eos_id)] if isinstance(eos_id, int) else sorted({int(e) for e in eos_id})
    if not stops:
        raise ValueError("eos_id is empty: give the tokenizer's EOS id (and the end-of-turn id of its chat template)")
    B = len(prompt_ids)
    device = next(engine.model.parameters()).device
    u = None if greedy else draw_uniforms(adapter_ids, seeds, max_new_tokens)
    width = max([len(p) for p in prompt_ids] + [0])  # one prompt width for every chunk
    n = max_batch or max(B, 1)
    parts = [_decode(engine, prompt_ids[i:i + n], adapter_ids[i:i + n], None if u is None else u[i:i + n],
                     width, stops, pad_id, max_new_tokens, temperature, top_p, device)
             for i in range(0, B, n)]
    C = max(p[0].shape[1] for p in parts)

    def cat(k, fill):
        return torch.cat([torch.nn.functional.pad(p[k], (0, C - p[k].shape[1]), value=fill) for p in parts])

    input_ids, mask = left_pad(prompt_ids, pad_id, device, width)
    comp, logp, cmask = cat(0, pad_id), cat(1, 0.0), cat(2, 0)
    done = torch.cat([p[3] for p in parts])
    return Rollouts(input_ids=torch.cat([input_ids, comp], 1), attention_mask=torch.cat([mask, cmask], 1),
                    completion_ids=comp, completion_mask=cmask, sampling_logp=logp, truncated=~done.cpu(),
                    adapter_ids=torch.tensor(adapter_ids, dtype=torch.long), prompt_len=input_ids.shape[1],
                    prompt_tokens=mask.sum(-1).cpu())


def _decode(engine, prompt_ids, adapter_ids, u, width, stops, pad_id, max_new_tokens, temperature, top_p, device):
    """One KV-cached decoding loop over a chunk: (tokens, fp32 log-probs, mask, done)."""
    from transformers import DynamicCache

    greedy = u is None
    model = engine.model
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    cache_arg = cache_kwarg(decoder)
    stop_t = torch.tensor(stops, device=device)
    input_ids, mask = left_pad(prompt_ids, pad_id, device, width)
    B = input_ids.shape[0]
    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    out_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = DynamicCache()
    cur_ids, cur_pos, full_mask = input_ids, (mask.cumsum(-1) - 1).clamp_min(0), mask
    steps = max_new_tokens
    with engine.use_adapters(torch.tensor(adapter_ids, dtype=torch.long)):
        for t in range(max_new_tokens):
            # [B, 1, d] -> [B, 1, V], the slice and shapes of the model's own logits_to_keep=1.
            h = decoder(input_ids=cur_ids, attention_mask=full_mask, position_ids=cur_pos, use_cache=True,
                        **{cache_arg: cache}).last_hidden_state[:, -1:]
            logits = head(h)[:, -1].float()
            h = h[:, -1]
            tok = logits.argmax(-1) if greedy else _sample(logits, temperature, top_p, u[:, t].to(device))
            logp = ops.token_logprobs(h, head.weight, tok, temperature=1.0 if greedy else temperature)
            live = ~done
            out_tok[:, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
            out_logp[:, t] = torch.where(live, logp, torch.zeros_like(logp))
            out_mask[:, t] = live.long()
            done = done | (live & torch.isin(tok, stop_t))
            if bool(done.all()):
                steps = t + 1
                break
            cur_ids = out_tok[:, t:t + 1]
            cur_pos = cur_pos[:, -1:] + 1
            full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=full_mask.dtype, device=device)], 1)
    return out_tok[:, :steps], out_logp[:, :steps], out_mask[:, :steps], done
