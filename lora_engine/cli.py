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


def _serve(args) -> int:
    import os

    # Before torch loads OpenMP: the engine thread runs many small ops while the HTTP threads wake
    # it up and down, and spinning OpenMP workers stall it. On the shared 2-core CPU,
    # examples/tinker_rl_loop.py --steps 10 took 234 s against the server with the default
    # policy and 30 s with PASSIVE.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from lora_engine.interop.server.app import ServeConfig
        from lora_engine.interop.server.http import serve
    except ImportError as e:
        print(f"error: lora-engine serve needs the serve extra ({e.name} is missing): "
              "pip install 'lora-engine[serve]'", file=sys.stderr)
        return 2
    key = args.api_key or os.environ.get("LORA_ENGINE_API_KEY", "")
    serve(ServeConfig(model=args.model, api_key=key, host=args.host, port=args.port, store=args.store,
                      max_batch_tokens=args.max_batch_tokens, max_sample_rows=args.max_sample_rows,
                      device=args.device))
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
    sv = sub.add_parser("serve", help="serve the Tinker SDK's API (TINKER_BASE_URL) on one base model")
    sv.add_argument("--model", default="tiny", help="'tiny' or a local Hugging Face model directory")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="the key clients must send (TINKER_API_KEY; starts with "
                    "'tml-'); default $LORA_ENGINE_API_KEY")
    sv.add_argument("--store", default="lora-engine-store", help="where sessions and checkpoints are kept")
    sv.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per forward/backward batch")
    sv.add_argument("--max-sample-rows", type=int, default=256, help="sequences decoded together")
    sv.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:0...")
    sv.set_defaults(fn=_serve)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # Bad input, a missing file or a missing optional extra: one line naming the fix.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
