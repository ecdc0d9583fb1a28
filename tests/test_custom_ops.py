"""The Triton-path ops as ``torch.library`` custom ops (``torch.ops.lora_engine.*``).

``torch.library.opcheck`` runs each op under the CPU interpreter and checks its schema, its fake
(meta) implementation against the real one, its autograd registration and AOT dispatch with
dynamic shapes. ``torch.compile(fullgraph=True)`` then traces the public functions (which turn
``LoRALayout`` / ``Routing`` into plain tensors) with no graph break; the ``aot_eager`` backend
runs the traced graph with the same kernels, so results must be the same bits as eager (inductor
would need a C++ toolchain on this machine and changes nothing about the trace).
"""
import pytest
import torch
from torch.library import opcheck

from helpers import assert_close
from lora_engine.kernels.logprobs import token_logprobs_naive, token_logprobs_triton
from lora_engine.kernels.logprobs import triton_logprobs as tlp
from lora_engine.kernels.lora import LoRALayout, lora_column_scale_triton, lora_linear_triton
from lora_engine.kernels.lora import triton_dora, triton_lora
from lora_engine.kernels.policy_loss import METRIC_NAMES, policy_loss_naive
from lora_engine.kernels.policy_loss import triton_policy_loss as plc
from lora_engine.kernels.policy_loss import triton_policy_loss as tpl
from lora_engine.engine.routing import routing_from_token_ids


def _lora(T=40, K=24, N=20, ranks=(1, 3, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, len(ranks), (T,), generator=g)
    ids[ids == 1] = 0  # adapter 1 has no tokens
    layout = LoRALayout(ranks, [2.0 / r for r in ranks])
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return (mk(T, K), mk(N, K) / K ** 0.5, mk(N), mk(sum(ranks), K) / K ** 0.5, mk(N, sum(ranks)), layout,
            routing_from_token_ids(ids, len(ranks)))


def _logprobs(T=20, d=16, V=70, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) / 4, torch.randint(0, V, (T,), generator=g)


def _policy(B=6, L=9, A=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g)
    old = logp + 0.1 * torch.randn(B, L, generator=g)
    ref = logp + 0.1 * torch.randn(B, L, generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.2).float()
    return logp, old, ref, mask, torch.randn(B, generator=g), torch.arange(B) % A


def _cfg(loss_type="dapo", seq=False, beta=0.04, delta=2.0, L=9):
    """The launch config policy_loss_triton builds, captured from its policy_loss_apply call."""
    seen, apply = {}, plc.policy_loss_apply

    def record(*args):
        seen["cfg"] = args[-1]
        return apply(*args)

    logp, old, ref, mask, adv, ids = _policy(L=L)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plc, "policy_loss_apply", record)
        tpl.policy_loss_triton(logp, old, adv, mask, ids, ref_logp=ref, loss_type=loss_type, beta=beta,
                               delta=delta, importance_level="sequence" if seq else "token", num_adapters=3,
                               max_completion_length=L)
    return seen["cfg"]


# --- opcheck ---------------------------------------------------------------------------------

def _needs_grad(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("split", [pytest.param(False, id="one-chunk-per-segment"),
                                   pytest.param(True, id="token-chunks-of-3")])
def test_opcheck_lora_linear(monkeypatch, split):
    if split:
        monkeypatch.setattr(triton_lora, "token_chunk_rows", lambda rank, block_t: 3)
    x, w, b, la, lb, layout, routing = _lora()
    plan, part_rows = triton_lora._plan(layout, routing, x.device)
    assert (part_rows > 0) == split
    x, la, lb = _needs_grad(x, la, lb)
    opcheck(triton_lora._lora_linear_op, (x, w, b, la, lb, plan, layout.max_rank, part_rows))
    _, u = triton_lora._lora_linear_op(x, w, b, la, lb, plan, layout.max_rank, part_rows)
    dy = torch.randn(x.shape[0], w.shape[0])
    for need in ((True, True, True), (False, True, False)):
        opcheck(triton_lora._lora_linear_bwd_op, (dy, x.detach(), w, la.detach(), lb.detach(), u.detach(), plan,
                                                  layout.max_rank, part_rows, *need))


def test_opcheck_column_scale():
    x, w, b, la, lb, layout, routing = _lora()
    y = torch.randn(x.shape[0], w.shape[0])
    scale = 1 + 0.1 * torch.randn(3, w.shape[0])
    plan, part_rows = triton_dora._plan(routing, (True, False, True))
    y_, b_, s_ = _needs_grad(y, b, scale)
    opcheck(triton_dora._column_scale_op, (y_, b_, s_, plan, part_rows, True))
    opcheck(triton_dora._column_scale_bwd_op, (torch.randn_like(y), y, b, scale, plan, part_rows, True,
                                               True, True, True))


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_opcheck_token_logprobs(with_entropy):
    h, w, y = _logprobs()
    opcheck(tlp._token_logprobs_op, (h.requires_grad_(), w, y, 0.9, with_entropy))
    logp, ent, m, log_s = tlp._token_logprobs_op(h.detach(), w, y, 0.9, with_entropy)
    g = torch.randn_like(logp)
    opcheck(tlp._token_logprobs_bwd_op, (h.detach(), w, y, m, log_s, g, ent if with_entropy else None,
                                         g if with_entropy else None, 0.9))


def test_opcheck_policy_loss():
    logp, old, ref, mask, adv, ids = _policy()
    cfg = _cfg()
    args = [[float(cfg[k]) for k in plc.FLOAT_KEYS], [int(cfg[k]) for k in plc.INT_KEYS]]
    opcheck(plc._policy_loss_op, (logp.requires_grad_(), old, ref, mask, adv, ids, 3, *args))
    _, _, rows, counts = plc._policy_loss_op(logp.detach(), old, ref, mask, adv, ids, 3, *args)
    opcheck(plc._policy_loss_bwd_op, (logp.detach(), old, ref, mask, adv, ids, rows, counts, torch.randn(3), *args))


# --- policy_loss_apply against the reference ------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
@pytest.mark.parametrize("seq", [False, True], ids=["token", "sequence"])
def test_policy_loss_apply_matches_the_reference(loss_type, seq):
    cfg = _cfg(loss_type, seq)
    logp, old, ref, mask, adv, ids = _policy()
    outs = []
    x = logp.clone().requires_grad_()
    losses, metrics = plc.policy_loss_apply(x, old, ref, mask, adv, ids, 3, cfg)
    (losses * torch.arange(1.0, 4.0)).sum().backward()
    outs.append((losses, metrics, x.grad))
    x = logp.double().requires_grad_()
    ref_losses, ref_metrics = policy_loss_naive(x, old.double(), adv.double(), mask.double(), ids,
                                                ref_logp=ref.double(), loss_type=loss_type, beta=0.04, delta=2.0,
                                                importance_level="sequence" if seq else "token", num_adapters=3,
                                                max_completion_length=9)
    (ref_losses * torch.arange(1.0, 4.0).double()).sum().backward()
    assert_close(outs[0][0], ref_losses, torch.float32, "losses")
    assert_close(outs[0][2], x.grad, torch.float32, "dlogp")
    for i, k in enumerate(METRIC_NAMES):
        assert_close(outs[0][1][i], ref_metrics[k], torch.float32, k)


def test_policy_loss_apply_refuses_an_unknown_cfg_key():
    with pytest.raises(ValueError, match="FLOAT_KEYS or INT_KEYS"):
        plc.policy_loss_apply(*_policy(), 3, {**_cfg(), "new_knob": 1.0})


# --- torch.compile ------------------------------------------------------------------------------

def _grads_of(fn, *tensors):
    ts = _needs_grad(*tensors)
    outs = fn(*ts)
    sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs] + [t.grad for t in ts]


def test_compile_fullgraph_traces_the_public_functions():
    """LoRA linear -> DoRA column scale -> log-probs -> policy loss in one graph, no break;
    same outputs and gradients as eager."""
    x, w, b, la, lb, layout, routing = _lora()
    scale = 1 + 0.1 * torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(3))
    head = torch.randn(30, w.shape[0], generator=torch.Generator().manual_seed(4)) / 4
    tgt = torch.randint(0, 30, (x.shape[0],), generator=torch.Generator().manual_seed(5))
    cfg = _cfg(L=8)
    adv, ids = torch.randn(5), torch.arange(5) % 3

    def step(x, la, lb, scale):
        y = lora_linear_triton(x, w, b, la, lb, layout, routing)
        out = lora_column_scale_triton(y, b, scale, (True, False, True), routing)
        logp, ent = token_logprobs_triton(out, head, tgt, temperature=0.9, return_entropy=True)
        lp = logp.view(5, 8)
        losses, _ = plc.policy_loss_apply(lp, lp.detach() + 0.05, None, torch.ones(5, 8), adv, ids, 3,
                                          {**cfg, "has_kl": False, "beta": 0.0})
        return out, logp, ent, losses

    torch._dynamo.reset()
    # First call compiled: the layout's and routing's device tables are built inside the trace.
    compiled = _grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), x, la, lb, scale)
    eager = _grads_of(step, x, la, lb, scale)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert torch.equal(c, e), f"output/gradient {i} differs compiled vs eager"


def test_fake_impls_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, b, la, lb, layout, routing = _lora(dtype=torch.float16)
    plan, part_rows = triton_lora._plan(layout, routing, x.device)
    h, head, tgt = _logprobs()
    real = [*triton_lora._lora_linear_op(x, w, b, la, lb, plan, layout.max_rank, part_rows),
            *tlp._token_logprobs_op(h, head, tgt, 1.0, False)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fk = lambda t: mode.from_tensor(t)
        fake = [*triton_lora._lora_linear_op(fk(x), fk(w), fk(b), fk(la), fk(lb), [fk(p) for p in plan],
                                             layout.max_rank, part_rows),
                *tlp._token_logprobs_op(fk(h), fk(head), fk(tgt), 1.0, False)]
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


def test_logprobs_custom_op_matches_reference():
    h, w, y = _logprobs()
    x = h.clone().requires_grad_()
    logp, ent = token_logprobs_triton(x, w, y, temperature=0.9, return_entropy=True)
    (logp.sum() + 2 * ent.sum()).backward()
    x64 = h.double().requires_grad_()
    rl, re = token_logprobs_naive(x64, w.double(), y, temperature=0.9, return_entropy=True)
    (rl.sum() + 2 * re.sum()).backward()
    assert_close(logp, rl, torch.float32, "logp")
    assert_close(ent, re, torch.float32, "entropy")
    assert_close(x.grad, x64.grad, torch.float32, "dh")


@pytest.mark.gpu
def test_decode_step_compiles_and_captures_in_a_cuda_graph_bf16():
    """A decode-like step (LoRA linear, DoRA scale, log-probs; no grad) under inductor with CUDA
    graphs (mode="reduce-overhead"): no graph break, replays give eager's values."""
    x, w, b, la, lb, layout, _ = _lora(T=64, K=128, N=96, dtype=torch.bfloat16)
    x, w, b, la, lb = (t.cuda() for t in (x, w, b, la, lb))
    routing = routing_from_token_ids(torch.arange(64) % 4 - 1, 3, "cuda")
    scale = torch.ones(3, 96, device="cuda")
    head = (torch.randn(500, 96) / 4).to("cuda", torch.bfloat16)
    tgt = torch.randint(0, 500, (64,)).cuda()

    @torch.no_grad()
    def step(x):
        y = lora_column_scale_triton(lora_linear_triton(x, w, b, la, lb, layout, routing), b, scale,
                                     (True, False, True), routing)
        return y, token_logprobs_triton(y, head, tgt)

    eager = step(x)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got = compiled(x)
    for g, e in zip(got, eager):
        assert_close(g.float(), e.float(), torch.bfloat16, "compiled decode step")
