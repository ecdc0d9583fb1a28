"""Tinker's wire format <-> the client's types: protobuf forward_backward bodies in, protobuf
results out, JSON model inputs for sampling.

The message classes are the SDK's own generated module (``tinker.proto.tinker_public_pb2``,
the ``serve`` extra installs ``tinker``): the field numbers are the SDK's, not ours to restate.
Every check raises ``WireError`` with an HTTP status and a one-line message naming the fix;
nothing here touches the model.

Alignment: a Tinker datum is N input tokens ``x`` and per-token inputs of length N, entry i
about ``target_tokens[i]`` predicted from ``x[:i + 1]``; that is ``Batch.target_ids``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lora_engine.interop.batches import LOSS_CONFIG, Batch

PROTO = "application/x-protobuf"
TINKER_LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# Which loss_fn_inputs each loss reads; "weights" is optional everywhere (a token mask for
# the RL losses, the signed per-token weight of cross_entropy).
REQUIRED_INPUTS = {"cross_entropy": ("target_tokens",), **{k: RL_INPUTS for k in TINKER_LOSSES[1:]}}
OPTIONAL_INPUTS = ("weights",)


class WireError(ValueError):
    """A request the server refuses: ``status`` (4xx) and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def pb():
    """The SDK's protobuf module (imported on first use: the core never needs it)."""
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


# --- requests in --------------------------------------------------------------------------------

def decode_body(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The raw protobuf bytes of a request (zstd-decompressed if the client compressed it)."""
    if (content_encoding or "").lower() in ("", "identity"):
        return body
    if content_encoding.lower() != "zstd":
        raise WireError(415, f"Content-Encoding {content_encoding!r} is not supported: send zstd or none")
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
    except zstandard.ZstdError as e:
        raise WireError(413 if "size" in str(e).lower() else 400,
                        f"the zstd body did not decompress within {max_bytes} bytes: {e}") from None


def parse_forward_backward(raw: bytes):
    msg = pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except Exception as e:  # the protobuf runtime raises its own DecodeError types
        raise WireError(400, f"forward_backward body is not a tinker_public.ForwardBackwardRequest: {e}") from None
    if not msg.model_id:
        raise WireError(400, "forward_backward needs model_id")
    return msg


def _array(t, name: str) -> np.ndarray:
    """A proto Tensor as a dense numpy array of its shape."""
    P = pb()
    dtypes = {P.DTYPE_FLOAT32: np.dtype("<f4"), P.DTYPE_INT64: np.dtype("<i8"), P.DTYPE_INT32: np.dtype("<i4")}
    if t.dtype not in dtypes:
        raise WireError(400, f"loss_fn_inputs[{name!r}]: dtype {t.dtype} unsupported: send float32 or int64")
    dt, shape = dtypes[t.dtype], [int(s) for s in t.shape]
    if any(s < 0 for s in shape) or len(shape) > 2:
        raise WireError(400, f"loss_fn_inputs[{name!r}]: shape {shape} invalid: per-token inputs are [N]")
    size = int(np.prod(shape)) if shape else 1
    if t.WhichOneof("encoding") == "sparse_csr":
        sp = t.sparse_csr
        if len(shape) != 2:
            raise WireError(400, f"loss_fn_inputs[{name!r}]: a sparse tensor needs a 2-D shape")
        try:
            vals = np.frombuffer(sp.values, dt)
            crow, col = np.frombuffer(sp.crow_indices, "<i8"), np.frombuffer(sp.col_indices, "<i8")
            dense = np.zeros(shape, dt)
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = vals
        except (ValueError, IndexError) as e:
            raise WireError(400, f"loss_fn_inputs[{name!r}]: malformed sparse CSR tensor ({e})") from None
        return dense
    if len(t.dense) != size * dt.itemsize:
        raise WireError(400, f"loss_fn_inputs[{name!r}]: {len(t.dense)} bytes for shape {shape} of {dt}")
    return np.frombuffer(t.dense, dt).reshape(shape)


def loss_config_of(msg, loss: str) -> dict:
    """``loss_fn_config_v2`` (numbers) over the legacy ``loss_fn_config``; unknown keys refused."""
    cfg = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") != "number":
            raise WireError(400, f"loss_fn_config[{k!r}] must be a number")
        cfg[k] = float(v.number)
    unknown = sorted(set(cfg) - set(LOSS_CONFIG[loss]))
    if unknown:
        raise WireError(400, f"loss_fn_config keys {unknown} are not used by {loss!r}; it takes "
                             f"{sorted(LOSS_CONFIG[loss]) or 'none'}")
    if not all(np.isfinite(v) for v in cfg.values()):
        raise WireError(400, "loss_fn_config values must be finite numbers")
    missing = [k for k, default in LOSS_CONFIG[loss].items() if default is None and k not in cfg]
    if missing:
        raise WireError(400, f"loss {loss!r} needs loss_config {missing} (e.g. {{'beta': 0.05}})")
    return cfg


@dataclass
class FwdBwd:
    """One validated forward_backward request: a ``Batch`` for the client, and how to answer."""

    batch: Batch
    loss: str
    config: dict
    forward_only: bool
    lengths: list[int]  # tokens of each datum, to cut the [B, L] log-probs back into datums

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def to_fwdbwd(msg, *, vocab_size: int, max_len: int, max_datums: int, pad_id: int) -> FwdBwd:
    """Validate a ``ForwardBackwardRequest`` and build its right-padded ``Batch``."""
    loss = msg.loss_fn
    if loss not in TINKER_LOSSES:
        raise WireError(400, f"loss_fn {loss!r} is not served: use one of {list(TINKER_LOSSES)} "
                             "(custom losses: forward_backward_custom, computed client-side)")
    if not 0 < len(msg.data) <= max_datums:
        raise WireError(400 if not msg.data else 413,
                        f"forward_backward has {len(msg.data)} datums: send 1..{max_datums} per request")
    config = loss_config_of(msg, loss)
    rows = []
    for i, d in enumerate(msg.data):
        kinds = [c.WhichOneof("chunk") for c in d.model_input]
        if any(k != "encoded_text" for k in kinds):
            raise WireError(400, f"datum {i}: only encoded_text chunks are served (got {kinds}): "
                                 "this server is text-only")
        if any(len(c.encoded_text.tokens) % 4 for c in d.model_input):
            raise WireError(400, f"datum {i}: encoded_text.tokens must be little-endian int32 bytes")
        x = np.concatenate([np.frombuffer(c.encoded_text.tokens, "<i4") for c in d.model_input] or [np.zeros(0, "<i4")])
        N = len(x)
        if not 0 < N <= max_len:
            raise WireError(400, f"datum {i}: {N} input tokens; this model takes 1..{max_len}")
        inputs = {k: _array(v, k) for k, v in d.loss_fn_inputs.items()}
        missing = [k for k in REQUIRED_INPUTS[loss] if k not in inputs]
        unknown = sorted(set(inputs) - set(REQUIRED_INPUTS[loss]) - set(OPTIONAL_INPUTS))
        if missing or unknown:
            raise WireError(400, f"datum {i}: loss {loss!r} takes loss_fn_inputs {list(REQUIRED_INPUTS[loss])} "
                                 f"(+ optional weights); missing {missing}, not used {unknown}")
        for k, v in inputs.items():
            if v.shape != (N,):
                raise WireError(400, f"datum {i}: loss_fn_inputs[{k!r}] has shape {list(v.shape)}, expected [{N}] "
                                     "(one entry per input token)")
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise WireError(400, f"datum {i}: loss_fn_inputs[{k!r}] holds NaN or inf")
        tokens = [x, inputs["target_tokens"]]
        for name, t in zip(("model_input", "target_tokens"), tokens):
            if t.dtype.kind not in "iu" or (t.size and (t.min() < 0 or t.max() >= vocab_size)):
                raise WireError(400, f"datum {i}: {name} must be integer token ids in [0, {vocab_size})")
        if loss != "cross_entropy" and "weights" in inputs and (inputs["weights"] < 0).any():
            raise WireError(400, f"datum {i}: weights of {loss!r} are a token mask and must be >= 0")
        rows.append((x, inputs))
    return FwdBwd(_batch(rows, loss, pad_id), loss, config, bool(msg.forward_only), [len(x) for x, _ in rows])


def _batch(rows, loss: str, pad_id: int) -> Batch:
    B, L = len(rows), max(len(x) for x, _ in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    tgt, attn = torch.zeros((B, L), dtype=torch.long), torch.zeros((B, L), dtype=torch.long)
    w = torch.zeros((B, L), dtype=torch.float32)
    rl = loss != "cross_entropy"
    q, adv = (torch.zeros((B, L), dtype=torch.float32) for _ in range(2)) if rl else (None, None)
    for b, (x, inp) in enumerate(rows):
        N = len(x)
        ids[b, :N] = torch.from_numpy(x.astype(np.int64))
        tgt[b, :N] = torch.from_numpy(inp["target_tokens"].astype(np.int64))
        attn[b, :N] = 1
        w[b, :N] = torch.from_numpy(inp["weights"].astype(np.float32)) if "weights" in inp else 1.0
        if rl:
            q[b, :N] = torch.from_numpy(inp["logprobs"].astype(np.float32))
            adv[b, :N] = torch.from_numpy(inp["advantages"].astype(np.float32))
    return Batch(ids, w, attn, sampling_logprobs=q, advantages=adv, target_ids=tgt)


def prompt_tokens(model_input: dict, vocab_size: int) -> list[int]:
    """The token ids of a JSON ``ModelInput`` (``{"chunks": [{"type": "encoded_text", "tokens"}]}``)."""
    chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
    if not isinstance(chunks, list):
        raise WireError(400, 'prompt must be a ModelInput: {"chunks": [{"type": "encoded_text", "tokens": [...]}]}')
    out: list[int] = []
    for c in chunks:
        if not isinstance(c, dict) or c.get("type", "encoded_text") != "encoded_text":
            raise WireError(400, "only encoded_text prompt chunks are served; this server is text-only")
        toks = c.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in toks):
            raise WireError(400, f"prompt tokens must be integer ids in [0, {vocab_size})")
        out.extend(toks)
    return out


# --- results out --------------------------------------------------------------------------------

def metric_key(name: str, reduction: str) -> str:
    # The SDK splits metric keys on ":" to combine chunks: exactly one, with a known reduction.
    return f"{name.replace(':', '_')}:{reduction}"


def forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float]) -> bytes:
    """``ForwardBackwardOutput``: one ``logprobs`` [N] float32 tensor per datum, and metrics."""
    P = pb()
    out = P.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    rec = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
    field = rec.fields["logprobs"]
    field.dtype = P.DTYPE_FLOAT32
    flat = [np.ascontiguousarray(a, dtype="<f4").reshape(-1) for a in logprobs]
    field.data = b"".join(a.tobytes() for a in flat)
    field.offsets = np.cumsum([0] + [a.nbytes for a in flat]).astype("<i8").tobytes()  # byte offsets
    return out.SerializeToString()


def sample_response(sequences: list[tuple[list[int], list[float], bool]], prompt_logprobs: np.ndarray | None,
                    topk: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    """``SampleResponse``: (tokens, logprobs, stopped) per sequence; prompt log-probs with NaN
    where undefined (the SDK shows None); top-k prompt log-probs as [P, k] ids and values."""
    P = pb()
    resp = P.SampleResponse()
    for tokens, lps, stopped in sequences:
        resp.sequences.add(stop_reason=P.STOP_REASON_STOP if stopped else P.STOP_REASON_LENGTH,
                           tokens=np.asarray(tokens, "<i4").tobytes(), logprobs=np.asarray(lps, "<f4").tobytes())
    if prompt_logprobs is not None:
        resp.prompt_logprobs = np.asarray(prompt_logprobs, "<f4").tobytes()
    if topk is not None:
        ids, vals = topk
        resp.topk_prompt_logprobs.CopyFrom(P.TopkLogprobs(token_ids=np.asarray(ids, "<i4").tobytes(),
                                                          logprobs=np.asarray(vals, "<f4").tobytes(),
                                                          k=ids.shape[1], length=ids.shape[0]))
    return resp.SerializeToString()
