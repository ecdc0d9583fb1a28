"""Parity with TRL 1.16's own ``GRPOTrainer._compute_loss`` (called, not transcribed) on the same
inputs, for every loss type, token and sequence ratios, two-sided delta, and the plain and the
bias-corrected KL (``use_bias_correction_kl``); and our defaults against GRPOConfig's."""
import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_close
from lora_engine.kernels.policy_loss import LOSS_OPTION_DEFAULTS, LOSS_TYPES, policy_loss_naive, policy_loss_triton
from policy_loss_cases import make_inputs

grpo = pytest.importorskip("trl.trainer.grpo_trainer")


def _f32(v: float) -> float:
    """TRL builds sapo's temperature tensor with ``torch.where(adv > 0, t_pos, t_neg)`` from two
    Python floats, i.e. in the default dtype fp32: its 1.05 is 1.0499999523. Both sides get the
    fp32 value so an fp64 comparison measures the loss, not that rounding (5e-8 relative)."""
    return float(torch.tensor(v, dtype=torch.float32))


# Per loss type: the options both TRL and we get (TRL's names; eps_high is TRL's epsilon_high).
OPTIONS = {
    "cispo": dict(eps_high=1.2),  # the cap on the ratio: part of the ratios (~0.4 to ~2.5) exceed it
    "sapo": dict(sapo_temperature_pos=_f32(1.0), sapo_temperature_neg=_f32(1.05)),
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=4.0, vespo_lambda_neg=0.5),
}


class _TRLTrainerStub:
    """The attributes GRPOTrainer._compute_loss reads (trl 1.16), for one process, no vLLM,
    no entropy mask/bonus, train mode, gradient accumulation 1."""

    def __init__(self, logp, loss_type, level, eps_low, eps_high, delta, beta, L, kl_correction, options):
        self._logp = logp
        self.loss_type = loss_type
        self.importance_sampling_level = level
        self.epsilon_low, self.epsilon_high, self.beta = eps_low, eps_high, beta
        defaults = {k: v for k, v in LOSS_OPTION_DEFAULTS.items() if k != "kl_correction"}
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=kl_correction, steps_per_generation=1,
                                    **dict(defaults, **options))
        self.get_gamma_weights = grpo.GRPOTrainer.get_gamma_weights  # a staticmethod: no self
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.max_completion_length = L
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda t: t,
                                           gather_for_metrics=lambda t: t,
                                           reduce=lambda t, reduction="sum": t)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logp, torch.zeros_like(self._logp), None


TRL_CONFIGS = [
    pytest.param(lt, lvl, delta, beta, corr,
                 id=f"{lt}-{lvl}-{'delta' if delta else 'nodelta'}-beta{beta}{'-klcorr' if corr else ''}")
    for lt in LOSS_TYPES
    for lvl, delta, beta in (("token", None, 0.0), ("token", 1.4, 0.04), ("sequence", None, 0.04))
    for corr in ((False, True) if beta else (False,))
]


@pytest.mark.parametrize("loss_type,level,delta,beta,kl_correction", TRL_CONFIGS)
def test_parity_with_trl_grpo_trainer(loss_type, level, delta, beta, kl_correction):
    _check_trl_parity(loss_type, level, delta, beta, kl_correction, mcl=None)


@pytest.mark.parametrize("loss_type,level,delta,beta,kl_correction",
                         [p for p in TRL_CONFIGS if p.values[0] == "dr_grpo"])
def test_parity_with_trl_dr_grpo_max_completion_length(loss_type, level, delta, beta, kl_correction):
    """TRL's dr_grpo divides by its config's max_completion_length, here 13 + 19 > L = 13."""
    _check_trl_parity(loss_type, level, delta, beta, kl_correction, mcl=13 + 19)


def _check_trl_parity(loss_type, level, delta, beta, kl_correction, mcl):
    B, L = 6, 13
    logp, old, ref, mask, adv, _ = make_inputs(B, L, 1, "masked-row", seed=3)
    logp, old, ref, adv = logp.double(), old.double(), ref.double(), adv.double()
    ids = torch.zeros(B, dtype=torch.long)
    options = dict(OPTIONS.get(loss_type, {}))
    eps_high = options.pop("eps_high", 0.28)

    x_trl = logp.clone().requires_grad_()
    stub = _TRLTrainerStub(x_trl, loss_type, level, 0.2, eps_high, delta, beta, L if mcl is None else mcl,
                           kl_correction, options)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long),
                  prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, L, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=mask.sum())
    trl_loss = grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    trl_loss.backward()
    assert x_trl.grad.abs().sum() > 0

    got = stub._metrics["train"]
    for fn, dtype in ((policy_loss_naive, torch.float64), (policy_loss_triton, torch.float32)):
        x = logp.detach().to(dtype).requires_grad_()
        losses, metrics = fn(x, old, adv, mask, ids, ref_logp=ref, loss_type=loss_type,
                             eps_low=0.2, eps_high=eps_high, delta=delta, beta=beta, importance_level=level,
                             max_completion_length=mcl, kl_correction=kl_correction, **options)
        losses.sum().backward()
        assert_close(losses[0], trl_loss.detach(), dtype, f"{fn.__name__} loss vs TRL")
        assert_close(x.grad, x_trl.grad, dtype, f"{fn.__name__} dlogp vs TRL")
        if beta != 0:
            trl_kl = torch.tensor(got["kl"][-1], dtype=torch.float64)
            assert_close(metrics["kl_mean"][0], trl_kl, dtype, "kl vs TRL")
        if level != "token":  # at sequence level TRL weighs sequences equally, we weigh tokens
            continue
        if loss_type == "cispo":
            pairs = (("clip_frac_high", "cispo_clip_ratio"), ("clip_frac", "cispo_clip_ratio"))
            assert got["cispo_clip_ratio"][-1] > 0  # the cap of 1.2 is hit
        elif loss_type in ("sapo", "vespo"):  # no hard clipping, TRL logs no clip ratio
            pairs = ()
            assert not any(k.startswith("clip_ratio") for k in got)
            assert all(float(metrics[k][0]) == 0 for k in ("clip_frac_low", "clip_frac_high", "clip_frac"))
        else:
            pairs = (("clip_frac_low", "clip_ratio/low_mean"), ("clip_frac_high", "clip_ratio/high_mean"),
                     ("clip_frac", "clip_ratio/region_mean"))
        for ours, theirs in pairs:
            assert abs(float(metrics[ours][0]) - got[theirs][-1]) < 1e-6, ours


def test_defaults_are_grpo_configs():
    """Our keyword defaults are GRPOConfig 1.16's, except kl_correction: TRL's
    use_bias_correction_kl defaults to True, ours to False (plain k3; see the docstrings)."""
    from trl import GRPOConfig
    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name, ours in LOSS_OPTION_DEFAULTS.items():
        if name == "kl_correction":
            assert fields["use_bias_correction_kl"] is True and ours is False
        else:
            assert fields[name] == ours, name
    help_text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    for name in LOSS_TYPES:
        assert f"'{name}'" in help_text, name
