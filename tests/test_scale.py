"""Many adapters on one base: an adapter trained beside 1,000 others (ranks 1..64, seven methods,
several target subsets) gets the gradient and the update it gets alone; the bank is laid out
once for the whole list and stores exactly the adapters' own numbers."""
import copy

import pytest
import torch
import transformers

import lora_engine as le
from helpers import assert_as_close_as_torch, assert_close
from lora_engine.engine import methods
from lora_engine.engine.optimizer import BankAdamW

METHODS = ("lora", "rslora", "dora", "lora_fa", "pissa", "vera", "lora_plus")
TARGETS = (None, "attention", ("q_proj", "down_proj"), None, "mlp")
V, L = 97, 5


def _base():
    # The embedded tiny model's shape (every projection >= 64 wide, so ranks 1..64 fit).
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _spec(i: int) -> le.AdapterSpec:
    method = METHODS[i % len(METHODS)]
    rank = 1 + (i * 5) % (32 if method == "pissa" else 64)  # PiSSA keeps 2r rows: r <= 32 here
    return le.AdapterSpec(rank=rank, alpha=16, seed=i, method=method, lr=1e-3 * (1 + i % 3),
                          weight_decay=0.01 * (i % 2), target_modules=TARGETS[i % len(TARGETS)],
                          layers=(1,) if i % 11 == 0 else None)


def _perturb(engine, i, seed):
    """Move adapter i off its init (B = 0 makes most methods no-ops), from its own seed only."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in engine.adapter_parameters(i):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _rows(i):
    g = torch.Generator().manual_seed(2000 + i)
    return torch.randint(0, V, (1, L), generator=g), torch.randn(1, L, V, generator=g)


def _train_step(engine, ids, rows):
    """Forward all ``rows`` (adapter ids[k] on row k), a per-row weighted sum as the loss, one fused step."""
    ids_t = torch.tensor(ids)
    tokens = torch.cat([rows[i][0] for i in ids])
    weights = torch.cat([rows[i][1] for i in ids])
    opt = BankAdamW.of(engine.bank)
    for i in ids:
        opt.configure_from_spec(i, engine.adapter_spec(i))
    (engine(tokens, adapter_ids=ids_t).logits * weights).sum().backward()
    grads = {i: [p.grad.clone() for p in engine.adapter_parameters(i)] for i in ids}
    before = {i: [p.detach().clone() for p in engine.adapter_parameters(i)] for i in ids}
    opt.step(max_grad_norm=1.0)
    opt.zero_grad()
    return grads, {i: [p.detach() - b for p, b in zip(engine.adapter_parameters(i), before[i])] for i in ids}


def _grads64(engine, rows, monkeypatch):
    """Adapter 0's gradients in fp64 (the reference both fp32 runs are measured against).
    ``column_norm_sq`` accumulates in fp32 by design; for fp64 weights it keeps fp64."""
    norm_sq = methods.column_norm_sq
    monkeypatch.setattr(methods, "column_norm_sq", lambda w: torch.linalg.vector_norm(w, dim=1).square()
                        if w.dtype == torch.float64 else norm_sq(w))
    e64 = copy.deepcopy(engine).double()
    (e64(rows[0], adapter_ids=torch.tensor([0])).logits * rows[1].double()).sum().backward()
    return [p.grad for p in e64.adapter_parameters(0)]


@pytest.mark.parametrize("n,targets", [
    pytest.param(71, (0, 2, 3, 4, 5, 6, 7, 64, 70), id="71-adapters"),
    pytest.param(1001, (0, 2, 3, 4, 5, 6, 7, 500, 997, 1000), id="1001-adapters", marks=pytest.mark.slow),
])
def test_an_adapter_beside_many_others_gets_the_update_it_gets_alone(n, targets, monkeypatch):
    specs = [_spec(i) for i in range(n)]
    engine = le.MultiLoRAModel(_base(), specs)
    if n > 500:
        assert sorted({s.rank for s in specs}) == list(range(1, 65))
    for i in range(n):
        _perturb(engine, i, i)
    sizes = sum(p.numel() for i in range(n) for p in engine.adapter_parameters(i))
    assert sizes == sum(p.numel() for p in engine.parameters() if p.requires_grad), "buffers hold exactly the adapters"
    rows = {i: _rows(i) for i in range(n)}
    grads, updates = _train_step(engine, list(range(n)), rows)
    for t in targets:  # every method, ranks 1..64, layer and target subsets
        alone = le.MultiLoRAModel(_base(), [specs[t]])
        _perturb(alone, 0, t)
        with monkeypatch.context() as mp:
            ref64 = _grads64(alone, rows[t], mp)
        g_alone, _ = _train_step(alone, [0], {0: rows[t]})
        # Gradients: the whole model's backward, so measured against fp64 as PyTorch's own fp32
        # run of the adapter alone is (a batch of 5 rows or of 5,005 takes other BLAS paths).
        for j, (gm, ga, g64) in enumerate(zip(grads[t], g_alone[0], ref64)):
            assert_as_close_as_torch(gm, ga, g64, torch.float32, f"adapter {t} ({specs[t].method}) grad {j}")
        # The update: the fused step over the whole bank gives adapter t what it gives a bank of
        # t alone from the same gradients and state (AdamW would turn round-off in near-zero
        # gradients into sign flips: that is the optimiser, not isolation, so feed it the same ones).
        alone = le.MultiLoRAModel(_base(), [specs[t]])
        _perturb(alone, 0, t)
        before = [p.detach().clone() for p in alone.adapter_parameters(0)]
        for p, g in zip(alone.adapter_parameters(0), grads[t]):
            p.grad = g
        opt = BankAdamW.of(alone.bank)
        opt.configure_from_spec(0, specs[t])
        opt.step(max_grad_norm=1.0)
        for j, (um, p, b) in enumerate(zip(updates[t], alone.adapter_parameters(0), before)):
            assert torch.count_nonzero(um) > 0, f"adapter {t} tensor {j} was not updated"
            assert_close(um, p.detach() - b, torch.float32, f"adapter {t} ({specs[t].method}) update {j}")
