"""What the engine thread runs: training ops on the in-process ``Client``, sampling on its engine.

Every training client of the SDK is one adapter of one ``Client`` on the one base model. A
forward/backward batch queues each request as that adapter's ``forward_backward`` (or
``forward``) and flushes once: one base forward + backward for every adapter in the batch.
``optim_step`` steps one adapter's own AdamW. Sampler weights are adapters too: a saved
``sampler_weights`` checkpoint is loaded into the bank once (least recently used ones are
unloaded past ``max_sampler_adapters``; they reload from the store), an unnamed snapshot
(``save_weights_and_get_sampling_client``) is kept in memory, the last ``snapshots_per_model``
of each model, and only the newest stays loaded until an older one is sampled again. These
caps keep the bank small: the LoRA layers' cost grows with the adapters in
the bank (decoding 256 rows took 1.3 s with 4 adapters, 2.3 s with 64, on the 2-core CPU).
Only this thread touches the model.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_engine.engine import peft_format
from lora_engine.engine.spec import AdapterSpec
from lora_engine.interop.client import Client
from lora_engine.interop.server import sampler, wire
from lora_engine.interop.server.scheduler import Task, UserError
from lora_engine.interop.server.store import Store
from lora_engine.rl.models import load_base, model_path

log = logging.getLogger("lora_engine.serve")
LORA_ALPHA = 32.0  # Tinker fixes alpha; we use AdapterSpec's default (scale alpha / rank)


def spec_for(lora_config: dict) -> AdapterSpec:
    """Tinker's LoraConfig as an AdapterSpec: train_attn / train_mlp pick the modules; the LM head
    is never adapted (train_unembed is accepted and ignored, see docs/INTEGRATIONS.md)."""
    attn, mlp = lora_config.get("train_attn", True), lora_config.get("train_mlp", True)
    if not (attn or mlp):
        raise UserError("train_attn and train_mlp are both False: lora-engine never adapts the unembedding "
                        "(lm_head), so set train_attn=True and/or train_mlp=True")
    targets = "all-linear" if attn and mlp else ("attention" if attn else "mlp")
    return AdapterSpec(rank=int(lora_config["rank"]), alpha=LORA_ALPHA, seed=int(lora_config.get("seed") or 0),
                       target_modules=targets)


@dataclass
class SamplerInfo:
    """A sampling session: the base model, a saved checkpoint, or an in-memory snapshot."""

    sampler_id: str
    session_id: str
    model_path: str | None = None
    directory: Path | None = None
    snapshot: str | None = None


class Backend:
    def __init__(self, model: str, store: Store, *, dtype: str = "float32", device: str = "auto",
                 max_sampler_adapters: int = 16, snapshots_per_model: int = 4):
        net, tokenizer = load_base(model, dtype=dtype, device=device)
        self.client = Client(net, tokenizer)
        self.engine, self.tokenizer, self.store = self.client.engine, tokenizer, store
        self.model_name, self.model_dir = model, str(Path(model_path(model)).resolve())
        cfg = net.config
        self.arch = getattr(cfg, "model_type", None)
        self.vocab_size = int(net.get_output_embeddings().weight.shape[0])
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.handles: dict[str, object] = {}          # model id -> client Adapter (this thread only)
        self.samplers: dict[str, SamplerInfo] = {}    # written once per id, read by the event loop
        self._loaded: OrderedDict[str, int] = OrderedDict()   # sampler key -> bank adapter id (LRU)
        self._snapshots: dict[str, tuple[AdapterSpec, dict]] = {}
        self._snaps_of: dict[str, list[str]] = {}
        self.max_sampler_adapters, self.snapshots_per_model = max_sampler_adapters, snapshots_per_model
        self.base_forwards = 0
        decoder = getattr(net, net.base_model_prefix)
        decoder.register_forward_hook(self._count_forward)
        self._counting = False

    def _count_forward(self, *_):
        self.base_forwards += self._counting

    def served_names(self) -> set[str]:
        return {self.model_name, self.model_dir}

    # -- dispatch ----------------------------------------------------------------------------------
    def run_one(self, task: Task) -> tuple:
        kind, p = task.kind, task.payload
        if kind == "control":
            return getattr(self, f"_{p[0]}")(*p[1:])
        handle = self._handle(p["model_id"])
        if kind == "optim":
            return self._optim(handle, p["adam"])
        if kind == "save_state":
            rec = self._record(p, "weights")
            return ("json", {"path": self.store.write_checkpoint(rec, handle.save_state, p["overwrite"]),
                             "type": "save_weights"})
        if kind == "save_sampler":
            return self._save_sampler(handle, p)
        if kind == "load":
            handle.load_state(p["directory"], optimizer=p["optimizer"])
            return ("json", {"path": p["path"], "model_id": p["model_id"], "type": "load_weights"})
        raise AssertionError(f"unknown task kind {kind}")

    def _handle(self, model_id: str):
        handle = self.handles.get(model_id)
        if handle is None:
            raise UserError(f"model {model_id} is not loaded (its creation failed or its session ended)")
        return handle

    def _record(self, p: dict, kind: str) -> dict:
        return {"model_id": p["model_id"], "kind": kind, "name": p["name"], "owner": p["owner"],
                "session_id": p["session_id"], "base_model": self.model_name}

    # -- control -----------------------------------------------------------------------------------
    def _create_model(self, model_id: str, spec: AdapterSpec, record: dict) -> tuple:
        if model_id not in self.handles:
            self.handles[model_id] = self.client.create_adapter(**{k: getattr(spec, k) for k in
                                                                   ("rank", "alpha", "seed", "target_modules")})
            self.store.save_model({**record, "spec": spec.to_dict()})
        return ("json", {"model_id": model_id, "type": "create_model"})

    def _load_new_model(self, model_id: str, directory: Path, optimizer: bool, path: str, record: dict) -> tuple:
        if model_id not in self.handles:
            handle = self.client.load_state(directory)
            if not optimizer:
                handle.optimizer = None
            self.handles[model_id] = handle
            self.store.save_model({**record, "spec": handle.spec.to_dict(), "loaded_from": path})
        return ("json", {"path": path, "model_id": model_id, "type": "load_weights"})

    def _drop_session(self, session_id: str, model_ids: list[str]) -> tuple:
        for mid in model_ids:
            handle = self.handles.pop(mid, None)
            if handle is not None:
                self.client.adapters.remove(handle)
                self.engine.remove_adapter(handle.id)
            for key in self._snaps_of.pop(mid, []):
                self._forget(key)
        for sid in [s for s, info in list(self.samplers.items()) if info.session_id == session_id]:
            del self.samplers[sid]
        return ("json", {})

    # -- training ----------------------------------------------------------------------------------
    def _optim(self, handle, adam: dict) -> tuple:
        clip = float(adam.get("grad_clip_norm", 0.0))
        out = handle.optim_step(lr=float(adam.get("learning_rate", 1e-4)),
                                betas=(float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95))),
                                eps=float(adam.get("eps", 1e-12)), weight_decay=float(adam.get("weight_decay", 0.0)),
                                grad_clip=clip if clip > 0 else None)
        return ("json", {"metrics": {"grad_norm:mean": out["grad_norm"], "step:max": float(out["step"]),
                                     "skipped:sum": float(out["skipped"])}, "type": "optim_step"})

    def run_fwdbwd(self, batch: list[tuple[str, Task]]) -> list:
        """One base forward + backward for every request of the batch; one result each."""
        results, queued = [None] * len(batch), []
        for k, (model_id, task) in enumerate(batch):
            fb: wire.FwdBwd = task.payload
            try:
                fut = self._handle(model_id).forward_backward(fb.batch, fb.loss, loss_config=fb.config,
                                                              forward_only=fb.forward_only)
                queued.append((k, fut, fb))
            except ValueError as e:
                results[k] = UserError(str(e))
        self._counting = True
        try:
            self.client.flush()
        finally:
            self._counting = False
        for k, fut, fb in queued:
            out = fut.result()
            lp = out.logprobs.cpu().numpy()
            metrics = {"loss:sum": out.loss, "tokens:sum": out.metrics["tokens"]}
            metrics.update({wire.metric_key(m, "mean"): v for m, v in out.metrics.items() if m != "tokens"})
            results[k] = ("proto", wire.forward_backward_output([lp[b, :n] for b, n in enumerate(fb.lengths)], metrics))
        return results

    # -- sampler weights ---------------------------------------------------------------------------
    def _save_sampler(self, handle, p: dict) -> tuple:
        if p.get("name"):
            def write(tmp):
                self.engine.save_adapter(handle.id, tmp, base_model_name=self.model_name)
            path = self.store.write_checkpoint(self._record(p, "sampler_weights"), write, overwrite=True)
            return ("json", {"path": path, "type": "save_weights_for_sampler"})
        mid = p["model_id"]
        key = f"{mid}#snapshot-{p['seq_id']}"
        self._snapshots[key] = (handle.spec, peft_format.peft_state_dict_for(self.engine, handle.id))
        snaps = self._snaps_of.setdefault(mid, [])
        for older in snaps:  # unloaded (the bank stays small), kept in memory for a late sample
            i = self._loaded.pop(older, None)
            if i is not None:
                self.engine.remove_adapter(i)
        snaps.append(key)
        while len(snaps) > self.snapshots_per_model:
            self._forget(snaps.pop(0))
        sid = p["sampler_id"]
        self.samplers[sid] = SamplerInfo(sid, p["session_id"], snapshot=key)
        return ("json", {"sampling_session_id": sid, "type": "save_weights_for_sampler"})

    def _forget(self, key: str) -> None:
        self._snapshots.pop(key, None)
        i = self._loaded.pop(key, None)
        if i is not None:
            self.engine.remove_adapter(i)

    def _adapter_for(self, info: SamplerInfo) -> int:
        """The bank id serving a sampler (-1: the base model), loading it if needed."""
        key = info.snapshot or (str(info.directory) if info.directory is not None else None)
        if key is None:
            return -1
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        if info.snapshot is not None:
            if key not in self._snapshots:
                raise UserError("this sampling client's weights snapshot was superseded (the server keeps the "
                                f"last {self.snapshots_per_model} per model): call save_weights_and_get_sampling_client "
                                "again")
            spec, tensors = self._snapshots[key]
            i = self.engine.add_adapter(spec)
            peft_format.load_adapter_state(self.engine, i, tensors)
        else:
            i = self.engine.load_adapter(info.directory)
        for prm in self.engine.adapter_parameters(i):
            prm.requires_grad_(False)  # frozen: training batches never give it gradients
        self._loaded[key] = i
        while len(self._loaded) > self.max_sampler_adapters:
            self.engine.remove_adapter(self._loaded.popitem(last=False)[1])
        return i

    # -- sampling ----------------------------------------------------------------------------------
    def run_samples(self, tasks: list[Task]) -> list:
        results, reqs = [None] * len(tasks), []
        for k, task in enumerate(tasks):
            job = task.payload
            try:
                info = self.samplers.get(job["sampler_id"])
                if info is None:
                    raise UserError(f"unknown sampling session {job['sampler_id']!r}")
                job["request"].adapter_id = self._adapter_for(info)
                reqs.append((k, job))
            except ValueError as e:
                results[k] = UserError(str(e))
        if not reqs:
            return results
        decoded = sampler.decode(self.engine, [job["request"] for _, job in reqs], pad_id=self.client.pad_id,
                                 detokenize=self.tokenizer.decode)
        scored = [(k, job) for k, job in reqs if job["prompt_logprobs"] or job["topk"]]
        scores = dict(zip([k for k, _ in scored], sampler.prompt_logprobs(
            self.engine, [(j["request"].adapter_id, j["request"].prompt, j["topk"]) for _, j in scored],
            pad_id=self.client.pad_id))) if scored else {}
        for (k, job), seqs in zip(reqs, decoded):
            plp, topk = scores.get(k, (None, None))
            if plp is not None and job["last_n"]:
                plp[:len(plp) - job["last_n"]] = np.nan
                if topk is not None:
                    topk[1][:len(plp) - job["last_n"]] = sampler.TOPK_UNDEFINED
            results[k] = ("proto", wire.sample_response(seqs, plp if job["prompt_logprobs"] else None, topk))
        return results
