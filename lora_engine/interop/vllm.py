"""vLLM multi-LoRA as a rollout backend, and the export it relies on.

Every adapter directory written by ``lora_engine.engine.peft_format.save_adapter`` is a valid vLLM
``LoRARequest`` path (PEFT key names, ``adapter_config.json`` with only PEFT fields, no DoRA,
no bias, no ``modules_to_save``). vLLM sizes its LoRA buffers once, at start-up, for
``max_lora_rank``, which must be one of its allowed values and at least the largest rank
served; smaller ranks are zero-padded inside vLLM:

    adapter ranks (max)  1..8  9..16  17..32  33..64  65..128  129..256  257..320  321..512
    max_lora_rank          8     16     32      64      128       256       320       512

(``vllm_max_lora_rank``; recent vLLM also accepts 1, older ones start at 8, so 8 is used for
rank 1 everywhere.) Ranks above 512 cannot be served by vLLM.

``VLLMRollout`` serves all adapters of a batch from one ``vllm.LLM(enable_lora=True)``: at
each step ``sync`` writes the adapters' current weights to a fresh directory under new integer
ids (vLLM caches an adapter by its id, so a reused id would serve stale weights), and
``generate`` sends every prompt with its own adapter's ``LoRARequest``, returning the same
``Rollouts`` as the built-in ``lora_engine.rl.rollout.generate``. vLLM is imported lazily: this
module imports, and the export helpers work, without it.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from lora_engine.engine import methods, peft_format
from lora_engine.rl.rollout import Rollouts, left_pad

# Values every vLLM release with LoRA accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks
# minus the 1 that only recent releases added).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(ranks) -> int:
    """The smallest vLLM ``max_lora_rank`` that serves adapters of these ranks.

    Args: ranks: iterable of ints >= 1 (e.g. ``[engine.adapter_spec(i).rank for i in ids]``).
    Returns: an int in ``VLLM_MAX_LORA_RANKS``, >= max(ranks).
    """
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be a non-empty list of ints >= 1, got {ranks}")
    top = max(ranks)
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= top:
            return allowed
    raise ValueError(f"rank {top} exceeds vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]}): "
                     "serve it with the built-in rollout (lora_engine.rl.rollout.generate) or train rank <= 512")


def export_adapters(engine, root, ids=None, base_model_name: str | None = None) -> dict[int, Path]:
    """Write adapters ``ids`` (default: all) to ``root/adapter_<id>``; returns id -> directory."""
    root = Path(root)
    ids = engine.adapter_ids if ids is None else list(ids)
    return {i: peft_format.save_adapter(engine, i, root / f"adapter_{i}", base_model_name=base_model_name)
            for i in ids}


def served_rank(spec) -> int:
    """The rank vLLM sees for an adapter of ``spec``: its largest per-module rank in the PEFT
    export (PiSSA/MiLoRA are PEFT's converted rank-2r LoRA). Methods vLLM cannot serve raise."""
    method = methods.method_of(spec)
    cfg = method.peft_config(spec) if method.peft_config is not None else None
    if cfg is None or cfg["peft_type"] != "LORA" or cfg.get("use_dora"):
        servable = [m for m, rec in methods.TABLE.items() if rec.peft_config is not None
                    and rec.peft_config(spec)["peft_type"] == "LORA" and not rec.peft_config(spec).get("use_dora")]
        raise ValueError(f"method {spec.method!r} cannot be served by vLLM (LoRA-family adapters only: "
                         f"{', '.join(servable)}); use the built-in rollout")
    return max([cfg["r"], *cfg["rank_pattern"].values()])


def check_lora_request_dir(directory, max_lora_rank: int) -> dict:
    """Check that ``directory`` loads as a vLLM ``LoRARequest`` under ``max_lora_rank``.

    The rules of vLLM's ``PEFTHelper`` and ``LoRAModel.from_local_checkpoint``: an
    ``adapter_config.json`` of a LoRA with ``r``, ``lora_alpha`` and ``target_modules``; no
    DoRA, bias or ``modules_to_save``; every rank (``r`` and ``rank_pattern``) <=
    ``max_lora_rank``, an allowed value; an ``adapter_model.safetensors`` of only
    ``base_model.model.<module>.lora_{A,B}.weight`` tensors, A ``[r_m, K]`` and B ``[N, r_m]``.
    Returns the config dict; raises ``ValueError`` naming the fix.
    """
    directory = Path(directory)
    cfg = peft_format.read_config(directory)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type {cfg.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if cfg.get("use_dora"):
        raise ValueError(f"{directory}: vLLM does not support DoRA adapters; serve it with the built-in rollout")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise ValueError(f"{directory}: adapter_config.json lacks {missing}, which vLLM requires")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"max_lora_rank={max_lora_rank} is not one of vLLM's {VLLM_MAX_LORA_RANKS}; "
                         "use vllm_max_lora_rank(ranks)")
    top = max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    if top > max_lora_rank:
        raise ValueError(f"{directory}: rank {top} > max_lora_rank {max_lora_rank}: start vLLM with "
                         f"max_lora_rank={vllm_max_lora_rank([top])}")
    tensors = peft_format.read_tensors(directory)
    for module in peft_format._modules_of(tensors, directory):
        a = tensors.get(f"{peft_format.PREFIX}{module}.lora_A.weight")
        b = tensors.get(f"{peft_format.PREFIX}{module}.lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] \
                or a.shape[0] > max_lora_rank:
            raise ValueError(f"{directory}: {module} needs lora_A [r, K] and lora_B [N, r] with r <= "
                             f"{max_lora_rank}, got {None if a is None else tuple(a.shape)} and "
                             f"{None if b is None else tuple(b.shape)}")
    return cfg


def _import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ValueError("the vLLM rollout backend needs vllm: pip install 'lora-engine[vllm]', or use "
                         "the built-in lora_engine.rl.rollout.generate") from e
    return vllm, LoRARequest


class VLLMRollout:
    """One ``vllm.LLM`` serving every adapter of an engine; same results type as ``rollout.generate``.

    Args:
        model_path: the local Hugging Face directory of the engine's base model (vLLM loads its
            own copy of the frozen weights once; only adapters move at each step).
        max_loras: adapters served concurrently in one batch (the engine's adapter count).
        max_lora_rank: a ``VLLM_MAX_LORA_RANKS`` value >= every served rank:
            ``vllm_max_lora_rank([served_rank(engine.adapter_spec(i)) for i in engine.adapter_ids])``.
        workdir: where adapters are written (default: a fresh temporary directory).
        llm_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``dtype``...).
            ``logprobs_mode`` defaults to ``"processed_logprobs"`` so the returned log-probs are
            of the temperature-scaled distribution, as ``rollout.generate`` returns (with top_p = 1;
            ``generate`` recomputes them for top_p < 1).
    """

    def __init__(self, model_path, max_loras: int, max_lora_rank: int, workdir=None, **llm_kwargs):
        vllm, self._LoRARequest = _import_vllm()
        self._vllm = vllm
        if max_lora_rank not in VLLM_MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank={max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}; "
                             "use vllm_max_lora_rank(ranks)")
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model=str(model_path), enable_lora=True, max_loras=max_loras,
                            max_lora_rank=max_lora_rank, **llm_kwargs)
        self.max_lora_rank = max_lora_rank
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lora-engine-vllm-"))
        self.version = 0
        self.requests: dict[int, object] = {}

    def sync(self, engine, ids=None) -> None:
        """Publish the adapters' current weights (call after every optimizer step)."""
        ids = engine.adapter_ids if ids is None else list(ids)
        ranks = {i: served_rank(engine.adapter_spec(i)) for i in ids}
        too_big = [i for i, r in ranks.items() if r > self.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big} exceed max_lora_rank={self.max_lora_rank}: restart with "
                             f"max_lora_rank={vllm_max_lora_rank(ranks.values())}")
        previous = self.workdir / f"v{self.version}"
        self.version += 1
        dirs = export_adapters(engine, self.workdir / f"v{self.version}", ids)
        # Ids must be > 0 and new at every sync: vLLM would otherwise reuse the cached weights.
        self.requests = {i: self._LoRARequest(f"adapter{i}-v{self.version}", self.version * 100_000 + i + 1, str(d))
                         for i, d in dirs.items()}
        shutil.rmtree(previous, ignore_errors=True)

    def generate(self, prompt_ids: list[list[int]], adapter_ids: list[int], *, eos_id: int, pad_id: int,
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 seeds: dict[int, int] | None = None, engine=None) -> Rollouts:
        """Sample one completion per prompt with its own adapter (-1 = base); see ``rollout.generate``.

        Each row gets its own vLLM seed, ``seeds[adapter] * 1_000_003 + k`` for the k-th row of that
        adapter, so an adapter's samples do not depend on the other adapters in the batch.
        With ``top_p < 1`` vLLM's processed log-probs are renormalised over the nucleus, not the
        temperature-scaled distribution ``rollout.generate`` returns: pass ``engine`` (the
        ``MultiLoRAModel`` that was synced) and they are recomputed in fp32 with
        ``recompute_sampling_logp``.
        """
        if len(prompt_ids) != len(adapter_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(adapter_ids)} adapter ids: give one per prompt")
        if top_p < 1 and not greedy and engine is None:
            raise ValueError(f"top_p={top_p} < 1: vLLM's log-probs are renormalised over the nucleus; pass "
                             "engine=<the synced MultiLoRAModel> to recompute them, or sample with top_p=1")
        missing = sorted({a for a in adapter_ids if a != -1 and a not in self.requests})
        if missing:
            raise ValueError(f"adapters {missing} were never synced: call sync(engine) after each optimizer step")
        seen: dict[int, int] = {}
        params, loras = [], []
        for a in adapter_ids:
            k = seen.get(a, 0)
            seen[a] = k + 1
            seed = None if greedy else int((seeds or {}).get(a, 0)) * 1_000_003 + k
            params.append(self._vllm.SamplingParams(
                n=1, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p, seed=seed, logprobs=0, stop_token_ids=[eos_id],
                detokenize=False))
            loras.append(self.requests.get(a))
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling_params=params,
                                 lora_request=loras, use_tqdm=False)
        completions, logps, truncated = [], [], []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            completions.append(toks)
            logps.append([float(step[t].logprob) for step, t in zip(c.logprobs or [], toks)])
            truncated.append(c.finish_reason == "length")
        ro = _to_rollouts(prompt_ids, adapter_ids, completions, logps, truncated, pad_id)
        if top_p < 1 and not greedy:
            ro.sampling_logp = recompute_sampling_logp(engine, ro, temperature)
        return ro


@torch.no_grad()
def recompute_sampling_logp(engine, ro: Rollouts, temperature: float) -> torch.Tensor:
    """[B, C] fp32 log-probs of the sampled tokens under each row's adapter and the
    temperature-scaled distribution (what ``rollout.generate`` reports), 0 after the end."""
    device = next(engine.model.parameters()).device
    P = ro.prompt_len
    score = torch.nn.functional.pad(ro.completion_mask, (P, 0)).to(device)
    logp = engine.sequence_logprobs(ro.input_ids.to(device), ro.attention_mask.to(device),
                                    ro.adapter_ids.to(device), score, temperature=temperature)
    return logp[:, P:].float().cpu()


def _to_rollouts(prompt_ids, adapter_ids, completions, logps, truncated, pad_id) -> Rollouts:
    """Left-padded prompts + right-padded completions, the layout of ``rollout.generate``."""
    input_ids, mask = left_pad(prompt_ids, pad_id, "cpu")
    B, C = len(prompt_ids), max([len(c) for c in completions] + [1])
    comp = torch.full((B, C), pad_id, dtype=torch.long)
    cmask = torch.zeros((B, C), dtype=torch.long)
    slogp = torch.zeros((B, C), dtype=torch.float32)
    for b, (toks, lp) in enumerate(zip(completions, logps)):
        comp[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        cmask[b, :len(toks)] = 1
        slogp[b, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return Rollouts(input_ids=torch.cat([input_ids, comp], 1), attention_mask=torch.cat([mask, cmask], 1),
                    completion_ids=comp, completion_mask=cmask, sampling_logp=slogp,
                    truncated=torch.tensor(truncated, dtype=torch.bool),
                    adapter_ids=torch.tensor(adapter_ids, dtype=torch.long), prompt_len=input_ids.shape[1],
                    prompt_tokens=mask.sum(-1))
