"""``lora-engine`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _info(args) -> int:
    import torch

    import lora_engine
    from lora_engine import ops

    print(f"lora-engine {lora_engine.__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"triton importable: {ops.triton_available()}")
    print("kernel path:", "triton" if torch.cuda.is_available() and ops.triton_available() else "naive (CPU)")
    return 0


def _train(args) -> int:
    from lora_engine.rl.config import load_config
    from lora_engine.rl.trainer import train

    cfg = load_config(args.config, args.set)
    train(cfg)
    return 0


def _sweep(args) -> int:
    from lora_engine.studies.sweep import describe, load_spec, run_sweep

    spec = load_spec(args.spec)
    describe(spec)
    if args.dry_run:
        return 0
    out = args.out or str(Path("runs") / Path(args.spec).stem)
    groups = [int(g) for g in args.groups.split(",")] if args.groups else None
    if args.ray is not None:
        from lora_engine.studies.ray_runner import run_ray_sweep

        report = run_ray_sweep(args.spec, out, address=args.ray, progress=not args.no_progress, groups=groups)
    else:
        report = run_sweep(args.spec, out, progress=not args.no_progress, groups=groups)
    print(f"report: {report}")
    return 0


def _report(args) -> int:
    from lora_engine.studies.report import write_report
    from lora_engine.studies.sweep import write_results

    run_dir = Path(args.run_dir)
    if not (run_dir / "results.csv").exists() and (run_dir / "runs").exists():
        write_results(run_dir)
    print(f"report: {write_report(run_dir)}")
    return 0


def _spectrum(args) -> int:
    from lora_engine.studies.spectrum import run_spectrum

    res = run_spectrum(args.run_dir, model=args.model, top_k=args.top_k, out_dir=args.out)
    print(f"share of ||dW||^2 in W's top-{args.top_k} singular directions (mean over modules)")
    print(f"{'adapter':<28} {'method':>9} {'top-k':>7} {'rest':>7} {'chance':>7} {'modules':>8}")
    for row in res["summary"]:
        print(f"{row['label']:<28} {row['method']:>9} {row['top']:>7.3f} {1 - row['top']:>7.3f} "
              f"{row['chance']:>7.3f} {row['modules']:>8}")
    print(f"rows: {res['csv']}\nfigure: {res['png']}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lora-engine",
                                description="Train many LoRA adapters at once on one frozen base model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and which kernel path runs here").set_defaults(fn=_info)
    t = sub.add_parser("train", help="GRPO-train several adapters concurrently from a TOML config")
    t.add_argument("config", help="path to a TOML file (see examples/tiny.toml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=10 (repeatable)")
    t.set_defaults(fn=_train)
    s = sub.add_parser("sweep", help="run (or resume) a rank x batch x seed x lr x method sweep")
    s.add_argument("spec", help="sweep spec TOML (see examples/tiny_sweep.toml)")
    s.add_argument("--out", default=None, help="output directory (default runs/<spec name>)")
    s.add_argument("--dry-run", action="store_true", help="print the grouping and exit")
    s.add_argument("--groups", default=None, help="comma-separated group indices to run (job arrays)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|ADDRESS",
                   help="run each group as a Ray task: auto (a running cluster, else a local one; the default "
                        "of a bare --ray), local (a new local one) or a cluster address; resources in the "
                        "spec's [ray] table; needs pip install 'lora-engine[ray]'")
    s.set_defaults(fn=_sweep)
    r = sub.add_parser("report", help="regenerate report.md and figures from RUN_DIR/results.csv")
    r.add_argument("run_dir")
    r.set_defaults(fn=_report)
    sp = sub.add_parser("spectrum", help="where each adapter's update lies in the base weights' singular directions")
    sp.add_argument("run_dir", help="a trainer run directory (config.json + checkpoints/latest)")
    sp.add_argument("--model", default=None, help="base model path (default: the run's config 'model')")
    sp.add_argument("--top-k", type=int, default=16, help="k of the top-k singular directions (default 16)")
    sp.add_argument("--out", default=None, help="where spectrum.csv/.png go (default RUN_DIR)")
    sp.set_defaults(fn=_spectrum)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # Bad input, a missing file or a missing optional extra: one line naming the fix.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
