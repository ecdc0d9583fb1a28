"""Spectral analysis: energy fractions on synthetic (W, dW) with hand-known answers, and the
``lora-engine spectrum RUN_DIR`` command on a hand-made trainer run directory."""
import csv
import json

import pytest
import torch

import lora_engine as le
from lora_engine.engine import methods
from lora_engine.engine import peft_format
from lora_engine.cli import main
from lora_engine.studies.spectrum import energy_curve, energy_split
from models import tiny_model

N, K, k = 40, 30, 5


def _w(seed=0):
    """W [N, K] with known singular vectors U, V and distinct singular values 30..1."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    s = torch.arange(K, 0, -1, dtype=torch.float64)
    return u[:, :K] @ torch.diag(s) @ v.T, u, v, s


def _x(rows, cols, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("part,expected", [
    pytest.param("top", dict(top=1.0, left=0.0, right=0.0, bottom=0.0), id="inside-top-k"),
    pytest.param("bottom", dict(top=0.0, left=0.0, right=0.0, bottom=1.0), id="orthogonal"),
    pytest.param("left", dict(top=0.0, left=1.0, right=0.0, bottom=0.0), id="top-outputs-other-inputs"),
    pytest.param("right", dict(top=0.0, left=0.0, right=1.0, bottom=0.0), id="other-outputs-top-inputs"),
])
def test_energy_split_hand_known(part, expected):
    w, u, v, _ = _w()
    rows = u[:, :k] if part in ("top", "left") else u[:, k:]      # includes W's left null space (N > K)
    cols = v[:, :k] if part in ("top", "right") else v[:, k:]
    dw = rows @ _x(rows.shape[1], cols.shape[1]) @ cols.T
    got = energy_split(w.float(), dw.float(), k)
    for name, want in expected.items():
        assert got[name] == pytest.approx(want, abs=1e-5), name
    assert got["chance"] == pytest.approx(k * k / (N * K))
    assert got["energy"] == pytest.approx(float(dw.square().sum()), rel=1e-5)


def test_energy_split_of_w_itself_is_its_top_k_spectral_share():
    w, _, _, s = _w()
    got = energy_split(w.float(), w.float(), k)
    assert got["top"] == pytest.approx(float(s[:k].square().sum() / s.square().sum()), rel=1e-5)
    assert got["bottom"] == pytest.approx(1 - got["top"], rel=1e-5)


def test_fractions_sum_to_one_and_curve_agrees():
    w, *_ = _w()
    dw = _x(N, K, seed=3)
    total = 0.0
    split = energy_split(w.float(), dw.float(), k)
    for name in ("top", "left", "right", "bottom"):
        assert split[name] >= -1e-6
        total += split[name]
    assert total == pytest.approx(1.0, abs=1e-5)
    curve = energy_curve(w.float(), dw.float())
    assert curve.shape == (K,)
    assert curve[k - 1] == pytest.approx(split["top"], abs=1e-5)
    assert torch.all(curve[1:] >= curve[:-1] - 1e-6), "more directions hold at least as much energy"
    # At k = K the right subspace is all of R^K; what is left is dW's part outside W's column space.
    u_w = torch.linalg.svd(w, full_matrices=False)[0]
    assert curve[-1] == pytest.approx(float((u_w.T @ dw).square().sum() / dw.square().sum()), abs=1e-5)


def test_zero_update_gives_nan_and_bad_input_raises():
    w, *_ = _w()
    got = energy_split(w.float(), torch.zeros(N, K), k)
    assert got["energy"] == 0 and got["top"] != got["top"]
    assert torch.isnan(energy_curve(w.float(), torch.zeros(N, K))).all()
    with pytest.raises(ValueError, match="both be"):
        energy_split(w.float(), torch.zeros(K, N), k)
    with pytest.raises(ValueError, match="must lie in"):
        energy_split(w.float(), torch.zeros(N, K), K + 1)


# --- the command on a run directory -------------------------------------------------------------

def _run_dir(tmp_path):
    """A trainer-shaped run: config.json, checkpoints/latest, adapter_<i> in the trainer's format.

    Adapter 0: full fine-tuning whose dW lies in each module's top-4 x top-4 block (top = 1);
    adapter 1: a LoRA whose B A is W's bottom singular part (top = 0); 2, 3: DoRA and PiSSA moved
    off their init.
    """
    model_dir = tmp_path / "base"
    tiny_model().save_pretrained(model_dir)
    specs = [le.AdapterSpec(rank=2, method="full", target_modules=("q_proj", "down_proj")),
             le.AdapterSpec(rank=2, alpha=2, target_modules=("q_proj", "down_proj"), name="bottom-lora"),
             le.AdapterSpec(rank=2, method="dora", target_modules="mlp"),
             le.AdapterSpec(rank=2, method="pissa", layers=(0,))]
    engine = le.MultiLoRAModel(tiny_model(), specs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in engine.bank.modules_of(0):
            w = engine.bank.modules_info[name].weight
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            engine.bank.full_delta(0, name).copy_(u[:, :4] @ torch.randn(4, 4, generator=g) @ vh[:4])
            t = engine.bank.tensors(1, name)
            t["lora_A"].copy_(vh[-2:])
            t["lora_B"].copy_(u[:, -2:] * s[-2:])
        for i in (2, 3):
            for p in engine.adapter_parameters(i):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000003"
    for i in engine.adapter_ids:
        peft_format.save_adapter(engine, i, ckpt / f"adapter_{i}", base_model_name=str(model_dir))
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "config.json").write_text(json.dumps({"model": str(model_dir), "target_modules": "all-linear",
                                                 "adapters": [s.to_dict() for s in specs]}, default=str))
    return run, engine


def test_spectrum_command_on_a_run_directory(tmp_path, capsys):
    run, engine = _run_dir(tmp_path)
    assert main(["spectrum", str(run), "--top-k", "4"]) == 0
    printed = capsys.readouterr().out
    assert "bottom-lora" in printed and "full" in printed
    assert (run / "spectrum.png").stat().st_size > 0
    rows = list(csv.DictReader(open(run / "spectrum.csv")))
    assert len(rows) == sum(len(engine.bank.modules_of(i)) for i in engine.adapter_ids)
    by = lambda a: [r for r in rows if int(r["adapter"]) == a]
    assert all(float(r["top"]) == pytest.approx(1.0, abs=1e-4) for r in by(0)), "full: dW inside the top-4 block"
    assert all(float(r["top"]) == pytest.approx(0.0, abs=1e-4) for r in by(1)), "LoRA on W's bottom directions"
    assert all(0.0 <= float(r["top"]) <= 1.0 for r in by(2) + by(3))
    assert {r["method"] for r in rows} == {"full", "lora", "dora", "pissa"}


def test_spectrum_model_override_and_missing_run(tmp_path):
    run, _ = _run_dir(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    model_dir = cfg["model"]
    cfg["model"] = str(tmp_path / "moved")
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["spectrum", str(run), "--top-k", "2"]) == 2, "unknown base path: an error, not a crash"
    out = tmp_path / "out"
    assert main(["spectrum", str(run), "--model", model_dir, "--out", str(out), "--top-k", "2"]) == 0
    assert (out / "spectrum.csv").exists()
    assert main(["spectrum", str(tmp_path / "nope")]) == 2


def test_delta_weights_in_memory_feed_energy_split():
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=2, method="vera", target_modules=("o_proj",))])
    with torch.no_grad():
        for p in engine.adapter_parameters(0):
            p.fill_(0.5)
    for name, dw in methods.delta_weights(engine, 0).items():
        w = engine.bank.modules_info[name].weight
        split = energy_split(w, dw, 4)
        assert split["energy"] > 0 and sum(split[p] for p in ("top", "left", "right", "bottom")) == pytest.approx(1.0)
