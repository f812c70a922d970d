"""The Distillation resource model: samples, cluster-only rules, the pipeline view."""

from __future__ import annotations

from typing import Any

import pytest

from distillation_operator.api import Distillation, DistillationSpec, DistillationStatus
from distillation_runtime.spec import CLUSTER_ONLY_FIELDS, PipelineSpec, SpecError, parse_model
from support.corpus import BadCase, load_corpus, merge_patch, names_field

CORPUS = load_corpus()


def test_samples_are_valid(samples: dict[str, dict[str, Any]]) -> None:
    assert set(samples) == {"tiny-cpu", "support-8b-gpu"}
    for manifest in samples.values():
        Distillation.model_validate(manifest)


def test_gpu_sample_reads_as_a_user_wrote_it(samples: dict[str, dict[str, Any]]) -> None:
    spec = Distillation.model_validate(samples["support-8b-gpu"]).spec
    assert spec.teacher.tensor_parallel_size == 8
    assert spec.placement.queue_name == "ml-team"
    assert spec.policy.ttl_seconds_after_finished == 600  # a default
    data = spec.model_dump(mode="json", by_alias=True)
    assert data["quantize"]["scheme"] == "W4A16"
    assert data["placement"]["stages"]["train"]["replicas"] == 8
    assert data["secrets"]["huggingFaceToken"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert data["serve"]["maxReplicas"] == 4


def test_cluster_only_fields_are_exactly_the_operator_additions() -> None:
    added = set(DistillationSpec.model_fields) - set(PipelineSpec.model_fields)
    assert added == CLUSTER_ONLY_FIELDS


def test_pipeline_view_drops_cluster_fields(samples: dict[str, dict[str, Any]]) -> None:
    spec = Distillation.model_validate(samples["tiny-cpu"]).spec
    pipeline = spec.pipeline()
    assert type(pipeline) is PipelineSpec
    assert pipeline.train == spec.train
    assert pipeline.output == spec.output


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_case_is_refused_naming_its_field(case: BadCase) -> None:
    with pytest.raises(SpecError) as caught:
        parse_model(Distillation, case.manifest, prefix="")
    lines = caught.value.problems
    assert any(names_field(line, case.field) for line in lines), (case.why, lines)


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize(
    ("patch", "field", "value", "allowed"),
    [
        ({"placement": {"head": {"cpu": "-1"}}}, "spec.placement.head.cpu", "-1", "non-negative"),
        (
            {"placement": {"image": "ghcr.io/Org/img:1.0"}},
            "spec.placement.image",
            "ghcr.io/Org/img:1.0",
            "lowercase repository path",
        ),
        (
            {"placement": {"nodeSelector": {"zone": "a" * 64}}},
            "spec.placement.nodeSelector.zone",
            "a" * 64,
            "at most 63 characters",
        ),
        (
            {"placement": {"nodeSelector": {"x" * 64: "a"}}},
            "spec.placement.nodeSelector",
            "x" * 64,
            "a name of at most 63",
        ),
        (
            {"placement": {"nodeSelector": {"b" * 254 + "/x": "a"}}},
            "spec.placement.nodeSelector",
            "b" * 254 + "/x",
            "at most 253",
        ),
        (
            {"secrets": {"huggingFaceToken": {"name": "hf", "key": "hf:token"}}},
            "spec.secrets.huggingFaceToken.key",
            "hf:token",
            "letters, digits, '-', '_' or '.'",
        ),
        (
            {"placement": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "y"}]}},
            "spec.placement.tolerations[0]",
            "y",
            "value must be empty when operator is Exists",
        ),
        (
            {
                "serve": {
                    "tolerations": [
                        {
                            "key": "gpu",
                            "effect": "NoSchedule",
                            "value": "y",
                            "tolerationSeconds": 30,
                        }
                    ]
                }
            },
            "spec.serve.tolerations[0]",
            "NoSchedule",
            "tolerationSeconds needs effect NoExecute",
        ),
        (
            {"output": "pvc://Artifacts/tiny"},
            "spec.output",
            "pvc://Artifacts/tiny",
            "PersistentVolumeClaim name",
        ),
        (
            {"dataset": {"prompts": "s3:///prompts.jsonl"}},
            "spec.dataset.prompts",
            "s3:///prompts.jsonl",
            "names no bucket",
        ),
    ],
)
def test_refusal_names_the_field_the_value_and_what_is_allowed(
    samples: dict[str, dict[str, Any]], patch: dict[str, Any], field: str, value: str, allowed: str
) -> None:
    manifest = merge_patch(samples["tiny-cpu"], {"spec": patch})
    with pytest.raises(SpecError) as caught:
        parse_model(Distillation, manifest, prefix="")
    lines = [line for line in caught.value.problems if line.startswith(f"{field}: ")]
    assert any(value in line and allowed in line for line in lines), caught.value.problems


def test_selectors_hold_at_most_64_labels(samples: dict[str, dict[str, Any]]) -> None:
    labels = {f"l{i}": "x" for i in range(65)}
    manifest = merge_patch(samples["tiny-cpu"], {"spec": {"serve": {"nodeSelector": labels}}})
    with pytest.raises(SpecError) as caught:
        parse_model(Distillation, manifest, prefix="")
    assert "spec.serve.nodeSelector: has 65 labels; at most 64 are allowed" in caught.value.problems


def test_status_serialises_camel_case_with_rfc3339_times() -> None:
    status = DistillationStatus.model_validate(
        {
            "observedGeneration": 3,
            "phase": "Running",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "StageRunning",
                    "message": "train is running",
                    "lastTransitionTime": "2026-11-28T14:00:00Z",
                    "observedGeneration": 3,
                }
            ],
            "stages": [{"name": "generate", "state": "Succeeded", "rayJob": "x-generate-1"}],
            "progress": "1/4",
        }
    )
    data = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert data["conditions"][0]["lastTransitionTime"] == "2026-11-28T14:00:00Z"
    assert data["stages"][0] == {
        "name": "generate",
        "state": "Succeeded",
        "rayJob": "x-generate-1",
        "attempts": 0,
    }
