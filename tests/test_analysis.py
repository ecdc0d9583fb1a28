"""Sweep analysis and report: hand-computed answers on synthetic results, study A's numbers."""
import csv
import math

import pytest

from lora_engine.studies import analysis
from lora_engine.rl import metrics
from lora_engine.studies.analysis import (
    config_key,
    families,
    footprint_bytes,
    load_results,
    pareto_frontier,
    relative_entropy_change,
    seed_runs_for_budget,
    summarize,
)
from lora_engine.cli import main as cli_main
from lora_engine.studies.report import FIGURES, write_report

COLUMNS = [
    "run_id", "group", "rank", "alpha", "method", "lr", "seed", "prompts_per_step", "samples_per_prompt",
    "batch_size", "steps", "base_score", "final_score", "gain", "tokens", "trainable_params", "optimizer_bytes",
    "checkpoint_bytes", "entropy_initial", "entropy_final", "pass_at_k_base", "pass_at_k_final", "k", "wall_s",
    "status",
]


def _run(rank, batch, seed, gain, tokens=1000, status="done", **extra):
    """One results row; the footprint is linear in rank like a real LoRA adapter's."""
    params = 1000 * rank
    row = dict(run_id=f"r{rank}-b{batch}-s{seed}", group="g0", rank=rank, alpha=32, method="lora", lr=1e-5,
               seed=seed, prompts_per_step=batch // 4 or 1, samples_per_prompt=4, batch_size=batch, steps=10,
               base_score=0.5, final_score=0.5 + gain, gain=gain, tokens=tokens, trainable_params=params,
               optimizer_bytes=8 * params, checkpoint_bytes=2 * params, entropy_initial=2.0,
               entropy_final=1.5, wall_s=1.0, status=status)
    row.update(extra)
    return row


def _write_csv(path, rows, columns=None):
    columns = columns or list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return path


def _by(rows, **where):
    out = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(out) == 1, out
    return out[0]


# --- loading --------------------------------------------------------------------------------------

def test_load_results_types_derived_columns_and_duplicates(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "run_id,rank,seed,prompts_per_step,samples_per_prompt,base_score,final_score,tokens,lr,method,extra\n"
        "a,8,0,4,8,0.25,0.5,4.8e7,1e-05,lora,note\n"
        "b,8,1,4,8,0.25,,,1e-05,lora,\n"
        "a,8,0,4,8,0.25,0.75,48000000.0,1e-05,lora,rerun\n"
    )
    rows = load_results(path)
    assert [r["run_id"] for r in rows] == ["b", "a"]  # the re-written run "a" keeps its last row
    b, a = rows
    assert a["rank"] == 8 and isinstance(a["rank"], int)
    assert a["tokens"] == 48_000_000 and isinstance(a["tokens"], int)
    assert a["lr"] == 1e-5 and a["method"] == "lora" and a["extra"] == "rerun"
    assert a["batch_size"] == 32 and a["status"] == "done"
    assert a["gain"] == pytest.approx(0.5)
    assert math.isnan(b["gain"]) and math.isnan(b["tokens"]) and b["extra"] != b["extra"]


@pytest.mark.parametrize("text, match", [
    pytest.param("", "empty", id="empty-file"),
    pytest.param("run_id,rank,seed,batch_size,gain\n", "no runs", id="header-only"),
    pytest.param("run_id,seed,batch_size,gain\na,0,16,0.1\n", "rank", id="no-rank"),
    pytest.param("run_id,rank,seed,gain\na,1,0,0.1\n", "batch_size", id="no-batch"),
    pytest.param("run_id,rank,seed,batch_size,base_score\na,1,0,16,0.1\n", "gain", id="no-gain"),
])
def test_load_results_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "results.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_results(path)


def test_load_results_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sweep"):
        load_results(tmp_path / "results.csv")


def test_config_key_ignores_seed_group_and_results_and_merges_missing_values():
    a = _run(8, 16, 0, 0.1, group="g0")
    b = _run(8, 16, 1, 0.3, group="g7", tokens=5)
    assert config_key(a) == config_key(b) == (8, 16, 1e-5, "lora", 32, None, 4, 4, 10)  # no reward_regime: None
    assert config_key({"rank": 8, "batch_size": 16, "lr": math.nan}) == config_key({"rank": 8, "batch_size": 16})
    assert config_key(_run(8, 16, 0, 0.1, lr=3e-5)) != config_key(a)


# --- per-configuration statistics -----------------------------------------------------------------

def test_summarize_hand_computed():
    rows = [
        _run(8, 16, 0, 0.10, tokens=1000),
        _run(8, 16, 1, -0.05, tokens=1000),
        _run(8, 16, 2, 0.25, tokens=1000),
        _run(8, 16, 3, 9.99, status="failed"),  # excluded although its gain is finite
        _run(8, 16, 4, math.nan),  # done but never evaluated: excluded
        _run(8, 64, 0, 0.0, tokens=4000, entropy_final=3.0),  # single seed, gain exactly 0
    ]
    s16, s64 = summarize(rows)
    assert (s16["rank"], s16["batch_size"], s16["n_seeds"], s16["n_failed"]) == (8, 16, 3, 2)
    # gains 0.10, -0.05, 0.25: mean 0.10, deviations 0, -0.15, +0.15, sample var 0.045 / 2
    assert s16["mean_gain"] == pytest.approx(0.10)
    assert s16["sd_gain"] == pytest.approx(0.15)
    assert s16["best_gain"] == pytest.approx(0.25) and s16["worst_gain"] == pytest.approx(-0.05)
    assert s16["mean_best_gap"] == pytest.approx(0.15)
    assert s16["risk"] == pytest.approx(1 / 3)
    assert s16["mean_tokens"] == 1000 and s16["token_efficiency"] == pytest.approx(1e-4)
    assert s16["entropy_change"] == pytest.approx(-0.25)
    assert (s16["trainable_params"], s16["optimizer_bytes"], s16["checkpoint_bytes"]) == (8000, 64000, 16000)
    assert s16["seeds"] == [0, 1, 2] and s16["gains"] == pytest.approx([0.10, -0.05, 0.25])
    # One seed: sd undefined (NaN, not 0); a gain of exactly 0 is not a negative gain.
    assert s64["n_seeds"] == 1 and math.isnan(s64["sd_gain"])
    assert s64["risk"] == 0.0 and s64["mean_best_gap"] == 0.0 and s64["token_efficiency"] == 0.0
    assert s64["entropy_change"] == pytest.approx(0.5)


def test_summarize_config_without_usable_runs_and_missing_tokens():
    rows = [_run(4, 16, 0, 0.1, status="failed"), _run(2, 16, 0, 0.2, tokens=None)]
    rows[1]["tokens"] = math.nan
    s2, s4 = summarize(rows)
    assert s4["n_seeds"] == 0 and s4["n_failed"] == 1 and math.isnan(s4["mean_gain"]) and math.isnan(s4["risk"])
    assert s4["trainable_params"] == 4000  # footprint does not depend on the outcome
    assert s2["mean_gain"] == pytest.approx(0.2) and math.isnan(s2["token_efficiency"])


@pytest.mark.parametrize("h0, h1, expected", [
    pytest.param(2.0, 1.5, -0.25, id="drop"),
    pytest.param(0.4, 0.03, -0.925, id="llama-r256-like"),
    pytest.param(1.0, 1.0, 0.0, id="same"),
    pytest.param(0.0, 1.0, math.nan, id="zero-initial"),
    pytest.param(math.nan, 1.0, math.nan, id="missing"),
    pytest.param(None, 1.0, math.nan, id="none"),
])
def test_relative_entropy_change(h0, h1, expected):
    got = relative_entropy_change(h0, h1)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


def test_families_pool_across_the_other_column():
    rows = [
        _run(1, 16, 0, 0.02, tokens=100), _run(1, 16, 1, -0.01, tokens=100),
        _run(1, 64, 0, -0.03, tokens=400), _run(1, 64, 1, 0.04, tokens=400),
        _run(8, 16, 0, 0.10, tokens=100), _run(8, 16, 1, 0.12, tokens=100),
        _run(8, 64, 0, 0.20, tokens=400), _run(8, 64, 1, 0.18, tokens=400),
        _run(8, 64, 2, 0.50, tokens=400, status="failed"),
    ]
    r1, r8 = families(rows, by="rank")
    assert (r1["rank"], r1["n_configs"], r1["n_seeds"], r1["n_failed"]) == (1, 2, 4, 0)
    assert r1["mean_gain"] == pytest.approx(0.005)  # (0.02 - 0.01 - 0.03 + 0.04) / 4
    assert r1["risk"] == pytest.approx(0.5)
    assert r1["best_gain"] == pytest.approx(0.04) and r1["mean_best_gap"] == pytest.approx(0.035)
    assert r1["mean_tokens"] == 250 and r1["token_efficiency"] == pytest.approx(0.005 / 250)
    assert (r8["n_seeds"], r8["n_failed"], r8["risk"]) == (4, 1, 0.0)
    assert r8["mean_gain"] == pytest.approx(0.15)
    b16, b64 = families(rows, by="batch_size")
    assert b16["batch_size"] == 16 and b16["mean_gain"] == pytest.approx(0.0575) and b16["risk"] == 0.25
    assert b64["mean_gain"] == pytest.approx(0.0975) and b64["token_efficiency"] == pytest.approx(0.0975 / 400)
    with pytest.raises(ValueError, match="configuration columns"):
        families(rows, by="seed")


# --- Pareto frontier ------------------------------------------------------------------------------

def test_pareto_frontier_dominated_points_and_ties():
    points = [
        (100, 0.05),   # frontier: cheapest
        (100, 0.02),   # same tokens, less gain: dominated
        (200, 0.05),   # same gain, more tokens: dominated
        (200, 0.08),   # frontier
        (200, 0.08),   # exact tie with the previous point: kept too
        (300, 0.07),   # more tokens, less gain: dominated
        (400, 0.10),   # frontier
        (50, math.nan),  # no gain: never on the frontier
        (500, -0.01),  # dominated
    ]
    front = pareto_frontier(points)
    assert front == [(100, 0.05), (200, 0.08), (200, 0.08), (400, 0.10)]
    assert front[1] is points[3] and front[2] is points[4]
    assert pareto_frontier([]) == []


def test_pareto_frontier_on_summaries_returns_the_dicts():
    rows = [_run(1, 16, 0, 0.01, tokens=100), _run(4, 16, 0, 0.05, tokens=100), _run(4, 64, 0, 0.04, tokens=400),
            _run(16, 64, 0, 0.09, tokens=400)]
    front = pareto_frontier(summarize(rows))
    assert [(s["rank"], s["batch_size"]) for s in front] == [(4, 16), (16, 64)]
    custom = pareto_frontier([{"t": 1, "g": 1.0}, {"t": 2, "g": 0.5}], x="t", y="g")
    assert custom == [{"t": 1, "g": 1.0}]


# --- budget ---------------------------------------------------------------------------------------

def test_seed_runs_for_budget_by_memory_footprint():
    rows = [_run(r, 16, 0, 0.1) for r in (1, 8, 64)] + [_run(8, 64, 0, 0.1, status="failed")]
    # footprint = 1000 r params x 4 B + 8000 r optimizer bytes = 12000 r bytes
    assert footprint_bytes(rows[0]) == 12_000 and footprint_bytes(rows[0], bytes_per_param=8) == 16_000
    out = seed_runs_for_budget(rows, budget_bytes=1_000_000)
    assert [(b["rank"], b["footprint_bytes"], b["seed_runs"]) for b in out] == [
        (1, 12_000, 83), (8, 96_000, 10), (64, 768_000, 1)]
    assert seed_runs_for_budget(rows, 100_000)[2]["seed_runs"] == 0
    with pytest.raises(ValueError, match="positive"):
        seed_runs_for_budget(rows, 0)
    with pytest.raises(ValueError, match="trainable_params"):
        seed_runs_for_budget([{"rank": 1, "gain": 0.1}], 1e9)


def test_pass_at_k_and_avg_at_k_are_the_metrics_functions():
    assert analysis.pass_at_k is metrics.pass_at_k and analysis.avg_at_k is metrics.avg_at_k
    assert analysis.pass_at_k(4, 1, 2) == pytest.approx(0.5)


# --- study A sanity checks ------------------------------------------------------------------------

def _gains_with_mean(mean, negatives, positives, n=6):
    """n seed gains: the given negatives and positives, plus one positive gain that sets the mean."""
    last = n * mean - sum(negatives) - sum(positives)
    gains = list(negatives) + list(positives) + [last]
    assert len(gains) == n and last > 0, gains
    return gains


# Study A, rank 1 by batch size: mean gain and the number of negative seeds out of 6.
STUDY_A_R1 = {16: (0.0154, 0), 32: (0.0112, 1), 64: (-0.0012, 3), 128: (-0.0185, 4)}
STUDY_A_TOKENS = {16: 48e6, 32: 84e6, 64: 155e6, 128: 285e6}


def _study_a_rank1_rows():
    rows = []
    for batch, (mean, n_neg) in STUDY_A_R1.items():
        negatives = [-0.01 - 0.02 * i for i in range(n_neg)]
        positives = [0.001 * (i + 1) for i in range(5 - n_neg)]
        for seed, g in enumerate(_gains_with_mean(mean, negatives, positives)):
            rows.append(_run(1, batch, seed, g, tokens=STUDY_A_TOKENS[batch]))
    return rows


def test_study_a_rank1_risk_by_batch_and_family():
    rows = _study_a_rank1_rows()
    by_batch = {s["batch_size"]: s for s in summarize(rows)}
    for batch, (mean, n_neg) in STUDY_A_R1.items():
        assert by_batch[batch]["mean_gain"] == pytest.approx(mean, abs=1e-12)
        assert by_batch[batch]["risk"] == pytest.approx(n_neg / 6)
    assert [round(100 * by_batch[b]["risk"], 1) for b in (16, 32, 64, 128)] == [0.0, 16.7, 50.0, 66.7]
    (r1,) = families(rows, by="rank")
    # 8 negatives of 24 runs; the family mean is the mean of the four batch means.
    assert r1["n_seeds"] == 24 and round(100 * r1["risk"], 1) == 33.3
    assert round(r1["mean_gain"], 4) == 0.0017


def test_study_a_r32_b16_sd_and_r256_risk():
    # r32 b16: mean +0.0855, sd 0.0073, risk 0, built as mean + sd * (standardised offsets).
    z = [-1.5, -0.5, 0.0, 0.2, 0.6, 1.2]
    zm = sum(z) / 6
    zsd = math.sqrt(sum((v - zm) ** 2 for v in z) / 5)
    rows = [_run(32, 16, i, 0.0855 + 0.0073 * (v - zm) / zsd) for i, v in enumerate(z)]
    (s,) = summarize(rows)
    assert (round(s["mean_gain"], 4), round(s["sd_gain"], 4), s["risk"]) == (0.0855, 0.0073, 0.0)
    # r256 family: 1 negative seed in 4 batch sizes x 6 seeds -> 4.2%.
    rows = [_run(256, b, i, -0.02 if (b, i) == (128, 0) else 0.06) for b in (16, 32, 64, 128) for i in range(6)]
    (r256,) = families(rows, by="rank")
    assert round(100 * r256["risk"], 1) == 4.2


def test_study_a_batch_family_efficiency_per_million_tokens():
    # Batch 16: family mean +0.0645 at 48M tokens; batch 128: +0.0760 at 285M, 6 of 54 seeds negative.
    rows = [_run(r, 16, i, 0.0645, tokens=48e6) for r in range(1, 10) for i in range(6)]
    neg = {(r, 0) for r in range(1, 7)}
    gains = {(r, i): (-0.01 if (r, i) in neg else None) for r in range(1, 10) for i in range(6)}
    fill = (54 * 0.0760 + 0.01 * len(neg)) / (54 - len(neg))
    rows += [_run(r, 128, i, fill if gains[r, i] is None else gains[r, i], tokens=285e6)
             for r in range(1, 10) for i in range(6)]
    b16, b128 = families(rows, by="batch_size")
    assert round(1e6 * b16["token_efficiency"], 6) == 0.001344 and b16["risk"] == 0.0
    assert b128["mean_gain"] == pytest.approx(0.0760)
    assert round(1e6 * b128["token_efficiency"], 6) == 0.000267 and round(100 * b128["risk"], 1) == 11.1


# --- report ---------------------------------------------------------------------------------------

def _sweep_rows():
    """A 4-rank x 2-batch x 3-seed sweep with one failed run and one NaN gain."""
    base = {1: 0.005, 4: 0.04, 16: 0.09, 64: 0.07}
    offsets = [-0.03, 0.0, 0.045]
    rows = []
    for rank, g in base.items():
        for batch in (16, 64):
            for seed, off in enumerate(offsets):
                rows.append(_run(rank, batch, seed, g + off + (0.01 if batch == 64 else 0.0),
                                 tokens=batch * 10 * 600, pass_at_k_base=0.6, pass_at_k_final=0.7, k=8))
    rows.append(_run(16, 64, 3, 0.5, status="failed", tokens=0))
    rows.append(_run(64, 16, 3, math.nan))
    return rows


def test_write_report_full_sweep(tmp_path):
    _write_csv(tmp_path / "results.csv", _sweep_rows(), COLUMNS)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md"
    md = path.read_text()
    for stem in FIGURES:
        png = tmp_path / "figures" / f"{stem}.png"
        assert png.is_file() and png.stat().st_size > 10_000, stem
        assert f"](figures/{stem}.png)" in md
    assert "26 (24 used, 2 excluded" in md and "r16-b64-s3" in md and "r64-b16-s3" in md
    # r16 b64 (16 prompts x 4 samples): gains 0.07, 0.10, 0.145 -> mean 0.105, sd 0.0377, best 0.145,
    # gap 0.04, 384k tokens; the failed seed 3 is counted, not used.
    assert "| 16 | 64 | 16 | 3 | 1 | +0.1050 | 0.0377 | +0.1450 | +0.0700 | 0.0400 | 0.0% | 384.0k |" in md
    # r1 b16: gains -0.025, 0.005, 0.05 -> risk 1/3; efficiency 0.01 / 96k tokens = 0.104167 per 1M.
    assert "| 1 | 16 | 4 | 3 | 0 | +0.0100 |" in md and "33.3%" in md and "0.104167" in md
    # Rank family of rank 1: both batches' gains, mean (0.01 + 0.02) / 2, 2 negatives of 6 seeds.
    assert "| 1 | 2 | 6 | 0 | +0.0150 | 0.0342 | +0.0600 | 0.0450 | 33.3% | 240.0k | 0.062500 |" in md
    # Columns that never vary are listed once, not as table columns.
    assert "Same in every run: lr 1e-05, method lora, alpha 32, samples per prompt 4, steps 10." in md
    assert "## Pareto set" in md and "seed-runs per GiB" in md and "not drawn" not in md
    assert "| pass@8 base | pass@8 final |" in md and "| 0.6000 | 0.7000 |" in md


def test_write_report_single_batch_single_seed_and_missing_optional_columns(tmp_path):
    rows = [_run(r, 32, 0, g) for r, g in ((2, 0.02), (8, -0.01), (32, 0.05))]
    rows.append(_run(128, 32, 0, 0.3, status="failed"))
    minimal = ["run_id", "rank", "seed", "batch_size", "gain", "status"]
    _write_csv(tmp_path / "results.csv", rows, minimal)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "pareto.png").write_bytes(b"stale")
    md = write_report(tmp_path).read_text()
    assert "| 8 | 32 | 1 | 0 | -0.0100 | — |" in md  # one seed: no sd
    assert "4 (3 used, 1 excluded" in md and "r128-b32-s0" in md
    # No tokens and no footprint columns: those figures are skipped, and a stale one removed.
    assert not (tmp_path / "figures" / "pareto.png").exists()
    assert "not drawn" in md and "no frontier" in md and "no footprint" in md
    for stem in ("gain_vs_rank", "risk_heatmap", "mean_vs_best", "gain_distributions"):
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 5_000, stem


def test_write_report_splits_figures_by_method(tmp_path):
    rows = [_run(r, 16, s, 0.01 * r + 0.01 * s, method=m, run_id=f"{m}-r{r}-s{s}")
            for m in ("lora", "dora") for r in (1, 8) for s in (0, 1)]
    _write_csv(tmp_path / "results.csv", rows, COLUMNS)
    md = write_report(tmp_path).read_text()
    assert "split by method" in md and "| 1 | method=dora |" in md and "| 1 | method=lora |" in md
    assert all((tmp_path / "figures" / f"{stem}.png").is_file() for stem in FIGURES)


def test_write_report_all_runs_failed(tmp_path):
    _write_csv(tmp_path / "results.csv", [_run(1, 16, 0, 0.1, status="failed")], COLUMNS)
    md = write_report(tmp_path).read_text()
    assert "1 (0 used, 1 excluded" in md and "| 1 | 16 | 0 | 1 | — |" in md


def test_report_command_line(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2  # no results.csv: a one-line error
    assert "results.csv" in capsys.readouterr().err
    _write_csv(tmp_path / "results.csv", [_run(4, 16, 0, 0.1)], COLUMNS)
    assert cli_main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'report.md'}"
