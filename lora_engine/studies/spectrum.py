"""Where a weight update lives relative to the base weight's singular directions, per method.

For one module with base weight W [N, K] = U S V^T (thin SVD, singular values descending,
U [N, m], V [K, m], m = min(N, K)) and update dW [N, K] (the adapter's W_eff - W, see
``methods.delta_weights``), let U_k, V_k be the top-k left/right singular vectors and
P = U_k U_k^T, Q = V_k V_k^T. dW splits into four Frobenius-orthogonal parts

    P dW Q  +  P dW (I - Q)  +  (I - P) dW Q  +  (I - P) dW (I - Q)
    "top"      "left"           "right"          "bottom"

whose energies sum to ||dW||_F^2. We report each as a fraction of ||dW||_F^2:

    top_k(dW) = ||U_k U_k^T dW V_k V_k^T||_F^2 / ||dW||_F^2 = sum_{i,j <= k} (U^T dW V)_ij^2 / ||dW||_F^2

the share of the update that reads from W's top-k input directions *and* writes into its
top-k output directions; 1 - top_k is "the rest". A dW with no preference (i.i.d. entries)
has E[top_k] = k^2 / (N K): the ``chance`` column. RL fine-tuning updates are reported to sit
*off* the principal directions (top_k near chance), PiSSA's on them (study B, PEFT methods in RLVR: its spectral finding).
A zero update (any LoRA at step 0) has no direction: its fractions are NaN.

``energy_split`` / ``energy_curve`` work on in-memory (W, dW) pairs; ``run_spectrum`` (the
``lora-engine spectrum RUN_DIR`` command) loads a trainer run's latest checkpoint, writes
``spectrum.csv`` (one row per adapter x module) and ``spectrum.png``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lora_engine.engine import methods, peft_format
from lora_engine.rl import checkpoints
from lora_engine.rl.models import load_base


def _svd(weight: torch.Tensor):
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u, s, vh.T


def energy_split(weight: torch.Tensor, delta: torch.Tensor, k: int, svd=None) -> dict[str, float]:
    """Fractions of ||dW||_F^2 in the top/left/right/bottom parts (module docstring) at top-k.

    Args:
        weight: W [N, K], any float dtype. delta: dW [N, K]. k: 1 <= k <= min(N, K).
        svd: optional precomputed ``(U [N, m], S [m], V [K, m])`` of W, reused across updates.
    Returns:
        {"top", "left", "right", "bottom", "chance", "energy"}: the four fractions (sum 1), the
        chance level k^2 / (N K) and ||dW||_F^2 itself; fractions are NaN when dW = 0.
    """
    if weight.dim() != 2 or delta.shape != weight.shape:
        raise ValueError(f"weight and delta must both be [N, K]; got {tuple(weight.shape)} and "
                         f"{tuple(delta.shape)}: pass W and W_eff - W of the same module")
    n, kin = weight.shape
    if not 1 <= k <= min(n, kin):
        raise ValueError(f"k={k} must lie in [1, min(N, K)={min(n, kin)}]")
    u, _, v = svd if svd is not None else _svd(weight)
    d = delta.detach().float().to(u.device)
    energy = float(d.square().sum())
    left = u[:, :k].T @ d                       # [k, K]: dW's rows in the top-k output directions
    right = d @ v[:, :k]                        # [N, k]
    top = float((left @ v[:, :k]).square().sum())
    left_e, right_e = float(left.square().sum()) - top, float(right.square().sum()) - top
    nan = float("nan")
    frac = (lambda e: e / energy) if energy > 0 else (lambda e: nan)
    return {"top": frac(top), "left": frac(left_e), "right": frac(right_e),
            "bottom": frac(energy - top - left_e - right_e), "chance": k * k / (n * kin), "energy": energy}


def energy_curve(weight: torch.Tensor, delta: torch.Tensor, svd=None) -> torch.Tensor:
    """top_k(dW) for every k = 1..min(N, K), fp32 [min(N, K)] (NaN when dW = 0).

    One projection M = U^T dW V, then 2-D prefix sums of M^2 along the diagonal.
    """
    u, _, v = svd if svd is not None else _svd(weight)
    d = delta.detach().float().to(u.device)
    energy = d.square().sum()
    m2 = (u.T @ d @ v).square()
    blocks = m2.cumsum(0).cumsum(1).diagonal()
    return (blocks / energy).cpu() if energy > 0 else torch.full_like(blocks, float("nan")).cpu()


@dataclass
class SpectrumRow:
    """One adapter on one module: fractions at ``k`` as in ``energy_split``."""

    adapter: int
    label: str
    method: str
    module: str
    n: int
    k_in: int
    k: int
    energy: float
    top: float
    left: float
    right: float
    bottom: float
    chance: float


def analyze(weights: dict[str, torch.Tensor], updates: dict[tuple[int, str, str], dict[str, torch.Tensor]],
            top_k: int = 16):
    """Rows and mean curves for many adapters on shared base weights (one SVD per module).

    Args:
        weights: {module: W [N, K]}.
        updates: {(adapter id, label, method): {module: dW [N, K]}}.
        top_k: k of the rows (clipped to each module's min(N, K)).
    Returns:
        (rows: list[SpectrumRow], curves: {(id, label, method): mean over modules of
        ``energy_curve``, truncated to the smallest min(N, K) among them}).
    """
    svds = {}
    rows, curves = [], {}
    for (i, label, method), deltas in updates.items():
        per_module = []
        for name, d in sorted(deltas.items()):
            w = weights[name]
            if name not in svds:
                svds[name] = _svd(w)
            n, kin = w.shape
            k = min(top_k, n, kin)
            split = energy_split(w, d, k, svd=svds[name])
            rows.append(SpectrumRow(i, label, method, name, n, kin, k, split["energy"], split["top"], split["left"],
                                    split["right"], split["bottom"], split["chance"]))
            curve = energy_curve(w, d, svd=svds[name])
            if not torch.isnan(curve).all():
                per_module.append(curve)
        if per_module:
            m = min(len(c) for c in per_module)
            curves[(i, label, method)] = torch.stack([c[:m] for c in per_module]).mean(0)
    return rows, curves


def plot_spectrum(rows: list[SpectrumRow], curves: dict, path, top_k: int) -> Path:
    """Left: mean top-k energy fraction vs k per adapter (full fine-tuning dashed black), with the
    chance level k^2 / (N K); right: each module's top-k fraction at ``top_k`` per adapter."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the spectrum figure needs matplotlib: pip install matplotlib") from e
    # A bare Figure (no pyplot): no global state, no display backend needed.
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    shapes = {(r.n, r.k_in) for r in rows}
    labels = list(dict.fromkeys(r.label for r in rows))
    full = {r.label for r in rows if r.method == "full"}
    color = {label: "black" if label in full else f"C{j % 10}" for j, label in enumerate(labels)}
    for (i, label, method), curve in curves.items():
        ks = torch.arange(1, len(curve) + 1)
        ax.plot(ks.numpy(), curve.numpy(), label=label, color=color[label],
                linestyle="--" if method == "full" else "-")
    if curves:
        n_max = max(len(c) for c in curves.values())
        ks = torch.arange(1, n_max + 1, dtype=torch.float64)
        chance = torch.stack([ks.clamp(max=n) * ks.clamp(max=kin) / (n * kin) for n, kin in shapes]).mean(0)
        ax.plot(ks.numpy(), chance.numpy(), color="grey", linestyle=":", label="chance k²/(NK)")
    ax.set_xlabel("k (top singular directions of W)")
    ax.set_ylabel("fraction of ||ΔW||² in top-k × top-k")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    for j, label in enumerate(labels):
        vals = [r.top for r in rows if r.label == label and r.top == r.top]
        ax2.scatter([j] * len(vals), vals, s=10, alpha=0.6, color=color[label])
        if vals:
            ax2.hlines(sum(vals) / len(vals), j - 0.3, j + 0.3, color="black")
    chance_k = [r.chance for r in rows]
    if chance_k:
        ax2.axhline(sum(chance_k) / len(chance_k), color="grey", linestyle=":", label="chance")
    ax2.set_xticks(range(len(labels)))
    ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax2.set_ylabel(f"top-{top_k} energy fraction per module")
    ax2.set_ylim(0, 1.02)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --- a trainer run ---------------------------------------------------------------------------------

def _specs_of(run_dir: Path, ckpt: Path, cfg: dict):
    """[(id, adapter dir, spec)]: specs from the run's config.json, else from each adapter's own."""
    from lora_engine.engine.spec import AdapterSpec
    from lora_engine.engine.peft_format import read_spec

    known = {f.name for f in fields(AdapterSpec)}
    specs = []
    for i, p in checkpoints.adapter_dirs(ckpt).items():
        if "adapters" in cfg and i < len(cfg["adapters"]):
            spec = AdapterSpec(**{k: v for k, v in cfg["adapters"][i].items() if k in known})
        else:
            spec = read_spec(p)
            if spec is None:
                raise ValueError(f"{p}: no adapter spec in {run_dir / 'config.json'} nor beside the adapter: "
                                 "the checkpoint was not written by lora-engine")
        specs.append((i, p, spec))
    if [i for i, _, _ in specs] != list(range(len(specs))):
        raise ValueError(f"{ckpt}: adapter directories must be adapter_0..adapter_<n-1>")
    return specs


def load_run(run_dir, model: str | None = None):
    """(engine, adapter labels) with the latest checkpoint of a trainer run loaded."""
    from safetensors.torch import load_file

    from lora_engine.engine.model import MultiLoRAModel

    run_dir = Path(run_dir)
    cfg_path, ckpt = run_dir / "config.json", checkpoints.latest_checkpoint(run_dir)
    if not cfg_path.exists() or ckpt is None:
        raise ValueError(f"{run_dir} must hold config.json and checkpoints/latest (a trainer run directory)")
    cfg = json.loads(cfg_path.read_text())
    specs = _specs_of(run_dir, ckpt, cfg)
    base = load_base(model or cfg.get("model", "tiny"), "float32", "cpu", progress=False)[0]
    engine = MultiLoRAModel(base, [s for _, _, s in specs], target_modules=cfg.get("target_modules", "all-linear"))
    labels = {}
    for i, p, spec in specs:
        peft_format.load_adapter_state(engine, i, load_file(str(p / "adapter_model.safetensors")))
        rank = "" if spec.method == "full" else f" r={spec.rank}"
        labels[i] = f"{i}: {spec.name or spec.method}{rank}"
    return engine, labels


def run_spectrum(run_dir, model: str | None = None, top_k: int = 16, out_dir=None) -> dict:
    """Spectral analysis of every adapter of a run: writes spectrum.csv and spectrum.png.

    Returns {"csv": path, "png": path, "summary": [{adapter, label, method, top, chance, modules}]}
    with ``top`` the mean top-k fraction over the adapter's modules (full fine-tuning included
    as the reference when the run has a ``method="full"`` adapter).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    engine, labels = load_run(run_dir, model)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bank = engine.bank
    # Matrices only: LN tuning's update is a vector per norm (no spectrum; its row says 0 modules).
    updates = {(i, labels[i], engine.adapter_spec(i).method): {n: d for n, d in methods.delta_weights(engine, i).items()
                                                               if d.dim() == 2} for i in engine.adapter_ids}
    weights = {n: bank.modules_info[n].weight for d in updates.values() for n in d}
    rows, curves = analyze(weights, updates, top_k)
    csv_path = out_dir / "spectrum.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(SpectrumRow)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    png = plot_spectrum(rows, curves, out_dir / "spectrum.png", top_k)
    summary = []
    for i in engine.adapter_ids:
        mine = [r for r in rows if r.adapter == i and r.top == r.top]
        summary.append({"adapter": i, "label": labels[i], "method": engine.adapter_spec(i).method,
                        "top": sum(r.top for r in mine) / len(mine) if mine else float("nan"),
                        "chance": sum(r.chance for r in mine) / len(mine) if mine else float("nan"),
                        "modules": len(mine)})
    return {"csv": csv_path, "png": png, "summary": summary}
