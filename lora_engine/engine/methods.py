"""PEFT methods on one shared frozen base, as one table: a ``Method`` record per method holds
its tensors, their init, how they pack into the multi-adapter kernel, the weight update they
amount to, and their PEFT export. A new method is one new record here.

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

PEFT export: each record maps its tensors to PEFT's per-module key suffixes (``to_peft``) and
back (``from_peft``) and says which PEFT config it is (``peft_config``); the directory layout,
key prefix and files are ``peft_format``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

LORA_PLUS_RATIO = 16.0


@dataclass(frozen=True)
class Method:
    """One PEFT method. Functions take the adapter's ``AdapterSpec`` and, per module, ``t``: its
    tensors by kind.

    name: the ``AdapterSpec.method`` value.
    kinds: per-module tensor kinds, in the order checkpoints and optimiser states list them.
    frozen: kinds that are saved but never trained.
    init(spec, module, K, N, weight, generator) -> {kind: tensor}: step-0 tensors (fp32).
    pack(spec, t, K, N, vera) -> (A_eff [R', K], B_eff [N, R']): the kernel pair, differentiable;
        None when the method is not in the LoRA kernel (``full``).
    kernel_factor: R' = kernel_factor * r (2 for PiSSA/MiLoRA's frozen half, 0 for ``full``).
    delta(spec, module, t, weight, vera) -> fp32 [N, K]: W_eff - W, no grad.
    epilogue: None, ``"column_scale"`` (DoRA's m / ||W + sBA||_c) or ``"dense"`` (``full``'s x dW^T).
    scaled: the update is scaled by alpha/r (or alpha/sqrt(r)); False: s = 1.
    per_module_ranks: accepts rank_pattern/alpha_pattern.
    needs_weight: init or forward reads the frozen base weight W.
    rank_divisor: rank must be <= min(K, N) // rank_divisor.
    shared_projection: VeRA's frozen projection pair shared across adapters and modules.
    scaling: forces ``AdapterSpec.scaling`` (``rslora``), else None.
    lora_plus_ratio: the default B learning-rate ratio.
    peft_config(spec) -> dict | None: the method's own PEFT config fields (None: no PEFT form).
    to_peft(t) -> {suffix: tensor}: PEFT key suffixes after ``<prefix><module>.``.
    from_peft(found, module, r) -> found: rewrite PEFT-named tensors into our kinds (in place).
    """

    name: str
    kinds: tuple[str, ...]
    init: Callable
    delta: Callable
    pack: Callable | None = None
    kernel_factor: int = 1
    frozen: tuple[str, ...] = ()
    epilogue: str | None = None
    scaled: bool = True
    per_module_ranks: bool = True
    needs_weight: bool = False
    rank_divisor: int = 1
    shared_projection: bool = False
    scaling: str | None = None
    lora_plus_ratio: float = 1.0
    peft_config: Callable | None = None
    to_peft: Callable | None = None
    from_peft: Callable | None = None

    def is_trainable(self, kind: str) -> bool:
        return kind not in self.frozen

    def kernel_rank(self, spec, module: str) -> int:
        """Rows of this adapter in the module's packed ``A_all`` (0: not in the kernel)."""
        return self.kernel_factor * spec.rank_for(module)


# --- shared math --------------------------------------------------------------------------

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


def _lora_ab(spec, module, in_features, out_features, generator):
    r = spec.rank_for(module)
    a = torch.empty(r, in_features)
    if spec.init == "default":
        # kaiming_uniform_(a=sqrt(5)) on [r, K] is U(-1/sqrt(K), 1/sqrt(K)), as nn.Linear and PEFT do.
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
    else:
        a.normal_(0.0, 1.0 / r, generator=generator)
    return {"lora_A": a, "lora_B": torch.zeros(out_features, r)}


def _lora_delta(spec, module, t, weight, vera=None):
    return spec.scale_for(module) * (t["lora_B"].float() @ t["lora_A"].float())


def _lora_pack(spec, t, in_features, out_features, vera=None):
    return t["lora_A"], t["lora_B"]


def _lora_peft_config(spec):
    return {"peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha, "use_dora": False,
            "rank_pattern": dict(spec.rank_pattern or {}), "alpha_pattern": dict(spec.alpha_pattern or {})}


def _lora_to_peft(t):
    return {"lora_A.weight": t["lora_A"], "lora_B.weight": t["lora_B"]}


# --- DoRA ---------------------------------------------------------------------------------

def _dora_init(spec, module, in_features, out_features, weight, generator):
    out = _lora_ab(spec, module, in_features, out_features, generator)
    # m = ||W + s B A||_c with B = 0: the same function the forward uses, so g = 1 exactly at step 0.
    out["lora_magnitude_vector"] = column_norm_sq(weight).sqrt()
    return out


def _dora_delta(spec, module, t, weight, vera=None):
    v = weight.float() + _lora_delta(spec, module, t, weight)
    g = t["lora_magnitude_vector"].float() / torch.linalg.vector_norm(v, dim=1)
    return g[:, None] * v - weight.float()


# --- PiSSA / MiLoRA -----------------------------------------------------------------------

def _svd_init(bottom: bool):
    def init(spec, module, in_features, out_features, weight, generator):
        # PEFT's pissa_init: W = U S V^T in fp32, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T.
        r, scale = spec.rank_for(module), spec.scale_for(module)
        u, s_vals, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        idx = slice(len(s_vals) - r, None) if bottom else slice(0, r)
        root = (s_vals[idx] / scale).sqrt()
        a, b = root[:, None] * vh[idx], u[:, idx] * root[None, :]
        return {"lora_A": a, "lora_B": b, "lora_A0": a.clone(), "lora_B0": b.clone()}
    return init


def _svd_pack(spec, t, in_features, out_features, vera=None):
    a, b, a0, b0 = t["lora_A"], t["lora_B"], t["lora_A0"], t["lora_B0"]
    return torch.cat([a - a0, a0], 0), torch.cat([b, b - b0], 1)


def _svd_delta(spec, module, t, weight, vera=None):
    s = spec.scale_for(module)
    return _lora_delta(spec, module, t, weight) - s * (t["lora_B0"].float() @ t["lora_A0"].float())


def _svd_peft_config(spec):
    # PEFT's own PiSSA-to-LoRA conversion: a plain LoRA of rank 2r ([A; A0], [B, -B0]) on the
    # *original* base, alpha doubled (x sqrt 2 with rsLoRA) so the scale is unchanged.
    grow = math.sqrt(2.0) if spec.scaling == "rslora" else 2.0
    return {"peft_type": "LORA", "r": 2 * spec.rank, "lora_alpha": spec.alpha * grow, "use_dora": False,
            "rank_pattern": {k: 2 * v for k, v in (spec.rank_pattern or {}).items()},
            "alpha_pattern": {k: v * grow for k, v in (spec.alpha_pattern or {}).items()}}


def _svd_to_peft(t):
    return {"lora_A.weight": torch.cat([t["lora_A"], t["lora_A0"]], 0),
            "lora_B.weight": torch.cat([t["lora_B"], -t["lora_B0"]], 1)}


def _svd_from_peft(found, module, r):
    """Split a rank-2r converted LoRA back into A, A0, B, B0 (a checkpoint of our own kinds passes)."""
    a_key = f"{module}.lora_A"
    if f"{module}.lora_A0" in found or a_key not in found or found[a_key][1].shape[0] != 2 * r:
        return
    key_a, a2 = found.pop(a_key)
    key_b, b2 = found.pop(f"{module}.lora_B")
    found[a_key], found[f"{module}.lora_A0"] = (key_a, a2[:r]), (key_a, a2[r:])
    found[f"{module}.lora_B"], found[f"{module}.lora_B0"] = (key_b, b2[:, :r]), (key_b, -b2[:, r:])


# --- VeRA ---------------------------------------------------------------------------------

def _vera_init(spec, module, in_features, out_features, weight, generator):
    return {"vera_lambda_d": torch.full((spec.rank_for(module),), float(spec.d_initial)),
            "vera_lambda_b": torch.zeros(out_features)}


def _vera_pack(spec, t, in_features, out_features, vera=None):
    a_v, b_v = vera
    return (t["vera_lambda_d"][:, None] * a_v[:, :in_features].to(t["vera_lambda_d"].device),
            t["vera_lambda_b"][:, None] * b_v[:out_features].to(t["vera_lambda_b"].device))


def _vera_delta(spec, module, t, weight, vera=None):
    n, k = weight.shape
    a, b = _vera_pack(spec, t, k, n, vera)
    return b.float() @ a.float()


def _vera_peft_config(spec):
    return {"peft_type": "VERA", "r": spec.rank, "projection_prng_key": spec.projection_prng_key,
            "save_projection": True, "vera_dropout": 0.0, "d_initial": spec.d_initial, "init_weights": True}


def _vera_to_peft(t):
    return {"vera_lambda_d": t["vera_lambda_d"], "vera_lambda_b": t["vera_lambda_b"]}


# --- full fine-tuning ---------------------------------------------------------------------

def _full_init(spec, module, in_features, out_features, weight, generator):
    return {"delta_weight": torch.zeros(out_features, in_features)}


def _full_delta(spec, module, t, weight, vera=None):
    return t["delta_weight"].detach().float().clone()


# --- the table ----------------------------------------------------------------------------

_AB = ("lora_A", "lora_B")
_LORA = dict(kinds=_AB, init=lambda spec, module, k, n, weight, gen: _lora_ab(spec, module, k, n, gen),
             pack=_lora_pack, delta=_lora_delta, peft_config=_lora_peft_config, to_peft=_lora_to_peft)
_SVD = dict(kinds=_AB + ("lora_A0", "lora_B0"), frozen=("lora_A0", "lora_B0"), pack=_svd_pack,
            delta=_svd_delta, kernel_factor=2, needs_weight=True, rank_divisor=2,
            peft_config=_svd_peft_config, to_peft=_svd_to_peft, from_peft=_svd_from_peft)

_TABLE = (
    Method("lora", **_LORA),
    Method("rslora", scaling="rslora", **_LORA),
    Method("lora_plus", lora_plus_ratio=LORA_PLUS_RATIO, **_LORA),
    Method("lora_fa", frozen=("lora_A",), **_LORA),
    Method("dora", kinds=_AB + ("lora_magnitude_vector",), init=_dora_init, pack=_lora_pack, delta=_dora_delta,
           epilogue="column_scale", needs_weight=True,
           peft_config=lambda spec: {**_lora_peft_config(spec), "use_dora": True},
           to_peft=lambda t: {**_lora_to_peft(t), "lora_magnitude_vector": t["lora_magnitude_vector"]}),
    Method("pissa", init=_svd_init(bottom=False), **_SVD),
    Method("milora", init=_svd_init(bottom=True), **_SVD),
    Method("vera", kinds=("vera_lambda_d", "vera_lambda_b"), init=_vera_init, pack=_vera_pack, delta=_vera_delta,
           scaled=False, per_module_ranks=False, shared_projection=True, peft_config=_vera_peft_config,
           to_peft=_vera_to_peft),
    Method("full", kinds=("delta_weight",), init=_full_init, delta=_full_delta, kernel_factor=0,
           epilogue="dense", scaled=False, per_module_ranks=False),
)
TABLE: dict[str, Method] = {m.name: m for m in _TABLE}
METHODS = tuple(TABLE)


def method_of(spec) -> Method:
    return TABLE[spec.method]


# --- per adapter ----------------------------------------------------------------------------

def delta_weights(engine, i: int) -> dict[str, torch.Tensor]:
    """{module: W_eff - W} (fp32 [N, K], no grad) for every module adapter ``i`` of ``engine`` adapts.

    DoRA's is diag(m / ||W + sBA||_c) (W + sBA) - W; VeRA's diag(b) B_v diag(d) A_v; PiSSA's
    s (B A - B0 A0); full fine-tuning's its dense dW.
    """
    bank = engine.bank
    spec = engine.adapter_spec(i)
    method = method_of(spec)
    with torch.no_grad():
        return {name: method.delta(spec, name, bank.tensors(i, name), bank.modules_info[name].weight,
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
