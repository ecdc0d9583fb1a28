"""AdaLoRA's budget over a bank: each adapter's pruning (the budget schedule, the importance
EMAs, the threshold) equals PEFT's RankAllocator on a model of that adapter alone, with other
adapters (another AdaLoRA schedule, a LoRA) in the same batch; pruning masks in place (no
relayout); the importance state moves with its adapter; the orthogonality regulariser is PEFT's."""
import copy

import pytest
import torch

import lora_engine as le
from helpers import assert_close
from lora_engine.engine import peft_format
from lora_engine.engine.adalora import RankAllocator
from models import tiny_model

peft = pytest.importorskip("peft")
TARGETS = ("q_proj", "v_proj", "down_proj")
SPECS = [le.AdapterSpec(rank=6, alpha=12, method="adalora", seed=1, target_modules=TARGETS,
                        adalora=dict(target_r=2, tinit=1, tfinal=2, delta_t=2, total_step=8)),
         le.AdapterSpec(rank=4, method="lora", seed=2),
         le.AdapterSpec(rank=3, alpha=6, method="adalora", seed=3, target_modules=("k_proj", "up_proj"), layers=(1,),
                        adalora=dict(target_r=1, tinit=0, tfinal=1, delta_t=1, total_step=6, beta1=0.7, beta2=0.9))]


def _perturb(engine, i, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in engine.adapter_parameters(i):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _singular_values(engine, i):
    return torch.cat([p.detach() for n, p in engine.bank.named_parameters_of(i).items() if n.endswith("adalora_E")])


def _peft_singular_values(pm, engine, i):
    return torch.cat([pm.get_submodule(f"base_model.model.{n.rsplit('.', 1)[0]}").lora_E["default"].detach().reshape(-1)
                      for n in engine.bank.named_parameters_of(i) if n.endswith("adalora_E")])


def test_budget_and_pruning_match_peft_per_adapter_in_a_mixed_bank():
    base = tiny_model()
    engine = le.MultiLoRAModel(copy.deepcopy(base), SPECS)
    for i in engine.adapter_ids:
        _perturb(engine, i, 10 + i)
    peft_models = {}
    for i in (0, 2):
        cfg = peft_format.peft_config_for(SPECS[i], engine.bank.modules_of(i))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(cfg))
        peft.set_peft_model_state_dict(pm, peft_format.peft_state_dict_for(engine, i))
        peft_models[i] = pm
    alloc = RankAllocator(engine.bank)
    ids = torch.randint(0, 97, (6, 7), generator=torch.Generator().manual_seed(0))
    adapter_ids = torch.tensor([0, 1, 2, 0, 2, -1])
    pointers = {n: p.data_ptr() for n, p in engine.bank.store.named_parameters()}
    kept = {0: [], 2: []}
    for step in range(8):
        w = torch.randn(6, 7, 97, generator=torch.Generator().manual_seed(step))
        engine.zero_grad(set_to_none=True)
        (engine(ids, adapter_ids=adapter_ids).logits * w).sum().backward()
        budget = alloc.update(step)
        for i, pm in peft_models.items():
            rows = (adapter_ids == i).nonzero().squeeze(1)
            pm.zero_grad(set_to_none=True)
            (pm(ids[rows]).logits * w[rows]).sum().backward()
            pm.base_model.update_and_allocate(step)
            ours, theirs = _singular_values(engine, i), _peft_singular_values(pm, engine, i)
            assert torch.equal(ours != 0, theirs != 0), f"adapter {i} step {step}: pruned triplets differ from PEFT's"
            assert_close(ours, theirs, torch.float32, f"adapter {i} step {step}: E")
            kept[i].append(int((ours != 0).sum()))
        assert int(budget[1]) == 0, "not AdaLoRA: no budget"
    assert kept[0][0] == 36 and kept[0][-1] == 12, "adapter 0: 6 modules x r 6 -> target 2 per module"
    assert kept[2][0] == 6 and kept[2][-1] == 2, "adapter 2: 2 modules x r 3 -> target 1 per module"
    assert len(set(kept[0])) > 2, "the budget shrinks in steps"
    assert pointers == {n: p.data_ptr() for n, p in engine.bank.store.named_parameters()}, "pruning never relays out"
    assert engine.bank.layout("model.layers.0.self_attn.q_proj").ranks[0] == 6, "the kernel keeps r rows (E masked)"


def test_importance_state_moves_with_its_adapter():
    engine = le.MultiLoRAModel(tiny_model(), [SPECS[1], SPECS[0]])
    _perturb(engine, 1, 3)
    alloc = RankAllocator(engine.bank)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    (engine(ids, adapter_ids=torch.tensor([1, 0])).logits.square()).sum().backward()
    alloc.update(0)
    name = "model.layers.0.self_attn.q_proj"
    store = engine.bank.store[name.replace(".", "__")]
    before = store._buffers["adalora_A__ada_ipt"].clone()
    assert before.abs().sum() > 0
    engine.remove_adapter(0)
    engine.add_adapter(le.AdapterSpec(rank=2, method="adalora", target_modules=TARGETS))
    store = engine.bank.store[name.replace(".", "__")]
    after = store._buffers["adalora_A__ada_ipt"]
    off, r = engine.bank.module_layout(name).slots["adalora_A"].span(1)
    assert torch.equal(after[off:off + r], before), "adapter 1's importance followed it"
    new_off, new_r = engine.bank.module_layout(name).slots["adalora_A"].span(2)
    assert torch.count_nonzero(after[new_off:new_off + new_r]) == 0, "a new adapter starts from zero importance"


def test_orth_penalty_is_peft_regulariser():
    base = tiny_model()
    engine = le.MultiLoRAModel(copy.deepcopy(base), [SPECS[1], SPECS[0]])
    _perturb(engine, 1, 4)
    cfg = peft_format.peft_config_for(SPECS[0], engine.bank.modules_of(1))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(cfg))
    peft.set_peft_model_state_dict(pm, peft_format.peft_state_dict_for(engine, 1))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_reg = pm(ids, labels=ids).loss
        plain = pm.base_model.model(ids, labels=ids).loss
    pen = RankAllocator(engine.bank).orth_penalty()
    assert pen[0] == 0, "the LoRA adapter has no penalty"
    assert_close(pen[1:2], (with_reg - plain).reshape(1), torch.float32, "orth_reg_weight x R")
    pen.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in engine.adapter_parameters(0))
