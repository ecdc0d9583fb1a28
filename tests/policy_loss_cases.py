"""Shared by the policy-loss tests: input builder, the configuration tables, the call helper, and
an independent fp64 formula of every loss type written from TRL 1.16's definitions
(``GRPOTrainer._compute_loss`` and ``get_gamma_weights``), not from our reference."""
import math

import pytest
import torch

from lora_engine.kernels.policy_loss import policy_loss_naive, policy_loss_triton

FNS = [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
       pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")]

SHAPES = [
    # (B, L, A, pattern)
    pytest.param(11, 37, 3, "random", id="B11-L37-A3"),
    pytest.param(6, 20, 2, "masked-row", id="fully-masked-row"),
    pytest.param(7, 16, 4, "empty-adapter", id="adapter-without-sequences"),
    pytest.param(3, 1, 1, "random", id="L1-single-adapter"),
]


def cfg(loss_type, level="token", delta=None, beta=0.0, ref=False, **options):
    """One configuration: the loss type, its importance level, delta, beta, whether ref_logp is
    passed, and loss-type options (kl_correction, eps_high, sapo_*/vespo_* hyperparameters)."""
    return dict(loss_type=loss_type, importance_level=level, delta=delta, beta=beta, ref=ref, **options)


# cispo's eps_high is the ratio cap itself: 1.2 caps part of the ratios (they span ~0.4 to ~2.5).
CISPO = dict(eps_high=1.2)
CONFIGS = [
    pytest.param(cfg("grpo"), id="grpo"),
    pytest.param(cfg("bnpo", beta=0.04, ref=True), id="bnpo-kl"),
    pytest.param(cfg("dr_grpo", delta=1.5, ref=True), id="dr_grpo-delta-refnokl"),
    pytest.param(cfg("dapo", delta=1.5, beta=0.1, ref=True), id="dapo-delta-kl"),
    pytest.param(cfg("grpo", "sequence", beta=0.1, ref=True), id="gspo-grpo-kl"),
    pytest.param(cfg("dapo", "sequence", delta=1.2), id="gspo-dapo-delta"),
    pytest.param(cfg("dr_grpo", "sequence", beta=0.04, ref=True), id="gspo-dr_grpo-kl"),
    pytest.param(cfg("bnpo", "sequence", delta=1.5), id="gspo-bnpo-delta"),
    # bias-corrected KL (TRL's use_bias_correction_kl) on the clipped types, both levels
    pytest.param(cfg("grpo", delta=1.5, beta=0.1, ref=True, kl_correction=True), id="grpo-delta-klcorr"),
    pytest.param(cfg("dapo", "sequence", beta=0.1, ref=True, kl_correction=True), id="gspo-dapo-klcorr"),
    pytest.param(cfg("dr_grpo", beta=0.04, ref=True, kl_correction=True), id="dr_grpo-klcorr"),
    pytest.param(cfg("bnpo", "sequence", ref=True, kl_correction=True), id="gspo-bnpo-refnokl-corr"),
    # the four TRL 1.16 additions
    pytest.param(cfg("cispo", delta=1.5, beta=0.04, ref=True, **CISPO), id="cispo-kl-delta-ignored"),
    pytest.param(cfg("cispo", "sequence", beta=0.1, ref=True, kl_correction=True, **CISPO),
                 id="cispo-seq-klcorr"),
    pytest.param(cfg("cispo", eps_high=5.0), id="cispo-cap5"),
    pytest.param(cfg("sapo", beta=0.04, ref=True), id="sapo-kl"),
    pytest.param(cfg("sapo", "sequence", beta=0.1, ref=True, kl_correction=True,
                     sapo_temperature_pos=0.7, sapo_temperature_neg=1.6), id="sapo-seq-klcorr-temps"),
    pytest.param(cfg("luspo", "sequence", beta=0.04, ref=True), id="luspo-seq-kl"),
    pytest.param(cfg("luspo", delta=1.5, beta=0.1, ref=True, kl_correction=True), id="luspo-token-delta-klcorr"),
    pytest.param(cfg("vespo", beta=0.04, ref=True), id="vespo-kl"),
    pytest.param(cfg("vespo", beta=0.1, ref=True, kl_correction=True, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                     vespo_k_neg=4.0, vespo_lambda_neg=-1.0), id="vespo-klcorr-params-lambda-clamped"),
    pytest.param(cfg("vespo", "sequence", beta=0.1, ref=True, kl_correction=True), id="vespo-seq-klcorr"),
]


def make_inputs(B, L, A, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, L, generator=g) * 0.5 - 2.0
    # log-ratios of std 0.3: ratios from ~0.4 to ~2.5, so every clip region and delta are hit
    old = logp + torch.randn(B, L, generator=g) * 0.3
    ref = logp + torch.randn(B, L, generator=g) * 0.3
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    ids = torch.randint(0, A, (B,), generator=g)
    if pattern == "masked-row":
        mask[1] = False
    elif pattern == "empty-adapter":
        ids[ids == 1] = 0
    return logp, old, ref, mask, adv, ids


def call_kwargs(c):
    """The keyword arguments of policy_loss_* for configuration ``c`` (less ref_logp)."""
    kw = dict(c, eps_low=0.2, eps_high=c.get("eps_high", 0.28))
    kw.pop("ref")
    return kw


def loss_and_grad(fn, logp, old, ref, mask, adv, ids, A, c, dtype, g_out, mcl=None):
    x = logp.to(dtype).detach().requires_grad_()
    cast = (lambda t: t.double()) if dtype == torch.float64 else (lambda t: t)
    losses, metrics = fn(x, cast(old), cast(adv), mask, ids, ref_logp=cast(ref) if c["ref"] else None,
                         num_adapters=A, max_completion_length=mcl, **call_kwargs(c))
    (losses * g_out.to(losses.dtype)).sum().backward()
    return losses, metrics, x.grad


# --- the independent formula: vectorised with one-hot adapter matrices, no per-adapter loop ----

def formula(logp, old, adv, mask, ids, ref, A, loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None,
            beta=0.0, importance_level="token", mcl=None, kl_correction=False, sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
            vespo_lambda_neg=2.0):
    """(losses [A], metrics) in fp64, differentiable w.r.t. ``logp`` [B, L] fp64."""
    m = mask.double()
    on = m != 0
    lp = logp * on
    lr = (logp - old) * on
    lw = lr
    if importance_level == "sequence":
        lw = ((lr * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(m)
    r = lw.exp()
    a = adv if adv.dim() == 2 else adv[:, None].expand_as(m)  # [B, L]: one advantage per token
    low = high = torch.zeros_like(m, dtype=torch.bool)
    if loss_type == "cispo":
        # MiniMax-M1: the capped ratio is a constant weight on the log-prob's gradient
        loss_tok = -torch.minimum(r, torch.full_like(r, eps_high)).detach() * a * lp
        high = (r > eps_high) & (a > 0)
    elif loss_type == "sapo":
        tau = torch.full_like(m, sapo_temperature_neg)
        tau[a > 0] = sapo_temperature_pos
        gate = 1.0 / (1.0 + torch.exp(-tau * (r - 1.0)))
        loss_tok = -gate * (4.0 / tau) * a
    elif loss_type == "vespo":
        # phi(W) = e^lam W^k e^(-lam W), W the sequence ratio from the *summed* clamped log-ratios
        s = (lr.clamp(-20, 20) * m).sum(1, keepdim=True).clamp(math.log(1e-8), 20.0)
        W = s.exp().detach()
        pos = adv[:, None] >= 0
        k = torch.where(pos, adv.new_tensor(vespo_k_pos), adv.new_tensor(vespo_k_neg))
        lam = torch.where(pos, adv.new_tensor(vespo_lambda_pos), adv.new_tensor(vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam) * W ** k * torch.exp(-lam * W)
        phi = torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))
        loss_tok = -phi * a * lp
    else:
        r1 = r if delta is None else torch.minimum(r, torch.full_like(r, delta))
        r2 = r.clamp(1 - eps_low, 1 + eps_high)
        loss_tok = -torch.minimum(r1 * a, r2 * a)
        low = (r1 < 1 - eps_low) & (a < 0)
        high = (r1 > 1 + eps_high) & (a > 0)
    kl = torch.zeros_like(m)
    if ref is not None:
        diff = (ref - logp) * on
        kl = diff.exp() - diff - 1
        if kl_correction:
            kl = kl * r
        loss_tok = loss_tok + beta * kl
    onehot = torch.nn.functional.one_hot(ids, A).double()  # [B, A]
    n_seq = onehot.sum(0)
    row, msum = (loss_tok * m).sum(1), m.sum(1)
    tok = onehot.t() @ msum
    if loss_type in ("grpo", "sapo"):
        losses = (onehot.t() @ (row / msum.clamp(min=1))) / n_seq.clamp(min=1)
    elif loss_type == "luspo":
        losses = (onehot.t() @ row) / n_seq.clamp(min=1)
    elif loss_type == "dr_grpo":
        losses = (onehot.t() @ row) / (n_seq * (m.shape[1] if mcl is None else mcl)).clamp(min=1)
    else:
        losses = (onehot.t() @ row) / tok.clamp(min=1)
    low, high = low.double() * m, high.double() * m
    per_a = lambda t: (onehot.t() @ t.sum(1)) / tok.clamp(min=1)  # noqa: E731
    metrics = dict(clip_frac_low=per_a(low), clip_frac_high=per_a(high),
                   clip_frac=per_a(torch.maximum(low, high)), kl_mean=per_a(kl.detach() * m),
                   ratio_mean=per_a(r.detach() * m))
    return losses, metrics
