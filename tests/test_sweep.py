"""Sweep spec validation, packing, and resume without redoing finished runs."""
import csv

import pytest

from lora_engine.studies import sweep
from lora_engine.studies.sweep import load_spec, pack, spec_from_dict
from lora_engine.rl.tiny_model import build_tokenizer
from test_trainer import DistinctCharsTask, _model

FIXED = {"steps": 1, "samples_per_prompt": 2, "max_new_tokens": 3, "eval_problems": 4, "progress": False,
         "checkpoint_every": 1}


def test_grid_expands_and_packs_under_limits():
    spec = spec_from_dict({"fixed": FIXED, "grid": {"rank": [1, 4, 16], "prompts_per_step": [2, 4], "seed": [0, 1, 2]},
                           "packing": {"max_adapters_per_group": 5, "max_rows_per_step": 20}})
    assert len(spec.runs) == 18
    assert sorted(r.run_id for g in spec.groups for r in g) == sorted(r.run_id for r in spec.runs)
    for g in spec.groups:
        assert len(g) <= 5
        assert sum(r.prompts_per_step * 2 for r in g) <= 20
    assert len({r.prompts_per_step for g in spec.groups for r in g}) == 2


def test_memory_budget_limits_group():
    spec = spec_from_dict({"fixed": FIXED, "grid": {"rank": [8, 8, 8]}, "packing": {"memory_budget_mb": 1.0}})
    dims = [(1024, 1024)] * 4  # rank 8: 16 B x 8 x 8192 = 1 MiB per adapter
    groups = pack(spec, module_dims=dims)
    assert [len(g) for g in groups] == [1, 1, 1]


def test_memory_budget_counts_each_ppo_runs_critic():
    dims = [(1024, 1024)] * 4  # rank 8: 1 MiB per adapter
    grpo = spec_from_dict({"fixed": FIXED, "grid": {"rank": [8, 8, 8, 8]}, "packing": {"memory_budget_mb": 2.0}})
    ppo = spec_from_dict({"fixed": {**FIXED, "algorithm": "ppo"}, "grid": {"rank": [8, 8, 8, 8]},
                          "packing": {"memory_budget_mb": 2.0}})
    small = spec_from_dict({"fixed": {**FIXED, "algorithm": "ppo", "critic_rank": 4}, "grid": {"rank": [8, 8, 8, 8]},
                            "packing": {"memory_budget_mb": 3.0}})
    assert [len(g) for g in pack(grpo, module_dims=dims)] == [2, 2]
    assert [len(g) for g in pack(ppo, module_dims=dims)] == [1, 1, 1, 1]  # 1 MiB + a 1 MiB critic each
    assert [len(g) for g in pack(small, module_dims=dims)] == [2, 2]  # 1 MiB + a 0.5 MiB critic each


@pytest.mark.parametrize("data,match", [
    pytest.param({"grid": {}}, "needs a rank", id="no-rank"),
    pytest.param({"grid": {"rank": 4}}, "non-empty list", id="scalar"),
    pytest.param({"grid": {"rank": [4], "batch": [2]}}, "unknown grid key", id="typo"),
    pytest.param({"grid": {"rank": [0]}}, "rank must be", id="rank0"),
    pytest.param({"fixed": {"loss_type": "x"}, "grid": {"rank": [1]}}, "loss_type", id="bad-fixed"),
    pytest.param({"grid": {"rank": [1]}, "runs": {}}, "unknown sweep section", id="section"),
    pytest.param({"fixed": {"seed": 1}, "grid": {"rank": [1]}}, r"\[grid\] seed", id="fixed-seed-is-ambiguous"),
    pytest.param({"grid": {"rank": [1], "prompts_per_step": [100]}, "packing": {"max_rows_per_step": 10}},
                 "max_rows_per_step", id="too-many-rows"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"gpus": 1}}, "unknown ray key", id="ray-typo"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"num_gpus": 2}}, r"num_gpus must be in \[0, 1\]", id="ray-2-gpus"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"num_gpus": "1"}}, "num_gpus must be a number", id="ray-gpus-str"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"num_cpus": 0.5}}, "num_cpus must be >= 1", id="ray-half-cpu"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"max_retries": -1}}, "max_retries must be", id="ray-retries"),
    pytest.param({"grid": {"rank": [1]}, "ray": {"max_retries": 1.5}}, "max_retries must be", id="ray-retries-float"),
])
def test_spec_errors(data, match):
    with pytest.raises(ValueError, match=match):
        spec_from_dict(data)


def test_missing_spec_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def _write_spec(tmp_path):
    p = tmp_path / "spec.toml"
    p.write_text("""
[fixed]
steps = 1
samples_per_prompt = 2
max_new_tokens = 3
eval_problems = 4
eval_samples = 2
checkpoint_every = 1
progress = false
[grid]
rank = [1, 2]
seed = [0, 1]
prompts_per_step = [1]
lr = [0.01]
[packing]
max_adapters_per_group = 2
""")
    return p


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    tok = build_tokenizer()
    spec_path = _write_spec(tmp_path)
    out = tmp_path / "out"
    calls = []
    real_fit = sweep_fit = None
    from lora_engine.rl.trainer import GRPOTrainer
    real_fit = GRPOTrainer.fit

    def crashing_fit(self):
        calls.append(self.cfg.output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_fit(self)

    monkeypatch.setattr(GRPOTrainer, "fit", crashing_fit)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec_path, out, progress=False, base=(_model(tok), tok), task=DistinctCharsTask())
    done_first = sorted(p.parent.name for p in (out / "runs").glob("*/result.json"))
    assert len(done_first) == 2

    calls.clear()
    monkeypatch.setattr(GRPOTrainer, "fit", lambda self: (calls.append(self.cfg.output_dir), real_fit(self))[1])
    sweep.run_sweep(spec_path, out, progress=False, base=(_model(tok), tok), task=DistinctCharsTask())
    assert len(calls) == 1, "only the unfinished group runs again"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    for r in rows:
        assert float(r["gain"]) == pytest.approx(float(r["final_score"]) - float(r["base_score"]))
        assert int(r["tokens"]) > 0 and int(r["trainable_params"]) > 0
        assert (out / "runs" / r["run_id"] / "config.json").exists()
        assert (out / "runs" / r["run_id"] / "run.json").exists()
    assert (out / "report.md").exists()


def test_full_scale_study_spec_groups_under_memory_budget():
    from pathlib import Path

    from lora_engine.studies.sweep import QWEN3_8B_MODULES, adapter_state_bytes

    spec = load_spec(Path(__file__).parents[1] / "examples/studies/rank_batch_seed_qwen3_8b.toml")
    assert len(spec.runs) == 216
    # 16 B/param x r x 2,727,936 params per unit of rank on Qwen3-8B's 252 linear layers.
    assert adapter_state_bytes(1, QWEN3_8B_MODULES) == 16 * 2_727_936
    groups = spec.groups  # load_spec itself must apply the memory budget (reference_model = qwen3-8b)
    assert sorted(r.run_id for g in groups for r in g) == sorted(r.run_id for r in spec.runs)
    assert spec.fixed["algorithm"] == "ppo" and spec.fixed["critic_rank"] == 0  # study A trained with PPO
    for g in groups:
        # each run: its policy and its critic (a LoRA of the same rank)
        mem = sum(2 * adapter_state_bytes(r.rank, QWEN3_8B_MODULES) for r in g) / 2**20
        assert mem <= spec.memory_budget_mb or len(g) == 1
        assert sum(r.prompts_per_step * 8 for r in g) <= spec.max_rows_per_step
    assert len(groups) < 216 / 4, "concurrency must cut the number of base-model passes by > 4x"


def test_tiny_study_a_spec_is_ppo_and_packs_into_two_groups():
    from pathlib import Path

    spec = load_spec(Path(__file__).parents[1] / "examples/studies/rank_batch_seed_tiny_ppo.toml")
    assert spec.fixed["algorithm"] == "ppo" and len(spec.runs) == 24
    assert [len(g) for g in spec.groups] == [12, 12]
    assert sweep.group_config(spec, 0, Path("/tmp/x")).algorithm == "ppo"


def test_memory_budget_needs_model_shapes():
    with pytest.raises(ValueError, match="reference_model"):
        spec_from_dict({"fixed": {"model": "/nonexistent/model"}, "grid": {"rank": [1]},
                        "packing": {"memory_budget_mb": 100}})
    spec = spec_from_dict({"fixed": {"model": "/nonexistent/model"}, "grid": {"rank": [64, 64, 64]},
                           "packing": {"memory_budget_mb": 3000, "reference_model": "qwen3-8b"}})
    assert [len(g) for g in spec.groups] == [1, 1, 1]  # rank 64 on Qwen3-8B: 2.6 GiB of state each


def test_ray_table_defaults_and_task_resources():
    from lora_engine.studies.ray_runner import task_resources

    spec = spec_from_dict({"grid": {"rank": [1]}})
    assert spec.ray == sweep.RayOptions(num_gpus=None, num_cpus=1.0, max_retries=2)
    gpu_node, cpu_node = {"CPU": 16.0, "GPU": 8.0}, {"CPU": 2.0}
    assert task_resources(spec, [cpu_node, gpu_node]) == {"num_cpus": 1.0, "num_gpus": 1.0}  # one GPU by default
    assert task_resources(spec, [cpu_node]) == {"num_cpus": 1.0, "num_gpus": 0.0}  # CPUs on a CPU cluster
    half = spec_from_dict({"grid": {"rank": [1]}, "ray": {"num_gpus": 0.5, "num_cpus": 4}})
    assert task_resources(half, [gpu_node]) == {"num_cpus": 4.0, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="no node of the Ray cluster has a GPU"):
        task_resources(half, [cpu_node])
    with pytest.raises(ValueError, match="lower \\[ray\\] num_cpus"):
        task_resources(spec_from_dict({"grid": {"rank": [1]}, "ray": {"num_cpus": 32}}), [gpu_node])


def test_sweep_ray_without_ray_installed_is_one_line_error(tmp_path, monkeypatch, capsys):
    from lora_engine import cli

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` now raises ImportError
    assert cli.main(["sweep", str(_write_spec(tmp_path)), "--ray", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --ray needs Ray, which is not installed: pip install 'lora-engine[ray]'"]


def test_ray_is_never_imported_at_module_level():
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "lora_engine"
    for f in root.rglob("*.py"):
        for node in ast.parse(f.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "ray" for n in names), f"{f} imports ray at module level"


def test_driver_writes_rows_it_cannot_see(tmp_path, capsys):
    """--out not on shared storage: the worker's result.json is elsewhere, the driver writes it."""
    import json

    from lora_engine.studies.ray_runner import _write_missing_rows, error_line

    (tmp_path / "runs" / "seen").mkdir(parents=True)
    (tmp_path / "runs" / "seen" / "result.json").write_text('{"run_id": "seen", "status": "done"}')
    _write_missing_rows(tmp_path, [{"run_id": "seen", "status": "x"}, {"run_id": "lost", "status": "done"}])
    assert json.loads((tmp_path / "runs" / "seen" / "result.json").read_text())["status"] == "done"
    assert json.loads((tmp_path / "runs" / "lost" / "result.json").read_text())["status"] == "done"
    assert "1 result(s) written by a worker are not visible here" in capsys.readouterr().err

    wrapped = RuntimeError("Traceback...\nmany lines")
    wrapped.cause = ValueError("bad reward\nsecond line")  # what Ray's RayTaskError carries
    assert error_line(wrapped) == "ValueError: bad reward"
