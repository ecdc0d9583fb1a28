"""The sweep on Ray: the same rows as the local runner, retries of a killed worker, failed groups
recorded, and a killed driver resumed. One local Ray instance (2 CPUs) for the whole module: ~8 s
to start it and run the local reference, then 3-18 s per test as workers stay warm."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from lora_engine.rl.tiny_model import build_tokenizer  # noqa: E402
from lora_engine.studies import sweep  # noqa: E402
from lora_engine.studies.ray_runner import run_ray_sweep  # noqa: E402
from test_trainer import DistinctCharsTask, _model  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    # Workers import this module's tasks (pickled by reference): put tests/ on their path.
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}}, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()  # stops the raylet, GCS and every worker this module started


def _spec(path: Path, ray_table: str = "num_cpus = 1") -> Path:
    # 2 ranks x 2 seeds in groups of 2 adapters: 2 groups, 2 steps, a checkpoint after each step.
    path.write_text(f"""
[fixed]
steps = 2
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
[ray]
{ray_table}
""")
    return path


def _base():
    tok = build_tokenizer()
    return _model(tok), tok


def _rows(out: Path) -> dict:
    # wall_s is a timing: everything else must be equal bit for bit.
    return {r["run_id"]: {k: v for k, v in r.items() if k != "wall_s"}
            for r in csv.DictReader(open(out / "results.csv"))}


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    """The local runner's rows at one torch thread (what each 1-CPU Ray task pins)."""
    tmp = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep.run_sweep(_spec(tmp / "spec.toml"), tmp / "out", progress=False, base=_base(), task=DistinctCharsTask())
    finally:
        torch.set_num_threads(threads)
    rows = _rows(tmp / "out")
    assert len(rows) == 4 and all(r["status"] == "done" and r["error"] == "" for r in rows.values())
    return rows


class DiesOnceTask(DistinctCharsTask):
    """Kills its worker process (``os._exit``, no cleanup) at its ``at_call``-th draw, once per
    sweep: the first worker to get there claims ``marker`` (O_EXCL, so two groups never both die)."""

    def __init__(self, marker, at_call):
        super().__init__()
        self.marker, self.at_call, self.calls = str(marker), at_call, 0

    def sample_train(self, n, generator):
        self.calls += 1
        if self.calls == self.at_call:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)
            except FileExistsError:
                pass
        return super().sample_train(n, generator)


class RaisesTask(DistinctCharsTask):
    def sample_train(self, n, generator):
        raise RuntimeError("reward server unreachable")


class KillsDriverTask(DistinctCharsTask):
    """SIGKILLs the driver at the first draw of a group that starts after another group finished
    (groups run one at a time), then hangs like a busy worker until Ray stops it."""

    def __init__(self, driver_pid, out):
        super().__init__()
        self.driver_pid, self.out = driver_pid, str(out)

    def sample_train(self, n, generator):
        if any(Path(self.out).glob("runs/*/result.json")):
            os.kill(self.driver_pid, signal.SIGKILL)
            time.sleep(120)
            os._exit(1)  # never reached when Ray kills the orphaned task, as it should
        return super().sample_train(n, generator)


def test_ray_sweep_rows_equal_local_runner(cluster, local_rows, tmp_path):
    out = tmp_path / "out"
    report = run_ray_sweep(_spec(tmp_path / "spec.toml"), out, base=_base(), task=DistinctCharsTask(), progress=True)
    assert report.exists()
    assert _rows(out) == local_rows


def test_killed_worker_is_retried_and_sweep_completes(cluster, local_rows, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "killed"
    # Draw 3 is step 1's first (2 adapters draw once per step): step 0's checkpoint is on disk.
    run_ray_sweep(_spec(tmp_path / "spec.toml", "num_cpus = 1\nmax_retries = 1"), out, base=_base(),
                  task=DiesOnceTask(marker, at_call=3), progress=False)
    assert marker.exists(), "a worker was killed"
    # The retry resumed the killed group from its checkpoint and redrew the same numbers.
    assert _rows(out) == local_rows


def test_failed_group_is_recorded_then_rerun(cluster, local_rows, tmp_path, capsys):
    spec, out = _spec(tmp_path / "spec.toml", "num_cpus = 1\nmax_retries = 1"), tmp_path / "out"
    run_ray_sweep(spec, out, base=_base(), task=RaisesTask(), progress=False)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"failed"}
    assert all(r["error"] == "RuntimeError: reward server unreachable" for r in rows)
    assert all(r["rank"] and r["seed"] and r["batch_size"] for r in rows)  # the config columns are kept
    assert "2 group(s) failed after 1 retries" in capsys.readouterr().err
    assert (out / "report.md").exists()  # the report excludes failed runs instead of crashing
    # Failed runs are not finished: a rerun trains them, and their failed.json is superseded.
    run_ray_sweep(spec, out, base=_base(), task=DistinctCharsTask(), progress=False)
    assert _rows(out) == local_rows
    assert not list(out.glob("runs/*/failed.json"))


@pytest.mark.slow  # ~30 s: a second Python process imports torch and Ray as the driver
def test_killed_driver_resumes_without_redoing_finished_runs(cluster, local_rows, tmp_path):
    spec, out = _spec(tmp_path / "spec.toml", "num_cpus = 2"), tmp_path / "out"  # one group at a time
    driver = f"""
import os, sys
sys.path[:0] = [{str(TESTS)!r}]
import ray
ray.init(address={cluster!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {str(TESTS)!r}}}}}, log_to_driver=False)
from lora_engine.studies.ray_runner import run_ray_sweep
from test_sweep_ray import KillsDriverTask, _base
run_ray_sweep({str(spec)!r}, {str(out)!r}, base=_base(), task=KillsDriverTask(os.getpid(), {str(out)!r}),
              progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert len(finished) == 2, "one group of 2 runs finished before the driver was killed"

    run_ray_sweep(spec, out, base=_base(), task=DistinctCharsTask(), progress=False)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "finished runs were not redone"
    assert _rows(out) == local_rows
    assert all(json.loads(p.read_text())["status"] == "done" for p in out.glob("runs/*/result.json"))
