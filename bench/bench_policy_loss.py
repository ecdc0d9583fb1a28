"""Benchmark: per-adapter policy loss (every TRL 1.16 loss type) + k3 KL, forward and forward + backward.

Providers:
  naive          ``policy_loss_naive``: the reference, one TRL-style loss per adapter (boolean
                 row selection per adapter, so A passes over the batch).
  torch_compile  a vectorised plain-PyTorch version of the same loss type (one-hot adapter
                 matrix, no per-adapter loop, no host syncs) under ``torch.compile``: the best a
                 PyTorch user gets.
  triton         ``policy_loss_triton`` (GPU only: the CPU interpreter is not a benchmark).
  (No peer: Liger's GRPO loss takes logits, not log-probs, and has no per-adapter aggregation.)

Metrics: fwd_ms, fwd_bwd_ms, peak_mb (CUDA only) and gbps. The op is memory bound; the bytes a
fused forward + backward must move are: forward reads logp, old_logp, ref_logp, mask; the
backward reads them again and writes dlogp:
``bytes = B * L * (2 * (e_logp + e_old + e_ref + e_mask) + e_logp)``, e_* the element sizes.

Token-level ratios; ``--loss-types`` picks the loss types (a comma list or ``all``; default
dapo), ``--kl-correction`` the bias-corrected KL. vespo reads each row twice (its weight needs
the row's summed log-ratio first); the byte count is the single-pass minimum for every type.
Rows of the default configuration (dapo, plain k3) keep the shape string of earlier rows;
other configurations append ``,loss=<type>`` and ``,klcorr``.

    python bench/bench_policy_loss.py                   # GPU: B=256 L=4096 A=8
    python bench/bench_policy_loss.py --csv /tmp/r.csv  # CPU: B=64 L=512 A=4
    python bench/bench_policy_loss.py --loss-types all --kl-correction
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CSV_PATH, append_rows, bench_ms, peak_memory_mb, triton_runs  # noqa: E402

from lora_engine.kernels.policy_loss import (LOSS_OPTION_DEFAULTS, LOSS_TYPES, policy_loss_naive,  # noqa: E402
                                             policy_loss_triton)

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04
CISPO_CAP = 5.0  # cispo's eps_high is the ratio cap itself; ScaleRL's (and TRL's doc) value
OPT = LOSS_OPTION_DEFAULTS


def vectorised_loss(logp, old, adv, mask, ids, ref, A: int, loss_type: str, kl_correction: bool):
    """One loss type + k3 KL per adapter without a per-adapter loop (token-level ratio)."""
    m = mask.float()
    on = m != 0
    lp = torch.where(on, logp.float(), torch.zeros_like(m))
    lr = torch.where(on, lp - old, torch.zeros_like(m))
    r = torch.exp(lr)
    a = adv[:, None]
    if loss_type == "cispo":
        loss_tok = -r.clamp(max=CISPO_CAP).detach() * a * lp
    elif loss_type == "sapo":
        tau = torch.where(a > 0, OPT["sapo_temperature_pos"], OPT["sapo_temperature_neg"])
        loss_tok = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
    elif loss_type == "vespo":
        with torch.no_grad():
            log_w = (lr.clamp(-20, 20) * m).sum(1, keepdim=True).clamp(-18.420680743952367, 20.0)
            k = torch.where(a >= 0, OPT["vespo_k_pos"], OPT["vespo_k_neg"])
            lam = torch.where(a >= 0, OPT["vespo_lambda_pos"], OPT["vespo_lambda_neg"]).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(0.0, 0.0, 0.0)
        loss_tok = -phi * a * lp
    else:
        loss_tok = -torch.minimum(r * a, r.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a)
    diff = torch.where(on, ref - lp, torch.zeros_like(m))
    kl = torch.exp(diff) - diff - 1
    loss_tok = loss_tok + BETA * (kl * r if kl_correction else kl)
    onehot = torch.nn.functional.one_hot(ids, A).float()  # [B, A]
    row, msum = (loss_tok * m).sum(1), m.sum(1)
    n = onehot.sum(0).clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        return (onehot.t() @ (row / msum.clamp(min=1.0))) / n
    if loss_type == "luspo":
        return (onehot.t() @ row) / n
    if loss_type == "dr_grpo":
        return (onehot.t() @ row) / (n * m.shape[1])
    return (onehot.t() @ row) / (onehot.t() @ msum).clamp(min=1.0)


def providers(cuda: bool, A: int, loss_type: str = "dapo", kl_correction: bool = False) -> dict:
    kw = dict(loss_type=loss_type, eps_low=EPS_LOW, eps_high=CISPO_CAP if loss_type == "cispo" else EPS_HIGH,
              beta=BETA, num_adapters=A, kl_correction=kl_correction)
    compiled = torch.compile(vectorised_loss)
    out = {
        "naive": lambda lp, old, adv, m, ids, ref: policy_loss_naive(
            lp, old, adv, m, ids, ref_logp=ref, **kw)[0],
        "torch_compile": lambda lp, old, adv, m, ids, ref: compiled(lp, old, adv, m, ids, ref, A, loss_type,
                                                                    kl_correction),
    }
    if triton_runs():
        out["triton"] = lambda lp, old, adv, m, ids, ref: policy_loss_triton(
            lp, old, adv, m, ids, ref_logp=ref, **kw)[0]
    return out


def main(argv=None) -> list:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=256 if cuda else 64)
    p.add_argument("--L", type=int, default=4096 if cuda else 512)
    p.add_argument("--A", type=int, default=8 if cuda else 4)
    p.add_argument("--providers", default="", help="comma list; default: all available")
    p.add_argument("--loss-types", default="dapo", help=f"comma list of {', '.join(LOSS_TYPES)}, or 'all'")
    p.add_argument("--kl-correction", action="store_true", help="bias-corrected KL (k3 times the ratio)")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    args = p.parse_args(argv)
    loss_types = LOSS_TYPES if args.loss_types == "all" else tuple(args.loss_types.split(","))
    bad = [t for t in loss_types if t not in LOSS_TYPES]
    if bad:
        p.error(f"unknown loss types {bad}; use a comma list of {', '.join(LOSS_TYPES)} or 'all'")

    B, L, A = args.B, args.L, args.A
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    logp = torch.randn(B, L, device=dev, generator=g) * 0.5 - 2.0
    old = logp + 0.3 * torch.randn(B, L, device=dev, generator=g)
    ref = logp + 0.3 * torch.randn(B, L, device=dev, generator=g)
    mask = torch.rand(B, L, device=dev, generator=g) > 0.2
    adv = torch.randn(B, device=dev, generator=g)
    ids = torch.randint(0, A, (B,), device=dev, generator=g)
    grad = torch.randn(A, device=dev, generator=g)
    mask_f = mask.float()
    n_bytes = B * L * (2 * (logp.element_size() + old.element_size() + ref.element_size()
                            + mask_f.element_size()) + logp.element_size())

    wanted = [s for s in args.providers.split(",") if s]
    rows = []
    for loss_type in loss_types:
        shape = f"B={B},L={L},A={A},fp32"
        if loss_type != "dapo" or args.kl_correction:
            shape += f",loss={loss_type}" + (",klcorr" if args.kl_correction else "")
        print(shape)
        for name, fn in providers(cuda, A, loss_type, args.kl_correction).items():
            if wanted and name not in wanted:
                continue
            x = logp.detach().requires_grad_()

            def fwd():
                return fn(x, old, adv, mask_f, ids, ref)

            def fwd_bwd():
                fn(x, old, adv, mask_f, ids, ref).backward(grad)
                x.grad = None

            fwd_ms = bench_ms(fwd)
            fb_ms = bench_ms(fwd_bwd)
            peak = peak_memory_mb(fwd_bwd)
            metrics = dict(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, peak_mb=peak, gbps=n_bytes / (fb_ms * 1e-3) / 1e9)
            print(f"  {name:14s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fb_ms:8.3f} ms  peak {peak:8.1f} MiB  "
                  f"{metrics['gbps']:8.1f} GB/s")
            rows += [dict(op="policy_loss", provider=name, shape=shape, metric=k, value=v)
                     for k, v in metrics.items()]
    append_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
