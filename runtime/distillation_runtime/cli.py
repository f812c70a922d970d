"""``distill``: the command line of the pipeline.

``distill validate SPEC`` checks a spec (a bare pipeline spec or a whole Distillation manifest)
with the same rules the API server applies, and prints it with every default filled in. The
stage commands (``run``, ``plan``, ``stage``) build on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distillation_runtime.spec import SpecError, dump_spec, load_pipeline_spec
from distillation_runtime.yamlio import dump_yaml


def validate(path: Path) -> int:
    """Print the spec with its defaults, or every problem with it (exit status 2)."""
    try:
        spec = load_pipeline_spec(path.read_text())
    except SpecError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    print(dump_yaml(dump_spec(spec)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="LLM knowledge distillation.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "validate", help="check a spec and print it with every default filled in"
    )
    check.add_argument("spec", type=Path, help="pipeline spec or Distillation manifest (YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.spec)
    raise AssertionError(f"unhandled command {args.command}")  # argparse refuses unknown ones


if __name__ == "__main__":
    sys.exit(main())
