"""PEFT methods on one shared frozen base, as one table: a ``Method`` record per method holds
its tensors and how each lays out in the bank's packed storage, their init, how the kernel pair
derives from them, the weight update they amount to, and their PEFT export. A new method is one
new record here.

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

Packed storage (``bank.py``): per module, every adapter's tensor of one kind lives in one leaf
buffer, its slice along the buffer's adapter axis (``LAYOUTS``); a frozen kind (LoRA-FA's A,
PiSSA's A0/B0) in a buffer of its own (``storage_name``), so no frozen tensor gets a gradient or
optimiser state. A record's ``pack`` turns the stacked tensors of all its adapters on a module
into their kernel rows at once (no loop over adapters). Where a module's kernel adapters are all
of the LoRA family (lora, rslora, lora_plus, dora share one ``pack``), the kernel reads the
lora_A / lora_B buffers themselves, no copy; a module mixing methods gathers the packs' rows
into slot order once per forward (memoised while generating).

PEFT export: each record maps its tensors to PEFT's per-module key suffixes (``to_peft``) and
back (``from_peft``) and says which PEFT config it is (``peft_config``); the directory layout,
key prefix and files are ``peft_format``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from lora_engine.engine.method_math import (column_norm_sq, dora_norm, dora_norms, kaiming_uniform,  # noqa: F401
                                            vera_projections)

LORA_PLUS_RATIO = 16.0

# How one adapter's tensor of a kind stacks with the other adapters' into a module's buffer:
#   layout  per adapter  buffer        adapter axis   (r: the adapter's rank on the module, n: adapters)
#   rows    [r, K]       [sum r, K]    0              (LoRA's A: the kernel's A_all as it is)
#   cols    [N, r]       [N, sum r]    1              (LoRA's B: the kernel's B_all as it is)
#   rank    [r]          [sum r]       0              (VeRA's d)
#   out     [N]          [n, N]        0              (DoRA's m, VeRA's b)
#   dense   [N, K]       [n, N, K]     0              (full fine-tuning's dW)
ROWS, COLS, RANK, OUT, DENSE = "rows", "cols", "rank", "out", "dense"
LAYOUTS = {ROWS: 0, COLS: 1, RANK: 0, OUT: 0, DENSE: 0}  # layout -> adapter axis
RANKED = (ROWS, COLS, RANK)  # an adapter spans r positions of the axis (else 1)


class PackGroup(NamedTuple):
    """What ``Method.pack`` gets besides the tensors: one module, the method's adapters on it."""

    in_features: int          # K
    out_features: int         # N
    owner: torch.Tensor       # [R] int64: which of the group's adapters (0..n-1) each rank row belongs to
    vera: tuple | None        # VeRA: (A_v rows [R, K], B_v columns [N, R]) of the group's adapters


def storage_name(method: "Method", kind: str) -> str:
    """The bank buffer a kind lives in: its own name, or ``<kind>__frozen`` where the method freezes
    it (LoRA-FA's A sits apart from the trainable A of the other adapters)."""
    return kind if method.is_trainable(kind) else f"{kind}__frozen"


def lora_plus_rate(kind: str, layout: str) -> bool:
    """B and every 1-D tensor (DoRA's m, VeRA's d and b) step at lr * lora_plus_ratio (PEFT's LoRA+)."""
    return kind == "lora_B" or layout in (RANK, OUT)


@dataclass(frozen=True)
class Method:
    """One PEFT method. Functions take the adapter's ``AdapterSpec`` and, per module, ``t``: its
    tensors by kind.

    name: the ``AdapterSpec.method`` value.
    kinds: per-module ``(kind, layout)`` pairs, in the order checkpoints and optimiser states list
        them; the layout (``LAYOUTS``) says how the adapters' tensors of that kind stack in the bank.
    frozen: kinds that are saved but never trained (stored apart: ``storage_name``).
    init(spec, module, K, N, weight, generator) -> {kind: tensor}: step-0 tensors (fp32).
    pack(t, group) -> ([A part [R, K]] * f, [B part [N, R]] * f): the kernel rows of all this
        method's adapters on one module at once, differentiable; ``t`` holds the kinds of
        ``kernel_kinds`` stacked in layout (R = sum of their ranks), ``group`` is a ``PackGroup``.
        Adapter j's kernel rows are its rows of part 0, then of part 1, ... (f = kernel_factor).
        None when the method is not in the LoRA kernel (``full``).
    kernel_kinds: the kinds ``pack`` reads.
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
    kinds: tuple[tuple[str, str], ...]
    init: Callable
    delta: Callable
    pack: Callable | None = None
    kernel_kinds: tuple[str, ...] = ("lora_A", "lora_B")
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

    @property
    def kind_names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.kinds)

    def layout_of(self, kind: str) -> str:
        return dict(self.kinds)[kind]

    def kernel_rank(self, spec, module: str) -> int:
        """Rows of this adapter in the module's packed ``A_all`` (0: not in the kernel)."""
        return self.kernel_factor * spec.rank_for(module)


# --- LoRA (the math shared with DoRA and VeRA is method_math.py's, re-exported here) -------

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


def _lora_pack(t, group):
    return [t["lora_A"]], [t["lora_B"]]


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


def _svd_pack(t, group):
    a, b, a0, b0 = t["lora_A"], t["lora_B"], t["lora_A0"], t["lora_B0"]
    return [a - a0, a0], [b, b - b0]


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


def _vera_pack(t, group):
    # b is [n, N] (one row per adapter): each adapter's row scales all r of its B_v columns.
    a_v, b_v = group.vera
    return [t["vera_lambda_d"][:, None] * a_v], [t["vera_lambda_b"].index_select(0, group.owner).T * b_v]


def _vera_delta(spec, module, t, weight, vera=None):
    n, k = weight.shape
    a_v, b_v = vera
    a = t["vera_lambda_d"][:, None] * a_v[:, :k].to(t["vera_lambda_d"].device)
    b = t["vera_lambda_b"][:, None] * b_v[:n].to(t["vera_lambda_b"].device)
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

_AB = (("lora_A", ROWS), ("lora_B", COLS))
_LORA = dict(kinds=_AB, init=lambda spec, module, k, n, weight, gen: _lora_ab(spec, module, k, n, gen),
             pack=_lora_pack, delta=_lora_delta, peft_config=_lora_peft_config, to_peft=_lora_to_peft)
_SVD = dict(kinds=_AB + (("lora_A0", ROWS), ("lora_B0", COLS)), frozen=("lora_A0", "lora_B0"), pack=_svd_pack,
            kernel_kinds=("lora_A", "lora_B", "lora_A0", "lora_B0"), delta=_svd_delta, kernel_factor=2,
            needs_weight=True, rank_divisor=2, peft_config=_svd_peft_config, to_peft=_svd_to_peft,
            from_peft=_svd_from_peft)

_TABLE = (
    Method("lora", **_LORA),
    Method("rslora", scaling="rslora", **_LORA),
    Method("lora_plus", lora_plus_ratio=LORA_PLUS_RATIO, **_LORA),
    Method("lora_fa", frozen=("lora_A",), **_LORA),
    Method("dora", kinds=_AB + (("lora_magnitude_vector", OUT),), init=_dora_init, pack=_lora_pack, delta=_dora_delta,
           epilogue="column_scale", needs_weight=True,
           peft_config=lambda spec: {**_lora_peft_config(spec), "use_dora": True},
           to_peft=lambda t: {**_lora_to_peft(t), "lora_magnitude_vector": t["lora_magnitude_vector"]}),
    Method("pissa", init=_svd_init(bottom=False), **_SVD),
    Method("milora", init=_svd_init(bottom=True), **_SVD),
    Method("vera", kinds=(("vera_lambda_d", RANK), ("vera_lambda_b", OUT)), init=_vera_init, pack=_vera_pack,
           kernel_kinds=("vera_lambda_d", "vera_lambda_b"), delta=_vera_delta, scaled=False, per_module_ranks=False,
           shared_projection=True, peft_config=_vera_peft_config, to_peft=_vera_to_peft),
    Method("full", kinds=(("delta_weight", DENSE),), init=_full_init, delta=_full_delta, kernel_factor=0,
           epilogue="dense", scaled=False, per_module_ranks=False),
)
TABLE: dict[str, Method] = {m.name: m for m in _TABLE}
METHODS = tuple(TABLE)
# One buffer per storage name: every method that stores a kind there must lay it out the same way.
_BUFFER_LAYOUT: dict[str, str] = {}
for _m in _TABLE:
    for _kind, _layout in _m.kinds:
        if _BUFFER_LAYOUT.setdefault(storage_name(_m, _kind), _layout) != _layout:
            raise ValueError(f"{_m.name}: kind {_kind!r} is laid out {_layout!r} but another method stores it "
                             f"{_BUFFER_LAYOUT[storage_name(_m, _kind)]!r}: give it another kind name")


def buffer_layout(buffer: str) -> str:
    """The layout of a bank buffer (``storage_name``'s result)."""
    return _BUFFER_LAYOUT[buffer]


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
    """AdamW groups of adapter ``i``'s trainable tensors (views into the bank's buffers):
    [A-like at lr, B-like at lr * lora_plus_ratio].

    Frozen tensors (LoRA-FA's A, PiSSA's A0/B0) are left out. As PEFT's LoRA+ optimiser, B and
    every 1-D tensor (DoRA's m, VeRA's d and b) take the LoRA+ rate (``lora_plus_rate``; the
    bank's fused AdamW, ``engine.optimizer``, uses the same rule). Always two groups, in the
    order plain-LoRA optimiser states were saved in.
    """
    spec = engine.adapter_spec(i)
    named = {n: p for n, p in engine.bank.named_parameters_of(i).items() if p.requires_grad}
    layout = dict(method_of(spec).kinds)
    fast = {n for n in named if lora_plus_rate(n.rsplit(".", 1)[1], layout[n.rsplit(".", 1)[1]])}
    return [{"params": [p for n, p in named.items() if n not in fast], "lr": spec.lr},
            {"params": [p for n, p in named.items() if n in fast], "lr": spec.lr * spec.lora_plus_ratio}]
