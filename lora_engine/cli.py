"""``lora-engine`` command line."""
from __future__ import annotations

import argparse
import sys


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
    from lora_engine.config import load_config
    from lora_engine.trainer import train

    cfg = load_config(args.config, args.set)
    train(cfg)
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
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
