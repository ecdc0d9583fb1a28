"""PPO's policy loss for every loss type that takes per-token advantages: ``ppo_step.policy_loss``
(the fused op on the real rows, naive and Triton) against the formula written out in fp64 from
per-token GAE advantages and each loss type's normaliser over the adapter's own sequences."""
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_close
from lora_engine.rl.ppo_step import policy_loss

# Written from TRL 1.16's / verl's definitions (not from kernels.policy_loss): what adapter a's
# summed per-token loss is divided by. n_a: a's sequences (rows without tokens count), m_b: row
# b's tokens, Lc: the generation cap (dr_grpo).
AGG = {
    "grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean",
    "dapo": "token-mean", "bnpo": "token-mean", "cispo": "token-mean",
    "dr_grpo": "seq-sum / (n * Lc)", "luspo": "seq-sum / n",
}
TAU_POS, TAU_NEG = 0.8, 1.3


def _formula(x, old, adv, mask, ids, ref, A, loss_type, eps_low, eps_high, beta, Lc):
    """[A] losses, [A] clip fractions in fp64; ``x`` the log-probs (fp64, requires grad)."""
    on = mask > 0
    lp = torch.where(on, x, torch.zeros_like(x))
    r = torch.exp(torch.where(on, x - old, torch.zeros_like(x)))
    if loss_type == "cispo":
        per = -torch.clamp(r, max=eps_high).detach() * adv * lp
        clipped = (r > eps_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, TAU_POS), torch.full_like(adv, TAU_NEG))
        per = -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv
        clipped = torch.zeros_like(on)
    else:
        per = -torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
        clipped = ((r < 1 - eps_low) & (adv < 0)) | ((r > 1 + eps_high) & (adv > 0))
    if ref is not None:
        d = torch.where(on, ref - x, torch.zeros_like(x))
        per = per + beta * (torch.exp(d) - d - 1)
    m = mask.double()
    row_sum, row_tok = (per * m).sum(1), m.sum(1)
    losses, clip = [], []
    for a in range(A):
        b = ids == a
        n, tok = int(b.sum()), float(row_tok[b].sum())
        kind = AGG[loss_type]
        if kind == "seq-mean-token-mean":
            num, den = (row_sum[b] / row_tok[b].clamp(min=1)).sum(), max(n, 1)
        elif kind == "token-mean":
            num, den = row_sum[b].sum(), max(tok, 1)
        elif kind == "seq-sum / (n * Lc)":
            num, den = row_sum[b].sum(), max(n * Lc, 1)
        else:
            num, den = row_sum[b].sum(), max(n, 1)
        losses.append(num / den)
        clip.append((clipped[b].double() * m[b]).sum() / max(tok, 1))
    return torch.stack(losses), torch.stack(clip)


@pytest.fixture(params=["naive", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
@pytest.mark.parametrize("loss_type", sorted(AGG))
def test_ppo_policy_loss_and_gradient_equal_the_per_token_formula(backend, loss_type, kl_penalty):
    g = torch.Generator().manual_seed(5)
    B, L, A, Lc = 7, 6, 4, 9
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    mask[2] = 0.0  # a sequence without tokens: still one of adapter 2's sequences
    mask[5, :2] = 1.0
    ids = torch.tensor([0, 2, 2, 0, 3, 2, 3])  # adapter 1 has no rows
    logp = -torch.rand(B, L, generator=g) * 3
    old, ref = logp + 0.4 * torch.randn(B, L, generator=g), logp + 0.2 * torch.randn(B, L, generator=g)
    adv = torch.randn(B, L, generator=g) * mask  # GAE's: signs change along a row
    eps_high = 1.1 if loss_type == "cispo" else 0.28
    cfg = SimpleNamespace(loss_type=loss_type, eps_low=0.2, eps_high=eps_high, delta=None, beta=0.07,
                          kl_penalty=kl_penalty, max_new_tokens=Lc,
                          loss_options={"kl_correction": False, "sapo_temperature_pos": TAU_POS,
                                        "sapo_temperature_neg": TAU_NEG})
    w = torch.randn(A, generator=g)
    x = logp.clone().requires_grad_()
    losses, metrics = policy_loss(x, old, adv, mask, ids, ref, A, cfg)
    (losses * w).sum().backward()
    x64 = logp.double().requires_grad_()
    want, clip = _formula(x64, old.double(), adv.double(), mask, ids,
                          ref.double() if kl_penalty == "loss" else None, A, loss_type, 0.2, eps_high, 0.07, Lc)
    (want * w.double()).sum().backward()
    assert_close(losses, want.detach(), torch.float32, "losses")
    assert_close(x.grad, x64.grad, torch.float32, "dlogp")
    assert_close(metrics["clip_frac"], clip, torch.float32, "clip_frac")
    assert float(losses[1].detach()) == 0.0 and float(x.grad[~(mask > 0)].abs().max()) == 0.0
    assert loss_type == "sapo" or float(clip.max()) > 0, "the inputs must hit clipping"


def test_grpo_under_ppo_is_not_the_token_mean():
    """The normaliser is per sequence: a long and a short row weigh equally (a one-token-row
    expansion would weigh them by their lengths)."""
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 0.0, 0.0, 0.0]])
    cfg = SimpleNamespace(loss_type="grpo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, kl_penalty="reward",
                          max_new_tokens=4, loss_options={})
    losses, _ = policy_loss(logp, logp.detach(), adv, mask, torch.tensor([0, 0]), None, 1, cfg)
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-7)  # (-1 + 1) / 2; the token mean is -3/5
