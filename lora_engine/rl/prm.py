"""Process rewards: a local process reward model (PRM) scores every step of a completion.

A step is a run of completion tokens ending at a token whose text contains the separator
(``"\\n"`` by default); the last step runs to the completion's last token (EOS included). A
step of only whitespace and separators (a blank line) is merged into the next one. Each step
gets one score in [0, 1], deposited on its last token (:func:`step_ends`, :func:`deposits`).

Two kinds of PRM, both loaded from a local folder (or ``"tiny"``, built by ``tiny_judges``):

- ``"math_shepherd"``: a causal LM reads ``prompt + step_1 TAG + step_2 TAG ...`` (the tag goes
  before a step's trailing separator, so with Math-Shepherd's tag ``" ки"`` and ``"\\n"`` steps
  the text is ``"... step 1 ки\\n step 2 ки"``); the score of step k is
  ``p(good) / (p(good) + p(bad))`` of its next-token distribution at tag k, with ``good = "+"``
  and ``bad = "-"`` (Math-Shepherd's scoring). The two log-probs come from the PRM's final
  hidden states at the tag positions through ``ops.token_logprobs`` (no [T, V] logits).
- ``"classifier"``: a sequence-classification model scores each prefix
  ``prompt + step_1 ... step_k``: ``sigmoid(logit)`` for one label, ``softmax(logits)[1]`` for two.

Every step of every row goes through the PRM in one padded batch (per ``batch_size`` rows) on
the PRM's device. A folder may hold ``prm.json`` (``{"kind", "step_tag", "good", "bad",
"separator"}``, as the tiny PRM does): it supplies the defaults that the config leaves empty.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_engine import ops

PRM_KINDS = ("math_shepherd", "classifier")
MATH_SHEPHERD = {"kind": "math_shepherd", "step_tag": " ки", "good": "+", "bad": "-", "separator": "\n"}
PRM_FILE = "prm.json"


def step_ends(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, separator: str = "\n") -> list[list[int]]:
    """Per row, the token positions where its steps end (ascending; the last is the row's last
    valid token; [] for an empty row)."""
    if not separator:
        raise ValueError('step_separator must be a non-empty string, e.g. "\\n"')
    ids, m = completion_ids.cpu(), mask.cpu().bool()
    pieces = tokenizer.batch_decode(ids.reshape(-1, 1).tolist(), skip_special_tokens=True)
    T = ids.shape[1]
    out = []
    for b in range(ids.shape[0]):
        valid = m[b].nonzero().squeeze(1).tolist()
        ends, text = [], ""
        for t in valid[:-1]:
            text += pieces[b * T + t]
            if separator in pieces[b * T + t] and text.replace(separator, "").strip():
                ends.append(t)
                text = ""
        out.append(ends + valid[-1:])
    return out


def step_texts(tokenizer, completion_ids: torch.Tensor, ends: list[list[int]]) -> list[list[str]]:
    """The text of every step (its separator included), from the positions ``step_ends`` gave."""
    rows = []
    for b, row_ends in enumerate(ends):
        starts = [0] + [e + 1 for e in row_ends[:-1]]
        spans = [completion_ids[b, s:e + 1].tolist() for s, e in zip(starts, row_ends)]
        rows.append(tokenizer.batch_decode(spans, skip_special_tokens=True) if spans else [])
    return rows


def tagged_input(tokenizer, prompt: str, steps: list[str], tag: str, separator: str) -> tuple[list[int], list[int]]:
    """Math-Shepherd's input ids for one completion and the position of each step's tag (its last
    token). Encoded piece by piece, so the tag positions are exact whatever the tokenizer."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    ids, at = enc(prompt), []
    tag_ids = enc(tag)
    for step in steps:
        body, tail = (step[:-len(separator)], separator) if step.endswith(separator) else (step, "")
        ids += enc(body) + tag_ids
        at.append(len(ids) - 1)
        ids += enc(tail)
    return ids, at


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the PRM's {what} token {text!r} encodes to {len(ids)} tokens: set prm_{what}_token "
                         "to one token of the PRM's vocabulary")
    return ids[0]


class ProcessRewardModel:
    """A frozen PRM and its scoring rule; :meth:`load` builds one from the config's fields."""

    def __init__(self, model, tokenizer, kind: str = "math_shepherd", step_tag: str = MATH_SHEPHERD["step_tag"],
                 good: str = "+", bad: str = "-", separator: str = "\n", batch_size: int = 256):
        if kind not in PRM_KINDS:
            raise ValueError(f"prm_kind must be one of {PRM_KINDS}, got {kind!r}")
        self.model, self.tokenizer, self.kind = model.eval().requires_grad_(False), tokenizer, kind
        if not separator:
            raise ValueError('step_separator must be a non-empty string, e.g. "\\n"')
        self.step_tag, self.separator, self.batch_size = step_tag, separator, batch_size
        if kind == "math_shepherd":
            if not step_tag:
                raise ValueError('a math_shepherd PRM needs a step tag, e.g. prm_step_tag = " ки"')
            self.good, self.bad = _single_token(tokenizer, good, "good"), _single_token(tokenizer, bad, "bad")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, name: str, kind: str = "", step_tag: str = "", separator: str = "", dtype: str = "auto",
             device: str = "auto") -> "ProcessRewardModel":
        """``name``: a local folder (``tiny_judges.build_tiny_prm`` builds one). Empty ``kind`` /
        ``step_tag`` / ``separator`` take the folder's ``prm.json``, else Math-Shepherd's
        (``" ки"``, "+", "-", ``"\\n"``)."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from lora_engine.rl.models import resolve_device, resolve_dtype
        if not Path(name).is_dir():
            raise ValueError(f"prm_model {name!r} is neither 'tiny' nor a local folder holding a PRM")
        meta = {**MATH_SHEPHERD, **json.loads((Path(name) / PRM_FILE).read_text())} \
            if (Path(name) / PRM_FILE).exists() else dict(MATH_SHEPHERD)
        kind = kind or meta["kind"]
        auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
        dev = resolve_device(device)
        model = auto.from_pretrained(name, dtype=resolve_dtype(dtype, dev)).to(dev)
        return cls(model, AutoTokenizer.from_pretrained(name), kind, step_tag or meta["step_tag"],
                   meta["good"], meta["bad"], separator or meta["separator"])

    @torch.no_grad()
    def score(self, prompts: list[str], steps: list[list[str]]) -> list[list[float]]:
        """Scores in [0, 1] of every step of every completion (``steps[i]`` from :func:`step_texts`)."""
        if self.kind == "classifier":
            return self._score_prefixes(prompts, steps)
        inputs = [tagged_input(self.tokenizer, p, s, self.step_tag, self.separator) for p, s in zip(prompts, steps)]
        flat = self._run([ids for ids, _ in inputs], [at for _, at in inputs])
        out, k = [], 0
        for _, at in inputs:
            out.append(flat[k:k + len(at)])
            k += len(at)
        return out

    def _batches(self, seqs):
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), L), self.pad, dtype=torch.long)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, s in enumerate(chunk):  # right padding: positions are the unpadded ones
                ids[j, :len(s)], att[j, :len(s)] = torch.tensor(s), 1
            dev = self.model.device
            yield i, ids.to(dev), att.to(dev)

    def _run(self, seqs: list[list[int]], at: list[list[int]]) -> list[float]:
        """Math-Shepherd: sigmoid(log p(good) - log p(bad)) at every tag position, in row order."""
        decoder = getattr(self.model, self.model.base_model_prefix)
        head = self.model.get_output_embeddings().weight
        scores = []
        for i, ids, att in self._batches(seqs):
            rows = torch.tensor([j for j in range(ids.shape[0]) for _ in at[i + j]], dtype=torch.long)
            cols = torch.tensor([c for j in range(ids.shape[0]) for c in at[i + j]], dtype=torch.long)
            if not len(rows):
                continue
            hidden = decoder(input_ids=ids, attention_mask=att).last_hidden_state
            hidden = hidden[rows.to(ids.device), cols.to(ids.device)]  # [K, d]: the tag positions only
            good = ops.token_logprobs(hidden, head, torch.full_like(rows, self.good).to(ids.device))
            bad = ops.token_logprobs(hidden, head, torch.full_like(rows, self.bad).to(ids.device))
            scores += torch.sigmoid(good.float() - bad.float()).tolist()
        return scores

    def _score_prefixes(self, prompts, steps) -> list[list[float]]:
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        seqs = [enc(p + "".join(s[:k + 1])) for p, s in zip(prompts, steps) for k in range(len(s))]
        flat = []
        for _, ids, att in self._batches(seqs):
            logits = self.model(input_ids=ids, attention_mask=att).logits.float()
            flat += (torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, 1]).tolist()
        out, k = [], 0
        for s in steps:
            out.append(flat[k:k + len(s)])
            k += len(s)
        return out


def deposits(prm: ProcessRewardModel, tokenizer, prompts: list[str], completion_ids: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, T] fp32, placed [N, T] bool)``: each step's PRM score on its last token
    (steps split at ``prm.separator`` in the policy's own ``tokenizer``)."""
    ends = step_ends(tokenizer, completion_ids, mask, prm.separator)
    scores = prm.score(prompts, step_texts(tokenizer, completion_ids, ends))
    values = torch.zeros(completion_ids.shape, dtype=torch.float32)
    placed = torch.zeros(completion_ids.shape, dtype=torch.bool)
    for b, (row_ends, row_scores) in enumerate(zip(ends, scores)):
        if row_ends:
            values[b, row_ends] = torch.tensor(row_scores, dtype=torch.float32)
            placed[b, row_ends] = True
    return values.to(mask.device), placed.to(mask.device)
