"""Decoding for the server: requests of different adapters and different ``SamplingParams`` in
one KV-cached batch, and prompt log-probs.

``lora_engine.rl.rollout.generate`` takes one temperature / top-p / length for the whole batch
and seeds per adapter; Tinker's sampling requests each bring their own temperature, top-k,
top-p, max_tokens, stop tokens or strings and seed, so this loop keeps them per row. Rows of a
request draw their uniforms from that request's own generator, in row order, so a request's
samples do not depend on what else shares the batch. The returned log-probs are those of the
temperature-scaled distribution before top-k/top-p (what the learner's importance ratio
compares against at the same temperature); temperature 0 decodes greedily and reports
log-probs at temperature 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lora_engine.rl.rollout import cache_kwarg, inverse_cdf, left_pad

TOPK_UNDEFINED = -99999.0  # the SDK's filler for prompt positions with no distribution (position 0)


@dataclass
class Request:
    """One sample call: ``n`` completions of ``prompt`` under adapter ``adapter_id`` (-1: base)."""

    adapter_id: int
    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop_ids: frozenset = frozenset()
    stop_strs: tuple = ()
    seed: int = 0
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(int(self.seed) % 2**63)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits outside each row's top-k and top-p nucleus set to -inf (k <= 0, p >= 1: off)."""
    V = logits.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        probs = torch.softmax(logits, -1)
        sp, si = probs.sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p[:, None]  # always keeps the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), float("-inf"))
    return logits


@torch.no_grad()
def decode(engine, requests: list[Request], *, pad_id: int, detokenize=None) -> list[list[tuple]]:
    """For each request, ``n`` tuples (tokens, logprobs, stopped): ``stopped`` is True when a
    stop token (kept as the last token) or stop string ended it, False at ``max_tokens``.
    ``detokenize(ids) -> str`` is needed only for stop strings."""
    from transformers import DynamicCache

    rows = [(r, j) for r in requests for j in range(r.n)]
    B, device = len(rows), next(engine.model.parameters()).device
    input_ids, mask = left_pad([r.prompt for r, _ in rows], pad_id, device)
    temp = torch.tensor([r.temperature for r, _ in rows], dtype=torch.float32, device=device)
    top_k = torch.tensor([r.top_k for r, _ in rows], device=device)
    top_p = torch.tensor([r.top_p for r, _ in rows], dtype=torch.float32, device=device)
    limit = torch.tensor([r.max_tokens for r, _ in rows], device=device)
    greedy = temp <= 0
    steps = int(limit.max())
    out_tok = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, steps), dtype=torch.float32, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    done, stopped = torch.zeros(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    stop_rows = [b for b, (r, _) in enumerate(rows) if r.stop_ids]
    string_rows = [b for b, (r, _) in enumerate(rows) if r.stop_strs] if detokenize is not None else []
    stop_mask = torch.zeros((B, engine.model.get_output_embeddings().weight.shape[0]), dtype=torch.bool, device=device)
    for b in stop_rows:
        stop_mask[b, list(rows[b][0].stop_ids)] = True
    cache, cur_ids, full_mask = DynamicCache(), input_ids, mask
    cur_pos = (mask.cumsum(-1) - 1).clamp_min(0)
    adapters = torch.tensor([r.adapter_id for r, _ in rows], dtype=torch.long)
    cache_arg = cache_kwarg(engine.model)  # cache= on transformers >= 5.24, past_key_values= before
    with engine.use_adapters(adapters):
        for t in range(steps):
            out = engine.model(input_ids=cur_ids, attention_mask=full_mask, position_ids=cur_pos,
                               use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            logits = out.logits[:, -1, :].float()
            scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
            logp_all = torch.log_softmax(scaled, -1)
            probs = torch.softmax(_filter(scaled, top_k, top_p), -1)
            u = torch.cat([torch.rand(r.n, generator=r.generator) for r in requests]).to(device)
            drawn = inverse_cdf(probs, u)  # searchsorted's answer, never a zero-probability token
            tok = torch.where(greedy, logits.argmax(-1), drawn)
            live = ~done
            out_tok[:, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
            out_logp[:, t] = torch.where(live, logp_all.gather(-1, tok[:, None]).squeeze(-1), torch.zeros_like(temp))
            length += live.long()
            hit = live & stop_mask.gather(-1, tok[:, None]).squeeze(-1)
            for b in string_rows:
                if bool(live[b]) and any(s in detokenize(out_tok[b, :t + 1].tolist()) for s in rows[b][0].stop_strs):
                    hit[b] = True
            stopped |= hit
            done |= hit | (live & (length >= limit))
            if bool(done.all()):
                break
            cur_ids, cur_pos = out_tok[:, t:t + 1], cur_pos[:, -1:] + 1
            full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=full_mask.dtype, device=device)], 1)
    tok_l, lp_l, len_l, stop_l = out_tok.tolist(), out_logp.tolist(), length.tolist(), stopped.tolist()
    results, b = [], 0
    for r in requests:
        results.append([(tok_l[b + j][:len_l[b + j]], lp_l[b + j][:len_l[b + j]], stop_l[b + j]) for j in range(r.n)])
        b += r.n
    return results


@torch.no_grad()
def prompt_logprobs(engine, items: list[tuple[int, list[int], int]], *, pad_id: int) -> list[tuple]:
    """For (adapter_id, prompt, k) items, in one forward: ``logprobs`` [P] float32 with NaN at
    position 0 (``logprobs[i] = log p(prompt[i] | prompt[:i])``, temperature 1), and for k > 0
    the top-k ([P, k] ids, [P, k] log-probs; row 0 undefined), else None."""
    B, P = len(items), max(len(p) for _, p, _ in items)
    device = next(engine.model.parameters()).device
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P), dtype=torch.long)
    for b, (_, p, _) in enumerate(items):
        ids[b, :len(p)], attn[b, :len(p)] = torch.tensor(p), 1
    ids, attn = ids.to(device), attn.to(device)
    hidden = engine.hidden_states(ids, attn, torch.tensor([a for a, _, _ in items], dtype=torch.long))
    W = engine.model.get_output_embeddings().weight
    lp = engine.logprobs_from_hidden(hidden, ids, attn, temperature=1.0).float().cpu().numpy()
    out = []
    for b, (_, p, k) in enumerate(items):
        row = lp[b, :len(p)].astype(np.float32)
        row[0] = np.nan
        topk = None
        if k > 0:
            ids_k, vals_k = np.zeros((len(p), k), np.int64), np.full((len(p), k), TOPK_UNDEFINED, np.float32)
            for s in range(0, len(p) - 1, 256):  # [256, V] logits at a time, never [P, V]
                logits = hidden[b, s:min(s + 256, len(p) - 1)].float() @ W.float().T
                v, i = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), -1)
                ids_k[s + 1:s + 1 + len(v), :v.shape[1]] = i.cpu().numpy()
                vals_k[s + 1:s + 1 + len(v), :v.shape[1]] = v.cpu().numpy()
            topk = (ids_k, vals_k)
        out.append((row, topk))
    return out

