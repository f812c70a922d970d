"""The stage plan: the graph a spec needs, and which edits invalidate which stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_runtime.plan import COMPLETION_MARKER, changed_stages, make_plan
from distillation_runtime.spec import PipelineSpec
from support.corpus import merge_patch

BASE: dict[str, Any] = {
    "teacher": {"model": "hf://org/teacher"},
    "student": {"model": "hf://org/student"},
    "dataset": {"prompts": "./prompts.jsonl"},
    "generate": {"topLogprobs": 8},
    "train": {"losses": {"logits": {"weight": "0.5"}}},
    "output": "./out",
}


def plan_of(patch: dict[str, Any] | None = None) -> Any:
    return make_plan(PipelineSpec.model_validate(merge_patch(BASE, patch or {})))


def test_minimal_graph() -> None:
    plan = plan_of()
    assert plan.names == ["preflight", "generate", "train", "evaluate"]
    assert plan["train"].inputs == ("generate",)
    assert plan["train"].after == ("preflight",)  # waits for it, without reading it
    assert plan.artifact("train") == f"./out/train-{plan['train'].fingerprint}"


def test_prune_and_quantize_add_their_stages() -> None:
    plan = plan_of(
        {"student": {"model": None, "prune": {"numLayers": 4}}, "quantize": {"scheme": "W4A16"}}
    )
    assert plan.names == [
        "preflight",
        "prune",
        "generate",
        "train",
        "evaluate",
        "quantize",
        "evaluate-quantized",
    ]
    assert "prune" in plan["train"].inputs
    assert plan["evaluate-quantized"].inputs == ("quantize", "generate")
    names = [s.name for s in plan.stages]
    for stage in plan.stages:  # every stage after its inputs
        assert all(names.index(i) < names.index(stage.name) for i in stage.inputs)


@pytest.mark.parametrize(
    ("edit", "rerun"),
    [
        ({"train": {"learningRate": "1e-4"}}, ["train", "evaluate"]),
        ({"train": {"epochs": 3}}, ["train", "evaluate"]),
        ({"evaluate": {"gate": {"minRetention": "0.9"}}}, ["evaluate"]),
        ({"generate": {"maxNewTokens": 64}}, ["generate", "train", "evaluate"]),
        ({"dataset": {"evalFraction": "0.1"}}, ["generate", "train", "evaluate"]),
        ({"teacher": {"model": "hf://org/teacher@v2"}}, ["generate", "train", "evaluate"]),
        ({"student": {"model": "hf://org/other"}}, ["train", "evaluate"]),
        ({"output": "./elsewhere"}, []),  # same content, another place: nothing to recompute
        (
            {"train": {"losses": {"logits": {"source": "online", "topK": None}}}},
            ["train", "evaluate"],
        ),
        (  # the generate stage stores draws instead of the top-k: it runs again
            {"train": {"losses": {"logits": {"sparsity": "sampled", "temperature": "1.0"}}}},
            ["generate", "train", "evaluate"],
        ),
        (  # sparsity written out at its default changes nothing
            {"train": {"losses": {"logits": {"sparsity": "topK"}}}},
            [],
        ),
    ],
)
def test_an_edit_reruns_exactly_what_it_can_change(edit: dict[str, Any], rerun: list[str]) -> None:
    # the preflight re-checks what reads models and data; nothing else depends on it
    changed = changed_stages(plan_of(), plan_of(edit))
    checked = ("dataset", "teacher", "student", "quantize")
    assert changed == (["preflight"] if set(edit) & set(checked) else []) + rerun


def test_the_teacher_matters_to_train_only_when_it_runs_live() -> None:
    offline = {"teacher": {"model": "hf://org/teacher", "trustRemoteCode": True}}
    online = {"train": {"losses": {"logits": {"source": "online"}}}}
    # generate always depends on the teacher; train through generate's fingerprint only...
    assert plan_of(offline)["train"].config["teacher"] is None
    # ...unless it runs the teacher itself (online logits or features)
    assert plan_of(online)["train"].config["teacher"]["model"] == "hf://org/teacher"


def test_adding_a_quantize_stage_keeps_the_others() -> None:
    changed = changed_stages(plan_of(), plan_of({"quantize": {"scheme": "FP8_DYNAMIC"}}))
    assert changed == ["preflight", "quantize", "evaluate-quantized"]


EVERY_STAGE = {
    "student": {"model": None, "prune": {"numLayers": 4}},
    "quantize": {"scheme": "W4A16"},
}
RELEASED_FINGERPRINTS = {
    "prune": "c65dc3cf4d58",
    "generate": "121be86816ec",
    "train": "4f76bc3ddeb3",
    "evaluate": "e68f02bce01b",
    "quantize": "62b5628d5867",  # format 2: the scheme search (re-runs quantize and after it)
    "evaluate-quantized": "8ead27673494",
}
"""The fingerprints a released version planned for EVERY_STAGE. If this test fails, every user's
finished pipeline would re-run after an upgrade: bump the format version of the stage whose
output really changed (stages/__init__.py) and update only what that bump moves."""


def test_an_upgrade_plans_the_same_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    import distillation_runtime

    monkeypatch.setattr(distillation_runtime, "__version__", "99.0.0")
    plan = plan_of(EVERY_STAGE)
    # the preflight came after the release: it is new, and it moved no other fingerprint
    assert {s.name: s.fingerprint for s in plan.stages if s.name != "preflight"} == (
        RELEASED_FINGERPRINTS
    )


def test_a_format_version_bump_reruns_that_stage_and_what_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    from distillation_runtime import stages

    released = plan_of(EVERY_STAGE)
    bumped = [replace(s, format_version=2) if s.name == "train" else s for s in stages.STAGES]
    monkeypatch.setattr(stages, "STAGES", bumped)
    rerun = changed_stages(released, plan_of(EVERY_STAGE))
    assert rerun == ["train", "evaluate", "quantize", "evaluate-quantized"]


def test_distill_plan_shows_which_stages_are_complete(tmp_path: Path) -> None:
    spec = merge_patch(BASE, {"output": str(tmp_path / "out")})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    generate = make_plan(PipelineSpec.model_validate(spec)).artifact("generate")
    Path(generate).mkdir(parents=True)
    (Path(generate) / COMPLETION_MARKER).write_text("")
    distill = Path(sys.executable).parent / "distill"
    out = subprocess.run([str(distill), "plan", str(spec_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert rows["generate"][3] == "complete"
    assert rows["train"][1] == "generate"
    assert " ".join(rows["train"][3:5]) == "to run"
