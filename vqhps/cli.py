"""Command line: ``python -m vqhps <command>``. Each command is a thin call into the library."""
from __future__ import annotations

import argparse
import sys


def _setup_body(args) -> int:
    from .body import load_body
    from .config import load_config

    cfg = load_config(args.profile)
    body = load_body(cfg)
    print(f"body model ready: {body.identifier()} ({body.n_vertices} vertices)")
    return 0


def _reproduce(args) -> int:
    from .reproduce import reproduce

    return reproduce(args.profile, nproc=args.nproc, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqhps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup-body", help="build the body-model cache and fit its joint regressors")
    p.add_argument("--profile", default="smoke")
    p.set_defaults(func=_setup_body)

    p = sub.add_parser("reproduce", help="run notebooks/0*.ipynb in order with papermill")
    p.add_argument("--profile", default="smoke")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 01")
    p.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
