"""Sweeps on Ray: every group of a sweep is one Ray task (``lora-engine sweep SPEC --ray``).

The task calls ``sweep.run_group``, the very function the local runner calls, so a group trains
and records itself the same way wherever it runs. What each task reserves and how often a failed
group is retried come from the spec's ``[ray]`` table (``sweep.RayOptions``).

Where results go: the task writes ``runs/<id>/result.json`` (atomically) and its group's
checkpoints into the sweep folder, which should be on storage every node sees (NFS, Lustre, a
mounted bucket): a retried group then resumes from its last checkpoint on whichever node it
lands. The task also returns its rows, and the driver writes any it cannot see, so results.csv
is complete even when ``--out`` is node-local (the adapters then stay on the workers' disks).

Resume is the local runner's: the driver skips a group whose runs all have result.json, and
``run_group`` checks again inside the task. A task that raises or whose worker dies is retried
``max_retries`` times by Ray (``retry_exceptions=True``), then its unfinished runs are recorded
with status "failed" and the error (``sweep.record_failure``); the other groups carry on.

Ray is an optional extra (``pip install 'lora-engine[ray]'``) and is imported only here, inside
functions.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lora_engine.atomic import write_json_atomic
from lora_engine.studies.sweep import (RESULT_FILE, SweepSpec, finish_sweep, group_finished, group_rows,
                                       prepare_sweep, record_failure, run_group)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray, which is not installed: pip install 'lora-engine[ray]'") from None
    return ray


def run_ray_sweep(spec_path, out_dir, address: str = "auto", progress: bool = True, base=None, task=None,
                  groups=None) -> Path:
    """Run (or resume) the sweep's groups as Ray tasks; writes ``results.csv`` and the report.

    ``address``: ``"auto"`` (the cluster in RAY_ADDRESS or started by ``ray start`` on this
    machine, else a new local instance), ``"local"`` (always a new local instance) or a cluster
    address (``"head-node:6379"``, ``"ray://head-node:10001"``). An already initialised Ray
    (a notebook, a test) is used as it is and left running. ``base``, ``task`` and ``groups``
    as in ``sweep.run_sweep``; ``base`` and ``task`` go to every task through Ray's object store.
    """
    ray = import_ray()
    # Absolute: a task on another node does not start in this process's working directory.
    spec, out, todo = prepare_sweep(spec_path, Path(out_dir).resolve(), groups)
    if base is None and spec.fixed.get("model", "tiny") == "tiny":
        from lora_engine.rl.models import model_path
        model_path("tiny", progress=progress)  # build the cached tiny model once here, not in every task
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "auto" else address)
    try:
        run_groups(ray, spec, out, todo, progress=progress, base=base, task=task)
    finally:
        if started:
            ray.shutdown()
    return finish_sweep(out)


def task_resources(spec: SweepSpec, nodes: list[dict]) -> dict:
    """Ray resources of one group's task, checked against the cluster's largest node (``nodes``:
    each alive node's resources): a request no node can meet would wait forever."""
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    opts = spec.ray
    num_gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus > gpus:
        raise ValueError(f"[ray] num_gpus = {num_gpus:g} per group, but no node of the Ray cluster has a GPU: "
                         "set [ray] num_gpus = 0 to train on CPUs, or add GPU nodes")
    if opts.num_cpus > cpus:
        raise ValueError(f"[ray] num_cpus = {opts.num_cpus:g} per group, but the largest node of the Ray cluster "
                         f"has {cpus:g} CPUs: lower [ray] num_cpus")
    return {"num_cpus": opts.num_cpus, "num_gpus": num_gpus}


def _group_task(spec: SweepSpec, g: int, out_dir: Path, base, task, threads: int) -> list[dict]:
    """Body of one Ray task: group ``g`` via ``run_group``; returns its result rows."""
    import torch

    # Ray sets OMP_NUM_THREADS to the task's CPUs, but torch may already have sized its pool:
    # pin it, so two 1-CPU tasks on a 2-core node do not each run 2 threads, and so a row is
    # bit-identical to the local runner's at the same thread count (the tests check it).
    torch.set_num_threads(threads)
    run_group(spec, g, out_dir, base=base, task=task)
    return group_rows(spec, g, out_dir)


def error_line(e: BaseException) -> str:
    """One line for the results' error column: the task's own exception where Ray wraps one."""
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


def run_groups(ray, spec: SweepSpec, out: Path, todo: list[int], progress: bool = True, base=None,
               task=None) -> dict[int, str]:
    """Submit every unfinished group of ``todo`` as a task, gather them as they finish (one tqdm
    bar on the driver), record the failed ones; returns {group: error} of the failed groups."""
    from tqdm.auto import tqdm

    pending_groups = [g for g in todo if not group_finished(spec, g, out)]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    resources = task_resources(spec, nodes)
    remote = ray.remote(_group_task)
    options = {**resources, "max_retries": spec.ray.max_retries, "retry_exceptions": True}
    base_ref = ray.put(base) if base is not None else None  # one copy in the object store, not one per task
    task_ref = ray.put(task) if task is not None else None
    threads = max(1, int(resources["num_cpus"]))
    # Submitted in group order: packing puts the largest ranks first, so the longest groups start
    # first and the short ones fill in at the end (a longest-first schedule).
    pending = {remote.options(**options, name=f"group_{g:03d}").remote(spec, g, out, base_ref, task_ref, threads): g
               for g in pending_groups}
    failed: dict[int, str] = {}
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc="sweep groups (ray)", disable=not progress)
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            g = pending.pop(ref)
            try:
                _write_missing_rows(out, ray.get(ref))
            except Exception as e:  # retries spent: record it, let the other groups finish
                failed[g] = error_line(e)
                record_failure(spec, g, out, failed[g])
            bar.update(1)
            bar.set_postfix(running=len(pending), failed=len(failed))
    except BaseException:
        for ref in pending:  # Ctrl-C or a driver error: stop the cluster's work on this sweep
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    if failed:
        print(f"{len(failed)} group(s) failed after {spec.ray.max_retries} retries: {sorted(failed)}; their runs "
              "have status 'failed' and the error in results.csv; rerun the sweep to retry them", file=sys.stderr)
    return failed


def _write_missing_rows(out: Path, rows: list[dict]) -> None:
    """Write a task's rows the driver cannot see: ``--out`` is not on storage every node sees."""
    missing = [r for r in rows if not (out / "runs" / r["run_id"] / RESULT_FILE).exists()]
    if missing:
        print(f"warning: {len(missing)} result(s) written by a worker are not visible here, so {out} is not "
              "on shared storage: the driver writes the rows, adapters and checkpoints stay on the workers",
              file=sys.stderr)
    for r in missing:
        (out / "runs" / r["run_id"]).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "runs" / r["run_id"] / RESULT_FILE, r)
