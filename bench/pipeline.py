"""Pipeline benchmark: wall time of the tiny end-to-end example, from nothing to a gated student.

Makes the example's models and prompts (examples/tiny/prepare.py: trains the teacher here),
then runs `distill run` on examples/tiny/spec.yaml in a fresh process, in a scratch folder.
Prints a table and, last, one line of JSON with ``wall_seconds`` (prepare + run).

    python bench/pipeline.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    loader = importlib.util.spec_from_file_location("prepare", REPO / "examples/tiny/prepare.py")
    assert loader is not None
    assert loader.loader is not None
    prepare = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(prepare)
    spec = yaml.safe_load((REPO / "examples/tiny/spec.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        prepare.main(work)
        prepared = time.perf_counter()
        spec["teacher"]["model"] = str(work / "teacher")
        spec["student"]["model"] = str(work / "student")
        spec["dataset"]["prompts"] = str(work / "prompts.jsonl")
        spec["output"] = str(work / "artifacts")
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        distill = Path(sys.executable).parent / "distill"
        env = {**os.environ, "DISTILL_WORK_DIR": str(work / "cache")}
        out = subprocess.run(
            [str(distill), "run", str(work / "spec.yaml")], capture_output=True, text=True, env=env
        )
        finished = time.perf_counter()
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return 1
        report = json.loads(next((work / "artifacts").glob("evaluate-*/report.json")).read_text())
    print(out.stdout)
    print(f"prepare (teacher, student, prompts): {prepared - started:6.1f} s")
    print(f"distill run (generate, train, eval): {finished - prepared:6.1f} s")
    print(f"gate: {report['gate']['message']}")
    print(
        json.dumps(
            {
                "bench": "pipeline",
                "wall_seconds": round(finished - started, 1),
                "prepare_seconds": round(prepared - started, 1),
                "run_seconds": round(finished - prepared, 1),
                "gate_passed": report["gate"]["passed"],
                "retention": report["gate"]["retention"],
                "teacher_exact_match": report["teacher"].get("exactMatch"),
                "student_exact_match": report["student"].get("exactMatch"),
                "cpus": os.cpu_count(),
                "gpu": None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
