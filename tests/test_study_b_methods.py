"""Study B's four methods beyond the nine (AdaLoRA, MiSS, IA3, LayerNorm tuning): forward and
every gradient equal to PEFT's for identical weights, PEFT export/import both ways, LN tuning
on a norm with a bias, the trainable share of each method."""
import copy

import pytest
import torch
from torch import nn

import lora_engine as le
from helpers import assert_as_close_as_torch, assert_close
from lora_engine.engine import peft_format
from models import tiny_model

peft = pytest.importorskip("peft")


def _perturb(engine, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in engine.adapter_ids:
            for p in engine.adapter_parameters(i):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _peft_grad_key(module: str, kind: str):
    """(PEFT parameter name, how its gradient maps onto our tensor's shape) of our ``kind``."""
    pre = f"base_model.model.{module}."
    return {"miss_B": (pre + "miss_block.default", lambda g: g.T),
            "ia3_l": (pre + "ia3_l.default", lambda g: g.reshape(-1)),
            "ia3_l_in": (pre + "ia3_l.default", lambda g: g.reshape(-1)),
            "ln_weight": (pre + "ln_tuning_layers.default.weight", lambda g: g),
            "ln_bias": (pre + "ln_tuning_layers.default.bias", lambda g: g),
            "adalora_A": (pre + "lora_A.default", lambda g: g),
            "adalora_E": (pre + "lora_E.default", lambda g: g.reshape(-1)),
            "adalora_B": (pre + "lora_B.default", lambda g: g)}[kind]


SPECS = [
    # rank 5: 64 and 96 input features leave a remainder shard (PEFT zero-pads it).
    pytest.param(dict(method="miss", rank=5), id="miss-all-linear-remainder-shard"),
    pytest.param(dict(method="miss", rank=4, target_modules="attention", layers=(1,)), id="miss-attention-layer1"),
    pytest.param(dict(method="ia3"), id="ia3-k-v-down"),
    pytest.param(dict(method="ia3", target_modules=("q_proj", "o_proj", "up_proj", "down_proj"),
                      feedforward_modules=("up_proj",)), id="ia3-up-as-feedforward"),
    pytest.param(dict(method="ln_tuning"), id="ln_tuning-default"),
    pytest.param(dict(method="ln_tuning", target_modules=("post_attention_layernorm", "q_norm")),
                 id="ln_tuning-per-head-q_norm"),
    pytest.param(dict(method="adalora", rank=6, alpha=12, adalora=dict(target_r=2, total_step=10)), id="adalora"),
]


def _ids(B=2, L=7, seed=0):
    return torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", SPECS)
def test_matches_peft_output_and_grads(kw):
    spec = le.AdapterSpec(**{"rank": 4, "alpha": 8, "seed": 5, **kw})
    base = tiny_model()
    engine = le.MultiLoRAModel(copy.deepcopy(base), [spec])
    _perturb(engine)
    cfg = peft_format.peft_config_for(spec, engine.bank.modules_of(0))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(cfg))
    sd = peft_format.peft_state_dict_for(engine, 0)
    res = peft.set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    assert set(peft.get_peft_model_state_dict(pm)) == set(sd), "our keys are PEFT's keys"
    pm64 = copy.deepcopy(pm).double()
    ids = _ids()
    w = torch.randn(2, 7, 97, generator=torch.Generator().manual_seed(9))
    engine.zero_grad(set_to_none=True)
    ours = engine(ids, adapter_ids=torch.tensor([0, 0])).logits
    (ours * w).sum().backward()
    theirs = pm(ids).logits
    (theirs * w).sum().backward()
    theirs64 = pm64(ids).logits
    (theirs64 * w.double()).sum().backward()
    # Whole model: ours may be at most ~2x as far from fp64 as PEFT's own fp32 model is.
    assert_as_close_as_torch(ours.detach(), theirs.detach(), theirs64.detach(), torch.float32, "logits vs PEFT")
    assert not torch.allclose(theirs, base(ids).logits, atol=1e-4), "the perturbed adapter changes the output"
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    grads64 = {n: p.grad for n, p in pm64.named_parameters() if p.requires_grad}
    seen = set()
    for name, p in engine.bank.named_parameters_of(0).items():
        module, kind = name.rsplit(".", 1)
        key, fix = _peft_grad_key(module, kind)
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
        assert_as_close_as_torch(p.grad, fix(grads[key]), fix(grads64[key]), torch.float32, name)
        seen.add(key)
    assert seen == set(grads), "every PEFT parameter has its counterpart"


@pytest.mark.parametrize("kw", SPECS[::2])
def test_peft_directory_round_trip_both_ways(kw, tmp_path):
    spec = le.AdapterSpec(**{"rank": 4, "alpha": 8, "seed": 5, **kw})
    base = tiny_model()
    src = le.MultiLoRAModel(copy.deepcopy(base), [spec])
    _perturb(src)
    src.save_adapter(0, tmp_path / "ours")
    # Ours -> PEFT: PeftModel.from_pretrained reads the directory and computes what we compute.
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    ids = _ids()
    with torch.no_grad():
        ours = src(ids, adapter_ids=torch.tensor([0, 0])).logits
        theirs = pm(ids).logits
    assert_close(ours, theirs, torch.float32, "PEFT loading our directory")
    # PEFT -> ours: a directory PEFT wrote (no sidecar) loads with the spec its config describes.
    pm.save_pretrained(str(tmp_path / "peft"))
    dst = le.MultiLoRAModel(copy.deepcopy(base))
    i = dst.load_adapter(tmp_path / "peft")
    assert dst.adapter_spec(i).method == spec.method
    with torch.no_grad():
        back = dst(ids, adapter_ids=torch.tensor([i, i])).logits
    assert_close(back, theirs, torch.float32, "our engine loading PEFT's directory")


class _LNModel(nn.Module):
    """A causal-LM-shaped toy with a biased nn.LayerNorm (the HF tiny models' norms have none)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm, self.head = nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, input_ids=None, attention_mask=None):
        return self.head(self.norm(self.embed(input_ids)))


def test_ln_tuning_on_a_layernorm_with_bias_is_the_adapters_own_norm():
    engine = le.MultiLoRAModel(_LNModel(), [le.AdapterSpec(rank=1, method="ln_tuning", target_modules=("norm",)),
                                            le.AdapterSpec(rank=1, method="lora", seed=1)])
    t = engine.bank.tensors(0, "norm")
    assert set(t) == {"ln_weight", "ln_bias"} and torch.equal(t["ln_bias"], engine.model.norm.base.bias)
    _perturb(engine)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    out = engine(ids, adapter_ids=torch.tensor([0, -1, 0]))
    own = copy.deepcopy(engine.model.norm.base)
    with torch.no_grad():
        own.weight.copy_(t["ln_weight"])
        own.bias.copy_(t["ln_bias"])
        want = engine.model.head.base(own(engine.model.embed(ids)))
        base = engine.model.head.base(engine.model.norm.base(engine.model.embed(ids)))
    assert_close(out[0::2], want[0::2], torch.float32, "LN-tuned rows")
    assert torch.equal(out[1], base[1]), "a base row is the base norm, bit for bit"


def test_trainable_share_per_method():
    base = tiny_model()
    total = sum(p.numel() for p in base.parameters())
    counts = {}
    for m in ("lora", "miss", "ia3", "ln_tuning", "adalora"):
        e = le.MultiLoRAModel(copy.deepcopy(base), [le.AdapterSpec(rank=4, method=m)])
        counts[m] = sum(p.numel() for p in e.adapter_parameters(0))
    # 2 layers x 7 projections (K, N: q 64x64, k/v 64x32, o 64x64, gate/up 64x96, down 96x64).
    assert counts["lora"] == 4 * 2 * (128 + 96 + 96 + 128 + 160 + 160 + 160)
    assert counts["miss"] == 4 * 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64), "r N per module"
    assert counts["ia3"] == 2 * (32 + 32 + 96), "k, v outputs and down_proj's input"
    assert counts["ln_tuning"] == 64 * 5, "two norms per layer and the final norm"
    assert counts["adalora"] == counts["lora"] + 4 * 14, "LoRA's P, Q plus r singular values per module"
    assert counts["miss"] / total < counts["lora"] / total


class OffsetRMSNorm(nn.Module):
    """Gemma's form, n(x) * (1 + weight): not n(x) * weight, which LN tuning relies on."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _OffsetModel(_LNModel):
    def __init__(self):
        super().__init__()
        self.norm = OffsetRMSNorm(8)


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: le.AdapterSpec(rank=2, adalora={"target_r": 1}), "AdaLoRA's schedule", id="schedule-on-lora"),
    pytest.param(lambda: le.AdapterSpec(rank=2, method="adalora", adalora={"target": 1}), "unknown field",
                 id="schedule-unknown-field"),
    pytest.param(lambda: le.AdapterSpec(rank=2, method="adalora", adalora={"tinit": 5, "total_step": 5}),
                 "no budgeting phase", id="schedule-no-budget-phase"),
    pytest.param(lambda: le.AdapterSpec(rank=2, method="adalora", adalora={"beta1": 1.0}), "beta1", id="beta-range"),
    pytest.param(lambda: le.AdapterSpec(rank=2, feedforward_modules=("down_proj",)), "IA3's", id="ff-on-lora"),
    pytest.param(lambda: le.AdapterSpec(rank=2, method="ia3", rank_pattern={"q_proj": 4}), "does not apply",
                 id="ia3-rank_pattern"),
    pytest.param(lambda: le.MultiLoRAModel(_OffsetModel(), [le.AdapterSpec(rank=1, method="ln_tuning",
                                                                            target_modules=("norm",))]),
                 "not n\\(x\\) \\* weight", id="ln-tuning-offset-norm"),
    pytest.param(lambda: le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=1, method="ia3",
                                                                          target_modules=("input_layernorm",))]),
                 "match no wrapped", id="ia3-on-a-norm"),
])
def test_bad_input_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
