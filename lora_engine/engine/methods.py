"""PEFT methods on one shared frozen base: each adapter's tensors, how they are packed for the
multi-adapter kernel, the weight update they amount to, and their PEFT export.

Every method is a LoRA-shaped pair that the packed kernel computes (``y += s x A_eff^T B_eff^T``
on the adapter's rows), plus, for two methods, one more term in ``MultiLoRALinear``:

    method     per module: trainable | frozen               kernel pair A_eff [R', K], B_eff [N, R']    s        R'
    lora       A [r, K], B [N, r]                           A, B                                        alpha/r  r
    rslora     as lora                                      A, B                                        alpha/sqrt(r)
    lora_plus  as lora; B's learning rate x ratio (16 by default, as in the LoRA+ paper)
    lora_fa    B | A (random, never trained)                A, B                                        alpha/r  r
    dora       A, B, m [N]                                  A, B, then y <- y + (m/||W + sBA||_c - 1) (y - bias)
    pissa      A, B | A0, B0 (top-r SVD of W)               [A - A0; A0], [B, B - B0]                   alpha/r  2r
    milora     as pissa, bottom-r singular triplets
    vera       d [r], b [N] | A_v [r, K_max], B_v [N_max, r] shared by all VeRA adapters of the same
               (rank, projection_prng_key, targets)         diag(d) A_v[:, :K], diag(b) B_v[:N]         1        r
    full       dW [N, K] (init 0): the expensive baseline   none (R' = 0); y += x dW^T in the layer

PiSSA/MiLoRA in PEFT subtract s B0 A0 from the base weight. Here the base is shared and never
changes, so the adapter carries the subtraction itself: s x (A^T B^T - A0^T B0^T), written as
s x ((A - A0)^T B^T + A0^T (B - B0)^T) so that at step 0 both halves are exactly zero (the model
is bitwise the base) and later the kernel never subtracts two copies of W's top-r part (the
plain difference would carry a rounding error of ~eps * sigma_1(W) on every forward, whatever
the size of the update). Gradients are exactly those of s x A^T B^T.

DoRA follows PEFT 0.21 (``tuners/lora/dora.py``): y = bias + g (x W^T + s x A^T B^T) with
g = m / ||W + s B A||_c and the norm detached (DoRA paper, section 4.3).
"""
from __future__ import annotations

import math
import re

import torch

METHODS = ("lora", "rslora", "lora_plus", "lora_fa", "dora", "pissa", "milora", "vera", "full")
LORA_PLUS_RATIO = 16.0
SVD_METHODS = ("pissa", "milora")
_AB = ("lora_A", "lora_B")
# Per-module tensor kinds of each method, in the order ``named_parameters_of`` lists them; lora_A
# then lora_B first, the order plain-LoRA checkpoints and optimiser states were written in.
KINDS = {
    "lora": _AB, "rslora": _AB, "lora_plus": _AB, "lora_fa": _AB,
    "dora": _AB + ("lora_magnitude_vector",),
    "pissa": _AB + ("lora_A0", "lora_B0"), "milora": _AB + ("lora_A0", "lora_B0"),
    "vera": ("vera_lambda_d", "vera_lambda_b"),
    "full": ("delta_weight",),
}
FROZEN = {"lora_fa": ("lora_A",), "pissa": ("lora_A0", "lora_B0"), "milora": ("lora_A0", "lora_B0")}
PREFIX = "base_model.model."


def pattern_key(patterns, module: str):
    """PEFT's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching the module name."""
    for key in patterns or ():
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def is_trainable(method: str, kind: str) -> bool:
    return kind not in FROZEN.get(method, ())


def kernel_rank(spec, module: str) -> int:
    """Rows of this adapter in the module's packed ``A_all`` (0: not in the kernel)."""
    if spec.method == "full":
        return 0
    r = spec.rank_for(module)
    return 2 * r if spec.method in SVD_METHODS else r


# --- init ---------------------------------------------------------------------------------

def kaiming_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """PEFT VeRA's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(shape[1])."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(rank: int, key: int, n_max: int, k_max: int):
    """The shared frozen (A_v [r, K_max], B_v [N_max, r]) exactly as PEFT's VeraModel draws them."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((rank, k_max), gen)
    return a, kaiming_uniform((n_max, rank), gen)


def column_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W[n, :]||^2 for every output n, fp32 [N] (DoRA's "column" norm in PEFT's [N, K] layout)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


def dora_norm(weight, lora_a, lora_b, scale: float, w_sq) -> torch.Tensor:
    """||W + s B A||_c, fp32 [N], no gradient (PEFT detaches it).

    Expanded as ||W_n||^2 + 2 s <W_n, (BA)_n> + s^2 ||(BA)_n||^2 with ``w_sq`` = ||W_n||^2 cached:
    costs N K r, like PEFT's, but never materialises [N, K] (235 MB in fp32 for a 4096 x 14336
    projection). With B = 0 (init) it is exactly sqrt(w_sq), so g = m / norm is exactly 1.
    """
    with torch.no_grad():
        a, b = lora_a.float(), lora_b.float()
        cross = ((weight @ lora_a.to(weight.dtype).T).float() * b).sum(1)
        ba_sq = ((b @ (a @ a.T)) * b).sum(1)
        return (w_sq + 2.0 * scale * cross + scale * scale * ba_sq).clamp_min(0.0).sqrt()


def _svd_pair(weight, r: int, scale: float, bottom: bool):
    # PEFT's pissa_init: W = U S V^T in fp32, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T.
    u, s_vals, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    idx = slice(len(s_vals) - r, None) if bottom else slice(0, r)
    root = (s_vals[idx] / scale).sqrt()
    return root[:, None] * vh[idx], u[:, idx] * root[None, :]


def init_tensors(spec, module: str, in_features: int, out_features: int, weight, generator) -> dict:
    """Adapter tensors for one module, fp32 on the CPU or (SVD/DoRA inits) on W's device.

    ``generator`` (seeded by ``spec.seed``) draws A for the LoRA-family methods, one module
    after another in sorted order, so an adapter's init never depends on other adapters.
    """
    m = spec.method
    if m == "full":
        return {"delta_weight": torch.zeros(out_features, in_features)}
    r = spec.rank_for(module)
    if m == "vera":
        return {"vera_lambda_d": torch.full((r,), float(spec.d_initial)),
                "vera_lambda_b": torch.zeros(out_features)}
    if weight is None and m in SVD_METHODS + ("dora",):
        raise ValueError(f"method {m!r} needs the base weight of {module}: register modules through "
                         "MultiLoRAModel (or pass weight= to AdapterBank.register_module_info)")
    if m in SVD_METHODS:
        a, b = _svd_pair(weight, r, spec.scale_for(module), bottom=m == "milora")
        return {"lora_A": a, "lora_B": b, "lora_A0": a.clone(), "lora_B0": b.clone()}
    a = torch.empty(r, in_features)
    if spec.init == "default":
        # kaiming_uniform_(a=sqrt(5)) on [r, K] is U(-1/sqrt(K), 1/sqrt(K)), as nn.Linear and PEFT do.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
    else:
        a.normal_(0.0, 1.0 / r, generator=generator)
    out = {"lora_A": a, "lora_B": torch.zeros(out_features, r)}
    if m == "dora":
        # m = ||W + s B A||_c with B = 0: the same function the forward uses, so g = 1 exactly at step 0.
        out["lora_magnitude_vector"] = column_norm_sq(weight).sqrt()
    return out


# --- forward pieces -----------------------------------------------------------------------

def pack(spec, t: dict, in_features: int, out_features: int, vera=None):
    """(A_eff [R', K], B_eff [N, R']) of one adapter on one module, differentiable in its trainable tensors."""
    m = spec.method
    if m in SVD_METHODS:
        a, b, a0, b0 = t["lora_A"], t["lora_B"], t["lora_A0"], t["lora_B0"]
        return torch.cat([a - a0, a0], 0), torch.cat([b, b - b0], 1)
    if m == "vera":
        a_v, b_v = vera
        return (t["vera_lambda_d"][:, None] * a_v[:, :in_features].to(t["vera_lambda_d"].device),
                t["vera_lambda_b"][:, None] * b_v[:out_features].to(t["vera_lambda_b"].device))
    return t["lora_A"], t["lora_B"]


def delta_weight(spec, module: str, t: dict, weight, vera=None) -> torch.Tensor:
    """The adapter's effective change of this module's weight, W_eff - W, fp32 [N, K] (no grad).

    DoRA's is diag(m / ||W + sBA||_c) (W + sBA) - W; VeRA's diag(b) B_v diag(d) A_v; PiSSA's
    s (B A - B0 A0); full fine-tuning's its dense dW.
    """
    with torch.no_grad():
        m = spec.method
        if m == "full":
            return t["delta_weight"].detach().float().clone()
        n, k = weight.shape
        if m == "vera":
            a, b = pack(spec, t, k, n, vera)
            return b.float() @ a.float()
        s = spec.scale_for(module)
        d = s * (t["lora_B"].float() @ t["lora_A"].float())
        if m in SVD_METHODS:
            return d - s * (t["lora_B0"].float() @ t["lora_A0"].float())
        if m == "dora":
            v = weight.float() + d
            g = t["lora_magnitude_vector"].float() / torch.linalg.vector_norm(v, dim=1)
            return g[:, None] * v - weight.float()
        return d


def delta_weights(engine, i: int) -> dict[str, torch.Tensor]:
    """{module: W_eff - W} (fp32 [N, K]) for every module adapter ``i`` of ``engine`` adapts."""
    bank = engine.bank
    spec = engine.adapter_spec(i)
    return {name: delta_weight(spec, name, bank.tensors(i, name), bank.modules_info[name].weight,
                               bank.vera_of(i))
            for name in bank.modules_of(i)}


def param_groups(engine, i: int) -> list[dict]:
    """AdamW groups of adapter ``i``'s trainable tensors: [A-like at lr, B-like at lr * lora_plus_ratio].

    Frozen tensors (LoRA-FA's A, PiSSA's A0/B0) are left out. As PEFT's LoRA+ optimiser, B and
    every 1-D tensor (DoRA's m, VeRA's d and b) take the LoRA+ rate. Always two groups, in
    the order plain-LoRA optimiser states were saved in.
    """
    spec = engine.adapter_spec(i)
    named = {n: p for n, p in engine.bank.named_parameters_of(i).items() if p.requires_grad}
    fast = {n for n, p in named.items() if n.endswith(".lora_B") or p.dim() == 1}
    return [{"params": [p for n, p in named.items() if n not in fast], "lr": spec.lr},
            {"params": [p for n, p in named.items() if n in fast], "lr": spec.lr * spec.lora_plus_ratio}]


# --- PEFT export / import -----------------------------------------------------------------

def _peft_targets(spec, module_names):
    from lora_engine.engine.bank import TARGET_GROUPS

    if module_names is not None:
        # Exact names: PEFT matches them as they are, layers already applied.
        return sorted(module_names), None
    t = spec.target_modules
    layers = list(spec.layers) if spec.layers is not None else None
    if t is None or t == "all-linear":
        return "all-linear", layers
    if isinstance(t, str) and t in TARGET_GROUPS:
        # A regex on the parent name would also catch non-Linear children (Qwen3's q_norm).
        raise ValueError(f"target_modules={t!r} has no PEFT spelling without the model: pass "
                         "module_names=engine.bank.modules_of(i)")
    if isinstance(t, str):
        if layers is not None:
            raise ValueError("PEFT ignores layers_to_transform for a regex target_modules: pass "
                             "module_names=engine.bank.modules_of(i) to export the exact modules")
        return t, None
    return list(t), layers


def peft_config_for(spec, module_names=None) -> dict:
    """PEFT ``adapter_config.json`` content for ``spec`` (``peft.get_peft_config`` accepts it).

    ``module_names`` (``engine.bank.modules_of(i)``): export the exact adapted modules rather
    than the spec's patterns. PiSSA/MiLoRA are exported as PEFT's own PiSSA-to-LoRA conversion:
    a plain LoRA of rank 2r ([A; A0], [B, -B0]) on the *original* base, alpha doubled (x sqrt 2
    with rsLoRA) so the scale is unchanged. LoRA+, LoRA-FA and rsLoRA are LoRA adapters (their
    difference is in training). ``full`` has no PEFT format: ValueError.
    """
    m = spec.method
    if m == "full":
        raise ValueError("method 'full' has no PEFT adapter format: export its dense updates with "
                         "lora_engine.engine.methods.delta_weights(engine, i) (or merge them into the base)")
    targets, layers = _peft_targets(spec, module_names)
    common = {"task_type": "CAUSAL_LM", "target_modules": targets, "layers_to_transform": layers,
              "fan_in_fan_out": False, "bias": "none", "inference_mode": False}
    if m == "vera":
        return {"peft_type": "VERA", "r": spec.rank, "projection_prng_key": spec.projection_prng_key,
                "save_projection": True, "vera_dropout": 0.0, "d_initial": spec.d_initial,
                "init_weights": True, **common}
    rslora = spec.scaling == "rslora"
    rank_pattern, alpha_pattern = dict(spec.rank_pattern or {}), dict(spec.alpha_pattern or {})
    r, alpha = spec.rank, spec.alpha
    if m in SVD_METHODS:
        grow = math.sqrt(2.0) if rslora else 2.0
        r, alpha = 2 * r, alpha * grow
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": m == "dora",
            "lora_dropout": 0.0, "init_lora_weights": True, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, **common}


def peft_state_dict_for(engine, i: int) -> dict[str, torch.Tensor]:
    """Adapter ``i``'s tensors under PEFT's key names (CPU, contiguous), to go with ``peft_config_for``.

    LoRA family: ``base_model.model.<module>.lora_A.weight`` [r, K], ``.lora_B.weight`` [N, r];
    DoRA adds ``.lora_magnitude_vector`` [N]; PiSSA/MiLoRA: the rank-2r LoRA [A; A0], [B, -B0];
    VeRA: ``.vera_lambda_d`` [r], ``.vera_lambda_b`` [N] and the shared ``base_model.vera_A``
    [r, K_max] / ``base_model.vera_B`` [N_max, r].
    """
    spec = engine.adapter_spec(i)
    bank = engine.bank
    if spec.method == "full":
        raise ValueError("method 'full' has no PEFT adapter format: export its dense updates with "
                         "lora_engine.engine.methods.delta_weights(engine, i) (or merge them into the base)")
    out = {}
    for name in bank.modules_of(i):
        t = {k: v.detach() for k, v in bank.tensors(i, name).items()}
        p = f"{PREFIX}{name}."
        if spec.method == "vera":
            out[p + "vera_lambda_d"] = t["vera_lambda_d"]
            out[p + "vera_lambda_b"] = t["vera_lambda_b"]
        elif spec.method in SVD_METHODS:
            out[p + "lora_A.weight"] = torch.cat([t["lora_A"], t["lora_A0"]], 0)
            out[p + "lora_B.weight"] = torch.cat([t["lora_B"], -t["lora_B0"]], 1)
        else:
            out[p + "lora_A.weight"] = t["lora_A"]
            out[p + "lora_B.weight"] = t["lora_B"]
            if spec.method == "dora":
                out[p + "lora_magnitude_vector"] = t["lora_magnitude_vector"]
    if spec.method == "vera":
        out["base_model.vera_A"], out["base_model.vera_B"] = bank.vera_of(i)
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def load_adapter_state(engine, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into adapter ``i``: keys as ``engine.bank.named_parameters_of(i)`` names
    (bare, or ``base_model.model.<name>`` with or without ``.weight``, as ``peft_io`` writes them),
    or PEFT's (``peft_state_dict_for``; a PiSSA/MiLoRA rank-2r LoRA is split back into A, A0, B, B0).
    """
    spec = engine.adapter_spec(i)
    bank = engine.bank
    params = bank.named_parameters_of(i)
    found = {}
    for key, v in tensors.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        # No tensor kind is called "weight": a trailing ".weight" is always PEFT's nn.Linear suffix.
        found[bare[:-len(".weight")] if bare.endswith(".weight") else bare] = (key, v)
    if spec.method == "vera":
        for which, ref in zip(("vera_A", "vera_B"), bank.vera_of(i)):
            got = found.pop(f"base_model.{which}", found.pop(which, None))
            # Compared in the file's dtype: a checkpoint may be saved in bf16.
            if got is not None and (got[1].shape != ref.shape or not torch.equal(got[1], ref.to(got[1]))):
                raise ValueError(f"saved {which} differs from this bank's projection: use the same rank, "
                                 "projection_prng_key and target modules as the run that saved it")
    if spec.method in SVD_METHODS and not any(n.endswith(".lora_A0") for n in found):
        for name in bank.modules_of(i):
            r = spec.rank_for(name)
            if f"{name}.lora_A" in found and found[f"{name}.lora_A"][1].shape[0] == 2 * r:
                key_a, a2 = found.pop(f"{name}.lora_A")
                key_b, b2 = found.pop(f"{name}.lora_B")
                found[f"{name}.lora_A"], found[f"{name}.lora_A0"] = (key_a, a2[:r]), (key_a, a2[r:])
                found[f"{name}.lora_B"], found[f"{name}.lora_B0"] = (key_b, b2[:, :r]), (key_b, -b2[:, r:])
    missing = sorted(set(params) - set(found))
    unknown = sorted(found[n][0] for n in set(found) - set(params))
    if missing or unknown:
        raise ValueError(f"saved adapter does not match adapter {i} ({spec.method}): missing {missing[:3]}, "
                         f"unknown {unknown[:3]}; load it with the spec and target modules it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            key, v = found[name]
            if v.shape != p.shape:
                raise ValueError(f"{key}: shape {tuple(v.shape)} != {tuple(p.shape)} expected by this base "
                                 "model and spec (rank_pattern / target modules differ?)")
            p.copy_(v)
