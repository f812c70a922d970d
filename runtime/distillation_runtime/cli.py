"""``distill``: the command line of the pipeline.

``distill validate SPEC`` checks a spec (a bare pipeline spec or a whole Distillation manifest)
with the same rules the API server applies, and prints it with every default filled in.
``distill plan SPEC`` prints the stage graph with fingerprints, artifacts and what is done. The
stage commands (``run``, ``stage``) build on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distillation_runtime import __version__
from distillation_runtime.plan import COMPLETION_MARKER, make_plan
from distillation_runtime.spec import PipelineSpec, SpecError, dump_spec, load_pipeline_spec
from distillation_runtime.yamlio import dump_yaml


def _load(path: Path) -> PipelineSpec | None:
    """The spec in ``path``, or None after printing every problem with it."""
    try:
        return load_pipeline_spec(path.read_text())
    except SpecError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return None


def _load_env(variable: str) -> PipelineSpec | None:
    """The spec in the environment variable ``variable`` (how a RayJob passes it)."""
    text = os.environ.get(variable)
    if not text:
        print(f"distill: environment variable {variable} is empty or not set", file=sys.stderr)
        return None
    try:
        return load_pipeline_spec(text)
    except SpecError as err:
        print(f"${variable}: {err}", file=sys.stderr)
        return None


def validate(path: Path) -> int:
    """Print the spec with its defaults, or every problem with it (exit status 2)."""
    spec = _load(path)
    if spec is None:
        return 2
    print(dump_yaml(dump_spec(spec)), end="")
    return 0


def stage_state(artifact: str) -> str:
    """complete / missing for a local artifact folder; unknown for remote storage (for now)."""
    if "://" in artifact and not artifact.startswith("file://"):
        return "unknown (remote)"
    folder = Path(artifact.removeprefix("file://"))
    return "complete" if (folder / COMPLETION_MARKER).exists() else "to run"


def show_plan(path: Path) -> int:
    """Print the stage graph, each stage's fingerprint and artifact, and whether it is done."""
    spec = _load(path)
    if spec is None:
        return 2
    plan = make_plan(spec)
    rows = [("stage", "after", "fingerprint", "state", "artifact")]
    for stage in plan.stages:
        after = ",".join(stage.inputs) or "-"
        artifact = stage.artifact(plan.output)
        rows.append((stage.name, after, stage.fingerprint, stage_state(artifact), artifact))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def run_all(path: Path) -> int:
    """Run every stage of the plan locally; complete stages are reused."""
    from distillation_runtime.pipeline import Runner, results_table

    spec = _load(path)
    if spec is None:
        return 2
    try:
        outcomes = Runner(spec).run()
    except SpecError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    print(results_table(outcomes))
    return 0


def parse_artifacts(pairs: list[str]) -> dict[str, str] | None:
    """``--artifact NAME=URI`` options as a mapping; None (after saying why) when one is not
    of that form."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            print(f"distill stage: --artifact {pair!r} is not NAME=URI", file=sys.stderr)
            return None
        found[name] = uri
    return found


def run_one(
    name: str, path: Path | None, variable: str | None = None, artifacts: list[str] | None = None
) -> int:
    """Run one stage (what the operator's RayJob runs); its inputs must be complete, and a
    preflight that ran must not have refused the spec. Artifact URIs given with ``--artifact``
    win over this runtime's plan (the operator planned them)."""
    from distillation_runtime.pipeline import Runner
    from distillation_runtime.stages import spec_problems
    from distillation_runtime.storage import artifact_complete

    spec = _load(path) if path is not None else _load_env(variable or "")
    given = parse_artifacts(artifacts or [])
    if spec is None or given is None:
        return 2
    runner = Runner(spec, artifacts=given)
    try:
        stage = runner.plan[name]
    except KeyError as err:
        print(f"distill stage: {err.args[0]}", file=sys.stderr)
        return 2
    missing = [i for i in stage.inputs if not artifact_complete(runner.artifact(i))]
    if missing:
        print(
            f"distill stage {name}: inputs not complete yet: {', '.join(missing)}", file=sys.stderr
        )
        return 3
    checked = [i for i in stage.after if artifact_complete(runner.artifact(i))]
    refused = [p for i in checked for p in spec_problems(runner.metrics(i))]
    if refused:
        print(f"distill stage {name}: {SpecError(refused)}", file=sys.stderr)
        return 2
    if artifact_complete(runner.artifact(stage.name)):
        print(f"{name}: already complete at {runner.artifact(stage.name)}")
        return 0
    outcome = runner.run_stage(stage)
    print(f"{name}: {outcome.state} in {outcome.seconds:.1f} s -> {outcome.artifact}")
    return 0


def serve_model(
    model: str, host: str, port: int, served_model_name: str | None, limit: int | None
) -> int:
    """Serve a model over OpenAI's HTTP API until interrupted (``serve.py`` says how)."""
    from distillation_runtime.serve import DEFAULT_MAX_NEW_TOKENS_LIMIT, ServeOptions, serve

    limit = DEFAULT_MAX_NEW_TOKENS_LIMIT if limit is None else limit
    if limit < 1:
        print(
            f"distill serve: --max-new-tokens-limit {limit} is not allowed; give a positive "
            "integer",
            file=sys.stderr,
        )
        return 2
    if not 0 <= port <= 65535:
        print(
            f"distill serve: --port {port} is not allowed; give 0 to 65535 (0: any free port)",
            file=sys.stderr,
        )
        return 2
    return serve(ServeOptions(model, host, port, served_model_name, limit))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="LLM knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "validate", help="check a spec and print it with every default filled in"
    )
    check.add_argument("spec", type=Path, help="pipeline spec or Distillation manifest (YAML)")
    plan = commands.add_parser(
        "plan", help="print the stages, their fingerprints and artifacts, and which are done"
    )
    plan.add_argument("spec", type=Path, help="pipeline spec or Distillation manifest (YAML)")
    run = commands.add_parser("run", help="run every stage locally, reusing complete ones")
    run.add_argument("spec", type=Path, help="pipeline spec or Distillation manifest (YAML)")
    stage = commands.add_parser("stage", help="run one stage (what a RayJob runs)")
    stage.add_argument("name", help="stage name, as `distill plan` prints it")
    source = stage.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the pipeline spec (YAML file)")
    source.add_argument(
        "--config-env",
        metavar="VARIABLE",
        help="read the spec (YAML) from this environment variable (what the operator's RayJobs do)",
    )
    stage.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="where stage NAME's artifact is (this stage's output or an input); the operator "
        "passes the URIs it planned, so an image of another version writes where it reads",
    )
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (transformers; to try a student)",
    )
    serve.add_argument(
        "model", help="model folder or URI (s3://, gs://, pvc://, hf://), fetched once"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on, 0 for any (default: %(default)s)"
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model's name in requests and responses (default: the folder's name)",
    )
    serve.add_argument(
        "--max-new-tokens-limit",
        type=int,
        metavar="N",
        help="the most tokens one request may generate, its max_tokens (default: 512)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.spec)
    if args.command == "plan":
        return show_plan(args.spec)
    if args.command == "run":
        return run_all(args.spec)
    if args.command == "stage":
        return run_one(args.name, args.config, args.config_env, args.artifact)
    if args.command == "serve":
        return serve_model(
            args.model, args.host, args.port, args.served_model_name, args.max_new_tokens_limit
        )
    raise AssertionError(f"unhandled command {args.command}")  # argparse refuses unknown ones


if __name__ == "__main__":
    sys.exit(main())
