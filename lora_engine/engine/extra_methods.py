"""The methods-table records of MiSS, IA3 and LayerNorm tuning (``methods.TABLE`` holds them):
their init, kernel pack, weight update and PEFT forms. AdaLoRA's are ``adalora.py``'s.

MiSS (PEFT ``tuners/miss``, its default ``init_weights=True``): one trainable block M [r, N] per
module, zero at init, and y += (sum_j x[j r : (j + 1) r]) M, the input cut into shards of r
features (the last one zero-padded) that share M. As a LoRA pair: A_eff [r, K] with
A_eff[i, k] = 1 where k mod r = i (the shard sum), B_eff = M^T [N, r], s = 1; the bank stores
M^T (kind ``miss_B``, the ``cols`` layout) and ``pack`` builds A_eff from the rank rows alone.
dW[n, k] = M[k mod r, n]. Trainable: r N per module (LoRA: r (K + N)).

IA3 (PEFT ``tuners/ia3``): a learned vector per module, ones at init. On a feedforward module
(``AdapterSpec.feedforward_modules``, PEFT's; ``down_proj`` by default) it scales the layer's
input, y = (x * l_in) W^T + b (kind ``ia3_l_in`` [K]); elsewhere its output, bias included,
y = (x W^T + b) * l (kind ``ia3_l`` [N]). Both are ``ops.routed_scale`` on the adapter's rows.
Default targets: k_proj, v_proj, down_proj (the IA3 paper's keys, values and MLP input).

LayerNorm tuning (PEFT ``tuners/ln_tuning``): every targeted norm module gets the adapter's own
copy of its weight (and bias where it has one), initialised to the base's: out = n(x) * w_a + b_a,
n(x) the norm at unit weight and zero bias, per routed row (``layers.MultiNorm``). Default
targets: input_layernorm, post_attention_layernorm and the final norm (PEFT's Llama list).
"""
from __future__ import annotations

import re

import torch

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
LN_TARGETS = ("input_layernorm", "post_attention_layernorm", "norm")


def _name_matches(module: str, patterns) -> bool:
    """PEFT's rule for ``feedforward_modules``: a string is a full-name regex, a list name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


# --- MiSS ---------------------------------------------------------------------------------

def miss_init(spec, module, in_features, out_features, weight, generator):
    return {"miss_B": torch.zeros(out_features, spec.rank_for(module))}


def miss_pack(t, group):
    b = t["miss_B"]  # [N, R]: every MiSS adapter's M^T on this module, side by side
    counts = torch.bincount(group.owner)  # each adapter's rank
    first = counts.cumsum(0) - counts
    pos = torch.arange(group.owner.numel(), device=b.device) - first.index_select(0, group.owner)
    r_row = counts.index_select(0, group.owner)
    k = torch.arange(group.in_features, device=b.device)
    a = ((k[None, :] % r_row[:, None]) == pos[:, None]).to(b.dtype)  # the shard sum, [R, K]
    return [a], [b]


def miss_delta(spec, module, t, weight, vera=None):
    b = t["miss_B"].float()
    return b[:, torch.arange(weight.shape[1], device=b.device) % b.shape[1]]


def miss_peft_config(spec, targets=None):
    return {"peft_type": "MISS", "r": spec.rank, "init_weights": True, "miss_dropout": 0.0, "mini_r": 1}


def miss_from_peft(found, module, r):
    key = f"{module}.miss_block"
    if key in found:
        k, v = found.pop(key)
        found[f"{module}.miss_B"] = (k, v.T)


# --- IA3 ----------------------------------------------------------------------------------

def ia3_is_feedforward(spec, module: str) -> bool:
    ff = spec.feedforward_modules if spec.feedforward_modules is not None else IA3_FEEDFORWARD
    return _name_matches(module, ff)


def ia3_kinds(spec, module, info):
    return ("ia3_l_in",) if ia3_is_feedforward(spec, module) else ("ia3_l",)


def ia3_init(spec, module, in_features, out_features, weight, generator):
    if ia3_is_feedforward(spec, module):
        return {"ia3_l_in": torch.ones(in_features)}
    return {"ia3_l": torch.ones(out_features)}


def ia3_delta(spec, module, t, weight, vera=None):
    """W diag(l_in) - W, or diag(l) W - W (the bias, scaled too on an output module, is not in dW)."""
    w = weight.float()
    if "ia3_l_in" in t:
        return w * (t["ia3_l_in"].float() - 1)[None, :]
    return (t["ia3_l"].float() - 1)[:, None] * w


def ia3_peft_config(spec, targets=None):
    # PEFT wants feedforward_modules inside target_modules: name the exact modules when they are.
    ff = spec.feedforward_modules if spec.feedforward_modules is not None else IA3_FEEDFORWARD
    if isinstance(targets, list):
        ff = [t for t in targets if _name_matches(t, ff)]
    return {"peft_type": "IA3", "feedforward_modules": ff if isinstance(ff, str) else list(ff),
            "init_ia3_weights": True}


def ia3_to_peft(t):
    if "ia3_l_in" in t:
        return {"ia3_l": t["ia3_l_in"][None, :]}  # PEFT: [1, K] on a feedforward module
    return {"ia3_l": t["ia3_l"][:, None]}         # [N, 1] elsewhere


def ia3_from_peft(found, module, r):
    key = f"{module}.ia3_l"
    if key in found and found[key][1].dim() == 2:
        k, v = found.pop(key)
        if v.shape[0] == 1:
            found[f"{module}.ia3_l_in"] = (k, v[0])
        else:
            found[key] = (k, v[:, 0])


# --- LayerNorm tuning -----------------------------------------------------------------------

def ln_kinds(spec, module, info):
    return ("ln_weight", "ln_bias") if info.bias is not None else ("ln_weight",)


def ln_init(spec, module, in_features, out_features, weight, generator, bias=None):
    out = {"ln_weight": weight.detach().float().clone()}
    if bias is not None:
        out["ln_bias"] = bias.detach().float().clone()
    return out


def ln_delta(spec, module, t, weight, vera=None):
    """w_a - w, fp32 [d] (a norm's update is a vector, not a matrix)."""
    return t["ln_weight"].detach().float() - weight.float()


def ln_peft_config(spec, targets=None):
    return {"peft_type": "LN_TUNING"}


def ln_to_peft(t):
    out = {"ln_tuning_layers.weight": t["ln_weight"]}
    if "ln_bias" in t:
        out["ln_tuning_layers.bias"] = t["ln_bias"]
    return out


def ln_from_peft(found, module, r):
    # load_adapter_state strips a trailing ".weight": PEFT's weight arrives as "<module>.ln_tuning_layers".
    for theirs, ours in ((f"{module}.ln_tuning_layers", "ln_weight"), (f"{module}.ln_tuning_layers.bias", "ln_bias")):
        if theirs in found:
            found[f"{module}.{ours}"] = found.pop(theirs)
