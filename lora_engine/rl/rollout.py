"""Batched sampling where every sequence uses its own adapter (built-in Hugging Face path).

One KV-cached decoding loop serves all adapters of a batch. Randomness is drawn per adapter:
rows of adapter a consume uniforms from a generator seeded by (adapter seed, step), in row
order, so an adapter's samples do not depend on which other adapters share the batch. Tokens
are drawn by inverse-CDF sampling of the temperature-scaled, top-p-filtered distribution;
the returned sampling log-probs are those of the temperature-scaled distribution (before
top-p), the quantity the trainer recomputes for the importance ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """A [B, P + C] batch: left-padded prompts followed by right-padded completions."""

    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] 1 on generated tokens up to and including EOS
    sampling_logp: torch.Tensor     # [B, C] fp32
    truncated: torch.Tensor         # [B] bool: no EOS within max_new_tokens
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


def left_pad(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), P), dtype=torch.long)
    for b, t in enumerate(token_lists):
        if t:
            ids[b, P - len(t):] = torch.tensor(t)
            mask[b, P - len(t):] = 1
    return ids.to(device), mask.to(device)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample per row from softmax(logits / T) restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        sp = sp / sp.sum(-1, keepdim=True)
        cdf = sp.cumsum(-1)
        j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_max(cdf.shape[-1] - 1)
        return si.gather(-1, j).squeeze(-1)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_max(cdf.shape[-1] - 1)
    return j.squeeze(-1)


@torch.no_grad()
def generate(engine, prompt_ids: list[list[int]], adapter_ids: list[int], *, eos_id: int, pad_id: int,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             seeds: dict[int, int] | None = None) -> Rollouts:
    """Sample one completion per prompt with its own adapter (-1 = base model).

    Args:
        engine: a ``MultiLoRAModel``.
        prompt_ids: B token lists. adapter_ids: B ints.
        seeds: adapter id -> seed of its sampling generator this call (ignored when greedy).
    """
    if len(prompt_ids) != len(adapter_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(adapter_ids)} adapter ids: give one per prompt")
    if not greedy and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use greedy=True for argmax decoding")
    from transformers import DynamicCache

    device = next(engine.model.parameters()).device
    ids_t = torch.tensor(adapter_ids, dtype=torch.long)
    input_ids, mask = left_pad(prompt_ids, pad_id, device)
    B, P = input_ids.shape
    gens = {}
    if not greedy:
        for a in sorted(set(adapter_ids)):
            gens[a] = torch.Generator().manual_seed(int((seeds or {}).get(a, 0)))
    rows_of = {a: [b for b in range(B) if adapter_ids[b] == a] for a in gens}

    out_tok = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    out_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cur_ids, cur_pos, full_mask = input_ids, pos, mask
    with engine.use_adapters(ids_t):
        for t in range(max_new_tokens):
            out = engine.model(input_ids=cur_ids, attention_mask=full_mask, position_ids=cur_pos,
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :].float()
            if greedy:
                tok = logits.argmax(-1)
            else:
                u = torch.empty(B)
                for a, rows in rows_of.items():
                    u[rows] = torch.rand(len(rows), generator=gens[a])
                tok = _sample(logits, temperature, top_p, u.to(device))
            logp = torch.log_softmax(logits / (1.0 if greedy else temperature), -1)
            logp = logp.gather(-1, tok[:, None]).squeeze(-1)
            live = ~done
            out_tok[:, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
            out_logp[:, t] = torch.where(live, logp, torch.zeros_like(logp))
            out_mask[:, t] = live.long()
            done = done | (live & (tok == eos_id))
            if bool(done.all()):
                max_new_tokens = t + 1
                break
            cur_ids = out_tok[:, t:t + 1]
            cur_pos = cur_pos[:, -1:] + 1
            full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=full_mask.dtype, device=device)], 1)
    C = max_new_tokens
    comp, cmask = out_tok[:, :C], out_mask[:, :C]
    seq = torch.cat([input_ids, comp], 1)
    attn = torch.cat([mask, cmask], 1)
    return Rollouts(input_ids=seq, attention_mask=attn, completion_ids=comp, completion_mask=cmask,
                    sampling_logp=out_logp[:, :C], truncated=~done.cpu(), adapter_ids=ids_t,
                    prompt_len=P, prompt_tokens=mask.sum(-1).cpu())
