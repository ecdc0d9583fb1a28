"""Study C's sweep: [[grid]] tables, the reward_regime axis, per-run curves, the regime report,
and the tiny spec in examples/studies parsing into its 45 runs."""
import csv
from pathlib import Path

import pytest

from lora_engine.rl.tiny_judges import build_tiny_prm, build_tiny_teacher
from lora_engine.rl.tiny_model import build_tokenizer
from lora_engine.studies.report import write_report
from lora_engine.studies.sweep import group_config, load_spec, run_sweep, spec_from_dict
from test_trainer import DistinctCharsTask, _model

FIXED = {"steps": 1, "samples_per_prompt": 2, "max_new_tokens": 3, "eval_problems": 4, "progress": False}
ROOT = Path(__file__).resolve().parents[1]


def test_grid_tables_union_and_regimes_share_a_group(tmp_path):
    spec = spec_from_dict({"fixed": FIXED, "grid": [
        {"reward_regime": ["outcome", "distillation"], "rank": [1, 4], "seed": [0]},
        {"reward_regime": ["outcome", "distillation"], "rank": [1], "method": ["full"], "lr": [1e-4]},
        {"rank": [1], "seed": [0]},  # already in the first table: runs once
    ], "packing": {"max_adapters_per_group": 8}})
    assert len(spec.runs) == 6 and len({r.run_id for r in spec.runs}) == 6
    assert {r.method for r in spec.runs if r.lr == 1e-4} == {"full"}
    assert [r.run_id for r in spec.runs if r.rank == 1 and r.method == "lora"] == \
        ["r1_p8_lr1e-05_lora_a32_s0", "r1_p8_lr1e-05_lora_a32_distillation_s0"]  # outcome ids as before
    cfg = group_config(spec, 0, tmp_path)
    assert sorted(cfg.regime_per_adapter) == ["distillation"] * 3 + ["outcome"] * 3


def test_tiny_study_c_spec_has_its_grid():
    spec = load_spec(ROOT / "examples" / "studies" / "reward_density_tiny.toml")
    assert len(spec.runs) == 45 and len(spec.groups) == 1
    cells = {(r.reward_regime, "full" if r.method == "full" else r.rank) for r in spec.runs}
    assert cells == {(g, c) for g in ("outcome", "process", "distillation") for c in (1, 4, 16, 64, "full")}


@pytest.mark.slow  # ~15 s alone, ~60 s on shared cores: a 6-adapter sweep end to end, figures included
def test_regime_sweep_records_curves_and_reports_the_regime_table(tmp_path):
    prm = build_tiny_prm(cache_dir=tmp_path / "judges", steps=0, init="random", progress=False)
    teacher = build_tiny_teacher(cache_dir=tmp_path / "judges", steps=0, progress=False)
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[fixed]
steps = 2
samples_per_prompt = 2
prompts_per_step = 1
max_new_tokens = 3
eval_problems = 4
checkpoint_every = 0
progress = false
prm_model = "{prm}"
teacher_model = "{teacher}"
[[grid]]
reward_regime = ["outcome", "process", "distillation"]
rank = [2]
lr = [0.01]
[[grid]]
reward_regime = ["outcome", "process", "distillation"]
rank = [1]
method = ["full"]
lr = [0.001]
[packing]
max_adapters_per_group = 6
""")
    tok = build_tokenizer()
    out = tmp_path / "sweep"
    report = run_sweep(spec, out, progress=False, base=(_model(tok), tok), task=DistinctCharsTask())
    with open(out / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 6 * 2 and {c["step"] for c in curves} == {"0", "1"}
    assert all(float(c["adv_std"]) > 0 for c in curves)
    md = report.read_text()
    assert "## Reward regime x rank (study C)" in md
    table = md[md.index("| regime | rank 2 | full FT |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:5]] == ["| outcome", "| process", "| distillation"]
    assert "peak advantage std" in md and (out / "figures" / "regime_curves.png").stat().st_size > 0
    # regenerating from the files alone gives the same report
    assert write_report(out).read_text() == md


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_regime_report_from_files_hand_computed(tmp_path):
    """The regime x rank table and the diagnostics from a hand-written results.csv + curves.csv."""
    header = ["run_id", "rank", "method", "reward_regime", "seed", "batch_size", "base_score", "final_score", "gain",
              "status"]
    runs = [("o1a", 1, "lora", "outcome", 0, 0.5, 0.6), ("o1b", 1, "lora", "outcome", 1, 0.5, 0.8),
            ("p1a", 1, "lora", "process", 0, 0.5, 0.4), ("of", 1, "full", "outcome", 0, 0.5, 0.7),
            ("d4a", 4, "lora", "distillation", 0, 0.5, 0.9), ("d4x", 4, "lora", "distillation", 1, 0.5, None)]
    _write(tmp_path / "results.csv", header,
           [[i, r, m, g, s, 16, b, "" if f is None else f, "" if f is None else f - b, "done" if f else "failed"]
            for i, r, m, g, s, b, f in runs])
    _write(tmp_path / "curves.csv", ["run_id", "step", "adv_std", "response_len", "truncated_frac"],
           [["o1a", 0, 1.0, 5, 0.0], ["o1a", 1, 1.0, 5, 0.0], ["o1b", 0, 1.0, 5, 0.0], ["o1b", 1, 1.0, 7, 0.5],
            ["p1a", 0, 2.0, 5, 0.0], ["p1a", 1, 9.0, 8, 1.0], ["d4x", 0, 50.0, 8, 1.0]])  # d4x failed: left out
    md = write_report(tmp_path).read_text()
    table = md[md.index("| regime | rank 1 | rank 4 | full FT |"):].splitlines()
    assert table[2] == "| outcome | +0.200 ± 0.141 (2) | — | +0.200 (1) |"  # gains 0.1, 0.3; full 0.2
    assert table[3] == "| process | -0.100 (1) | — | — |"
    assert table[4] == "| distillation | — | +0.400 (1) | — |"
    diag = md[md.index("| regime | peak advantage std"):].splitlines()
    assert diag[2] == "| outcome | 1.000 | 0 | 1.000 | 6.00 | 0.250 |"  # step 1: lengths 5, 7; truncated 0, 0.5
    assert diag[3] == "| process | 9.000 | 1 | 2.000 | 8.00 | 1.000 |"
    assert (tmp_path / "figures" / "regime_curves.png").exists()
