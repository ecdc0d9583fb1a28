"""Sweeps: a grid over rank x batch size x seed x lr x method, packed into concurrent groups.

A spec (TOML) has a ``[fixed]`` table of ``TrainConfig`` fields shared by every run, a ``[grid]``
table of lists, and optional ``[packing]`` limits:

    [fixed]
    model = "tiny"
    steps = 30
    data_seed = 0                    # the task's problem pool and held-out split, shared by all runs
    [grid]
    rank = [1, 4, 16, 32]
    prompts_per_step = [4, 8]        # batch size = prompts_per_step x samples_per_prompt
    seed = [0, 1, 2]                 # each run's adapter seed: its init and its sampling
    lr = [2e-3]
    method = ["lora"]
    [packing]
    max_adapters_per_group = 8
    max_rows_per_step = 512          # sequences generated per step by one group
    memory_budget_mb = 20000         # trainable state (weights, grads, AdamW) per group
    reward_regime = ["outcome"]      # study C: outcome | process | distillation (adapters of every regime
                                     # share a group: the advantages branch per group on deposit density)
    [ray]                            # only read by `lora-engine sweep SPEC --ray` (studies.ray_runner)
    num_gpus = 1                     # per group (default: 1 on a cluster with GPUs, else 0); 0.5 shares a GPU
    num_cpus = 1                     # per group; torch's thread count in the task
    max_retries = 2                  # a failed group is retried this often, then recorded as failed

``[[grid]]`` (several grid tables) takes the union of their products (``studies.grid``).

Every grid point is one *run* (one adapter). Runs that share everything but rank, seed, lr,
method and prompts_per_step can share one base model and one batch: they are packed into
groups (largest footprint first, first fit) under the limits. A group is one ``GRPOTrainer``;
each of its adapters is recorded as its own run. A killed sweep resumes: finished runs are
read back from disk, and an interrupted group resumes from its last checkpoint. A group that
failed for good (Ray runner, retries spent) is recorded as ``runs/<id>/failed.json`` rows with
status "failed" and its error; a rerun tries it again.

One meaning per name: ``seed`` is only the grid's adapter seed (``[fixed] seed`` is refused),
and a run's batch size is its ``prompts_per_step`` (results.csv derives ``batch_size`` from it
with ``results.batch_size``).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from lora_engine.atomic import write_json_atomic
from lora_engine.rl import checkpoints
from lora_engine.rl.config import TrainConfig, config_from_dict, tomllib
from lora_engine.studies import results
from lora_engine.studies.grid import GRID_KEYS, Run, expand_grids  # noqa: F401  (Run, GRID_KEYS: this module's API)

RESULT_FILE, FAILED_FILE = "result.json", "failed.json"


@dataclass(frozen=True)
class RayOptions:
    """The spec's ``[ray]`` table: what one group's Ray task reserves, and how often it is retried."""
    num_gpus: float | None = None  # None: 1 on a cluster with GPUs, 0 on a CPU-only one
    num_cpus: float = 1.0
    max_retries: int = 2


def ray_options(table: dict) -> RayOptions:
    bad = set(table) - {"num_gpus", "num_cpus", "max_retries"}
    if bad:
        raise ValueError(f"unknown ray key(s) {sorted(bad)}: [ray] takes num_gpus, num_cpus, max_retries")

    def number(key):
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"ray.{key} must be a number, got {v!r}")
        return float(v)

    opts = {}
    if "num_gpus" in table:
        opts["num_gpus"] = number("num_gpus")
        if not 0 <= opts["num_gpus"] <= 1:
            # One group is one process on one device: more than one GPU would sit idle.
            raise ValueError(f"ray.num_gpus must be in [0, 1] (a group trains on one GPU; 0.5 puts two small "
                             f"groups on one GPU), got {table['num_gpus']!r}")
    if "num_cpus" in table:
        opts["num_cpus"] = number("num_cpus")
        if opts["num_cpus"] < 1:
            raise ValueError(f"ray.num_cpus must be >= 1 (torch's thread count in the task), got {table['num_cpus']!r}")
    if "max_retries" in table:
        v = table["max_retries"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"ray.max_retries must be an integer >= 0, got {v!r}")
        opts["max_retries"] = v
    return RayOptions(**opts)


@dataclass
class SweepSpec:
    fixed: dict
    runs: list[Run]
    max_adapters_per_group: int = 8
    max_rows_per_step: int = 1024
    memory_budget_mb: float = float("inf")
    groups: list[list[Run]] = field(default_factory=list)
    ray: RayOptions = field(default_factory=RayOptions)


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"sweep spec {path} does not exist: pass a TOML file such as examples/tiny_sweep.toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None
    return spec_from_dict(data)


def spec_from_dict(data: dict) -> SweepSpec:
    unknown = set(data) - {"fixed", "grid", "packing", "ray"}
    if unknown:
        raise ValueError(f"unknown sweep section(s) {sorted(unknown)}: use [fixed], [grid], [packing], [ray]")
    fixed = dict(data.get("fixed", {}))
    grids = data.get("grid", {})
    grids = [dict(g) for g in grids] if isinstance(grids, list) else [dict(grids)]
    if "adapters" in fixed:
        raise ValueError("[fixed] must not hold adapters: the grid defines them")
    if "seed" in fixed:
        # One meaning per name: in a sweep, seed is each run's adapter seed (init and sampling).
        raise ValueError("[fixed] seed is ambiguous in a sweep: list adapter seeds in [grid] seed = [0, 1, 2]; "
                         "the task's data seed is [fixed] data_seed")
    runs = expand_grids(grids, fixed)
    # Validate every run as a config now, not an hour into the sweep.
    for run in runs:
        config_from_dict({**fixed, "adapters": [_adapter(run)], **_fixed_for([run])})
    packing = dict(data.get("packing", {}))
    bad = set(packing) - {"max_adapters_per_group", "max_rows_per_step", "memory_budget_mb", "reference_model"}
    if bad:
        raise ValueError(f"unknown packing key(s) {sorted(bad)}")
    reference = packing.pop("reference_model", None)
    spec = SweepSpec(fixed=fixed, runs=runs, ray=ray_options(dict(data.get("ray", {}))), **packing)
    dims = None
    if spec.memory_budget_mb != float("inf"):
        dims = module_dims_for(fixed.get("model", "tiny"), reference)
    spec.groups = pack(spec, module_dims=dims)
    return spec


def _dims_from_config(c) -> list[tuple[int, int]]:
    """(in, out) of every q/k/v/o/gate/up/down projection of a Llama-family decoder config."""
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, getattr(c, "num_key_value_heads", c.num_attention_heads) * hd
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)] * layers


def module_dims_for(model: str, reference: str | None = None) -> list[tuple[int, int]]:
    """Shapes the memory budget is computed on (all linear layers: an upper bound for narrower
    targets): a named reference (``"qwen3-8b"``), the built-in tiny model, or a local model's
    config.json (no weights are read)."""
    if reference is not None:
        if reference.lower() != "qwen3-8b":
            raise ValueError(f"packing.reference_model {reference!r} is unknown: use 'qwen3-8b' or remove it "
                             "and point [fixed].model at a local model")
        return QWEN3_8B_MODULES
    if model == "tiny":
        from lora_engine.rl.tiny_model import TINY_RECIPE
        return _dims_from_config(SimpleNamespace(**TINY_RECIPE["model"]))
    if Path(model).exists():
        from transformers import AutoConfig
        return _dims_from_config(AutoConfig.from_pretrained(model))
    raise ValueError(f"packing.memory_budget_mb needs the model's layer shapes, but {model!r} is not on this "
                     "machine: set packing.reference_model = 'qwen3-8b' to plan with Qwen3-8B shapes")


def _adapter(run: Run) -> dict:
    return {"rank": run.rank, "alpha": run.alpha, "seed": run.seed, "lr": run.lr, "method": run.method,
            "name": run.run_id}


def _fixed_for(runs: list[Run]) -> dict:
    """The per-adapter config lists of a group (or one run): batch size and reward regime."""
    return {"prompts_per_step": [r.prompts_per_step for r in runs],
            "reward_regime": [r.reward_regime for r in runs]}


def adapter_state_bytes(rank: int, module_dims: list[tuple[int, int]]) -> int:
    """Trainable state of one LoRA adapter: fp32 weights + grads + 2 AdamW moments = 16 B/param."""
    return 16 * rank * sum(k + n for k, n in module_dims)


def pack(spec: SweepSpec, module_dims: list[tuple[int, int]] | None = None) -> list[list[Run]]:
    """First-fit-decreasing packing of runs into groups under the spec's limits.

    ``module_dims``: (in, out) of every adapted module, for the memory estimate; without it the
    memory budget is not applied (the tiny default is far below any budget).
    """
    samples = int(spec.fixed.get("samples_per_prompt", 8))
    ppo = spec.fixed.get("algorithm") == "ppo"  # every run brings its critic (a LoRA of critic_rank)
    groups: list[list[Run]] = []
    loads: list[tuple[int, float]] = []
    for run in sorted(spec.runs, key=lambda r: (-r.rank, -r.prompts_per_step, r.run_id)):
        rows = run.prompts_per_step * samples
        mem = adapter_state_bytes(run.rank, module_dims) / 2**20 if module_dims else 0.0
        if ppo and module_dims:
            mem += adapter_state_bytes(int(spec.fixed.get("critic_rank", 0)) or run.rank, module_dims) / 2**20
        if rows > spec.max_rows_per_step:
            raise ValueError(f"run {run.run_id} alone generates {rows} sequences per step > max_rows_per_step="
                             f"{spec.max_rows_per_step}: raise the limit or lower prompts_per_step")
        for g, (n_rows, n_mem) in enumerate(loads):
            if (len(groups[g]) < spec.max_adapters_per_group and n_rows + rows <= spec.max_rows_per_step
                    and n_mem + mem <= spec.memory_budget_mb):
                groups[g].append(run)
                loads[g] = (n_rows + rows, n_mem + mem)
                break
        else:
            groups.append([run])
            loads.append((rows, mem))
    return groups


def group_config(spec: SweepSpec, g: int, out_dir: Path) -> TrainConfig:
    runs = spec.groups[g]
    return config_from_dict({**spec.fixed, "adapters": [_adapter(r) for r in runs], **_fixed_for(runs),
                             "output_dir": str(out_dir / "groups" / f"group_{g:03d}")})


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_sweep(spec_path, out_dir, groups=None) -> tuple[SweepSpec, Path, list[int]]:
    """Load the spec, create the sweep folder (spec + run info) and check the group indices:
    the start shared by the local runner and the Ray runner (``studies.ray_runner``)."""
    from lora_engine.rl.runinfo import run_info

    spec = load_spec(spec_path)
    out_dir = Path(out_dir)
    todo = list(range(len(spec.groups))) if groups is None else list(groups)
    bad = [g for g in todo if not 0 <= g < len(spec.groups)]
    if bad:
        raise ValueError(f"group(s) {bad} do not exist: the spec packs into groups 0..{len(spec.groups) - 1}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.toml").write_text(Path(spec_path).read_text())
    (out_dir / "run.json").write_text(json.dumps(run_info(), indent=2))
    return spec, out_dir, todo


def finish_sweep(out_dir) -> Path:
    """results.csv from every run recorded so far, then the report; returns the report's path."""
    from lora_engine.studies.report import write_report

    write_results(out_dir)
    return write_report(out_dir)


def run_sweep(spec_path, out_dir, progress: bool = True, base=None, task=None, groups=None) -> Path:
    """Run (or resume) the groups of the sweep one after another in this process; writes
    ``results.csv`` and the report. ``studies.ray_runner.run_ray_sweep`` is the same on Ray.

    ``base`` = (model, tokenizer) and ``task`` replace the spec's model and task (tests, notebooks).
    ``groups``: indices to run (default all), e.g. ``range(rank, n, world_size)`` in a job array;
    the results and report then cover every run finished so far.
    """
    from tqdm.auto import tqdm

    spec, out_dir, todo = prepare_sweep(spec_path, out_dir, groups)
    bar = tqdm(todo, desc="sweep groups", disable=not progress)
    for g in bar:
        bar.set_postfix(group=g, adapters=len(spec.groups[g]))
        base = run_group(spec, g, out_dir, base=base, task=task)
    return finish_sweep(out_dir)


def group_finished(spec: SweepSpec, g: int, out_dir) -> bool:
    """Every run of group ``g`` has its result.json: resume skips the group."""
    return all((Path(out_dir) / "runs" / r.run_id / RESULT_FILE).exists() for r in spec.groups[g])


def group_rows(spec: SweepSpec, g: int, out_dir) -> list[dict]:
    """The result rows of group ``g``'s runs, as written by ``run_group``."""
    return [json.loads((Path(out_dir) / "runs" / r.run_id / RESULT_FILE).read_text()) for r in spec.groups[g]]


def run_group(spec: SweepSpec, g: int, out_dir, base=None, task=None):
    """Train group ``g`` (all its adapters concurrently) unless its runs are finished; returns the
    (model, tokenizer) base so the caller can reuse it for the next group. The one function that
    runs a group: the local runner calls it in a loop, the Ray runner once per Ray task."""
    from lora_engine.rl.models import load_base
    from lora_engine.rl.trainer import GRPOTrainer

    out_dir = Path(out_dir)
    if group_finished(spec, g, out_dir):
        return base
    cfg = group_config(spec, g, out_dir)
    if base is None:  # one base model per process, shared by every group it runs
        base = load_base(cfg.model, cfg.dtype, cfg.device, progress=cfg.progress)
    model, tokenizer = base
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tokenizer, task=task)
    summary = trainer.fit()
    _record_group(out_dir, g, spec, cfg, trainer, summary)
    trainer.engine.detach()  # the next group starts from the plain base model
    return base


def _run_columns(run: Run, g: int, cfg: TrainConfig) -> dict:
    """The configuration columns of a run's row (results.COLUMNS), finished or failed."""
    return {"run_id": run.run_id, "group": g, "rank": run.rank, "alpha": run.alpha, "method": run.method,
            "lr": run.lr, "seed": run.seed, "prompts_per_step": run.prompts_per_step, "reward_regime": run.reward_regime,
            "samples_per_prompt": cfg.samples_per_prompt,
            "batch_size": results.batch_size(run.prompts_per_step, cfg.samples_per_prompt), "steps": cfg.steps}


def _record_group(out_dir: Path, g: int, spec: SweepSpec, cfg: TrainConfig, trainer, summary: dict) -> None:
    from lora_engine.rl.runinfo import run_info

    ckpt = checkpoints.latest_checkpoint(trainer.out)
    k = cfg.eval_samples
    for i, run in enumerate(spec.groups[g]):
        a = trainer.ids[i]
        ini, fin = summary["initial"][str(a)], summary["final"][str(a)]
        n_params = sum(p.numel() for p in trainer.engine.adapter_parameters(a))
        row = {
            **_run_columns(run, g, cfg),
            "base_score": summary["base"], "final_score": fin["pass@1"], "gain": fin["pass@1"] - summary["base"],
            "tokens": summary["tokens"][str(a)], "trainable_params": n_params,
            "optimizer_bytes": 8 * n_params,  # two fp32 AdamW moments
            "checkpoint_bytes": _dir_bytes(checkpoints.adapter_dir(ckpt, a)),
            "entropy_initial": ini["entropy"], "entropy_final": fin["entropy"],
            "pass_at_k_base": summary["base_eval"].get(f"pass@{k}", "") if k else "",
            "pass_at_k_final": fin.get(f"pass@{k}", "") if k else "", "k": k or "",
            "wall_s": summary.get("wall_s", ""), "status": "done",
        }
        run_dir = out_dir / "runs" / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"run": row["run_id"], "seed": run.seed,
                                                         "group_config": cfg.to_dict()}, indent=2, default=str))
        (run_dir / "run.json").write_text(json.dumps(run_info(), indent=2))
        results.write_curve(run_dir, trainer.out / "log.jsonl", a)
        write_json_atomic(run_dir / RESULT_FILE, row)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier failure of this run is superseded


def record_failure(spec: SweepSpec, g: int, out_dir, error: str) -> None:
    """Mark group ``g``'s unfinished runs failed with ``error`` (one line). The rows go to
    failed.json, never result.json, so a rerun of the sweep tries the group again."""
    out_dir = Path(out_dir)
    cfg = group_config(spec, g, out_dir)
    for run in spec.groups[g]:
        run_dir = out_dir / "runs" / run.run_id
        if (run_dir / RESULT_FILE).exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / FAILED_FILE, {**_run_columns(run, g, cfg), "status": "failed", "error": error})


def write_results(out_dir) -> Path:
    """Collect every run's result.json (or, for a run that never finished, its failed.json)
    into ``results.csv``: one row per run."""
    out_dir = Path(out_dir)
    rows = []
    for run_dir in sorted(p for p in (out_dir / "runs").glob("*") if p.is_dir()):
        for name in (RESULT_FILE, FAILED_FILE):
            if (run_dir / name).exists():
                rows.append(json.loads((run_dir / name).read_text()))
                break
    results.write_curves(out_dir)
    return results.write_csv(out_dir / "results.csv", rows)


# Qwen3-8B's decoder shapes (36 layers; q/o 4096x4096, k/v 4096->1024, gate/up 4096->12288,
# down 12288->4096): used to plan sweeps of the study at full scale without the weights.
QWEN3_8B_MODULES = _dims_from_config(SimpleNamespace(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128))


def describe(spec: SweepSpec, file=sys.stdout) -> None:
    print(f"{len(spec.runs)} runs in {len(spec.groups)} concurrent groups", file=file)
    for g, runs in enumerate(spec.groups):
        ranks = sorted({r.rank for r in runs})
        print(f"  group {g}: {len(runs)} adapters, ranks {ranks}", file=file)
