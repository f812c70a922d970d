"""The pipeline spec: defaults, messages that name the field, YAML round trips."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from distillation_runtime.spec import (
    Divergence,
    LogitSource,
    Metric,
    PipelineSpec,
    SpecError,
    dump_spec,
    load_pipeline_spec,
    parse_model,
)

MINIMAL = textwrap.dedent(
    """\
    teacher: {model: hf://org/teacher}
    student: {model: hf://org/student}
    dataset: {prompts: ./prompts.jsonl}
    output: ./out
    """
)


def minimal(**changes: object) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load(MINIMAL)
    data.update(changes)
    return data


def problems(data: object) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_model(PipelineSpec, data)
    return caught.value.problems


def test_minimal_spec_gets_documented_defaults() -> None:
    spec = load_pipeline_spec(MINIMAL)
    assert spec.generate.max_new_tokens == 512
    assert spec.generate.temperature == "0"
    assert spec.dataset.eval_fraction == "0.05"
    assert spec.dataset.text_field == "prompt"
    assert spec.train.losses.response == "1.0"
    assert spec.train.losses.logits is None
    assert float(spec.train.learning_rate) == pytest.approx(2e-5)
    assert spec.evaluate.metrics == [Metric.TOKEN_F1, Metric.ROUGE_L]
    assert spec.evaluate.gate.metric is Metric.TOKEN_F1
    assert float(spec.evaluate.gate.min_retention) == pytest.approx(0.95)
    assert spec.quantize is None


def test_logit_loss_defaults_and_jsd_beta() -> None:
    spec = parse_model(
        PipelineSpec,
        minimal(
            generate={"topLogprobs": 20},
            train={"losses": {"logits": {"divergence": "jsd"}}},
        ),
    )
    logits = spec.train.losses.logits
    assert logits is not None
    assert logits.divergence is Divergence.JSD
    assert logits.source is LogitSource.OFFLINE
    assert logits.jsd_beta == 0.5
    assert float(logits.temperature) == 1.0


def test_local_paths_are_fine_for_distill_run() -> None:
    spec = load_pipeline_spec(MINIMAL)
    assert spec.dataset.prompts == "./prompts.jsonl"
    assert spec.output == "./out"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"train": {"epochs": 0}}, "spec.train.epochs", "greater than or equal to 1"),
        ({"train": {"learningRate": 0.001}}, "spec.train.learningRate", "quoted decimal string"),
        ({"train": {"learningRate": "fast"}}, "spec.train.learningRate", "non-negative decimal"),
        (
            {"dataset": {"prompts": "p.jsonl", "evalFraction": "1"}},
            "spec.dataset.evalFraction",
            "less than 1",
        ),
        ({"generate": {"temperature": "-1"}}, "spec.generate.temperature", "non-negative decimal"),
        ({"generate": {"samplesPerPrompt": 3}}, "spec.generate", "samplesPerPrompt is 3"),
        (
            {"generate": {"topLogprobs": 101}},
            "spec.generate.topLogprobs",
            "less than or equal to 100",
        ),
        (
            {"student": {"model": "hf://a/b", "prune": {"numLayers": 4}}},
            "spec.student",
            "exactly one of",
        ),
        ({"student": {}}, "spec.student", "got neither"),
        ({"student": {"prune": {}}}, "spec.student.prune", "at least one target"),
        (
            {"student": {"prune": {"numLayers": 4, "budgetAxes": "depth"}}},
            "spec.student.prune",
            "budgetAxes is depth but parameterBudget is not set",
        ),
        (
            {"student": {"prune": {"parameterBudget": 10**9, "budgetAxes": "heads"}}},
            "spec.student.prune.budgetAxes",
            "'width', 'depth' or 'both'",
        ),
        ({"train": {"losses": {"response": "0"}}}, "spec.train.losses", "enable at least one loss"),
        ({"train": {"losses": {"logits": {}}}}, "spec", "generate.topLogprobs is 0"),
        (
            {"train": {"losses": {"logits": {"source": "online", "topK": 4}}}},
            "spec.train.losses.logits",
            "topK is 4 but source is online",
        ),
        (
            {"train": {"losses": {"logits": {"divergence": "kl"}}}},
            "spec.train.losses.logits.divergence",
            "'forwardKL', 'reverseKL' or 'jsd'",
        ),
        (
            {
                "train": {
                    "losses": {
                        "features": {
                            "layerMap": [{"student": 0, "teacher": 1}, {"student": 0, "teacher": 2}]
                        }
                    }
                }
            },
            "spec.train.losses.features.layerMap",
            "repeated: [0]",
        ),
        ({"evaluate": {"metrics": ["rougeL"]}}, "spec.evaluate", "gate.metric is tokenF1"),
        (
            {"quantize": {"scheme": "int4"}},
            "spec.quantize.scheme",
            "'FP8_DYNAMIC', 'W4A16' or 'W8A8'",
        ),
        (
            {"teacher": {"model": "hf://org/teacher", "tensorParallelSize": "eight"}},
            "spec.teacher.tensorParallelSize",
            "valid integer",
        ),
        ({"tracher": {}}, "spec.tracher", "unknown field"),
        ({"output": "s3:///out"}, "spec.output", "'s3:///out' names no bucket"),
        (
            {"dataset": {"prompts": "gs://Bad_Bucket/p.jsonl"}},
            "spec.dataset.prompts",
            "the bucket 'Bad_Bucket', which is not a valid name",
        ),
        (
            {"teacher": {"model": "pvc://Models/teacher"}},
            "spec.teacher.model",
            "the claim 'Models', which is not a valid name",
        ),
        ({"output": "pvc:///out"}, "spec.output", "'pvc:///out' names no claim"),
        (
            {"output": "pvc://" + "a" * 254 + "/out"},
            "spec.output",
            "(254 characters), which is not a valid name",
        ),
    ],
)
def test_invalid_spec_is_refused_naming_the_field(
    change: dict[str, object], field: str, words: str
) -> None:
    lines = problems(minimal(**change))
    assert any(line.startswith(f"{field}: ") and words in line for line in lines), lines


@pytest.mark.parametrize(
    "uri",
    [
        "s3://b/prompts.jsonl",
        "s3://bucket",
        "gs://my.bucket_1/data/",
        "pvc://data",
        "pvc://data.v2/prompts/part-0.jsonl",
        "pvc://" + "c" * 253 + "/p.jsonl",
        "hf://org/prompts",
        "./prompts.jsonl",
        "file:///data/prompts.jsonl",
    ],
)
def test_well_formed_uris_are_accepted(uri: str) -> None:
    spec = parse_model(PipelineSpec, minimal(dataset={"prompts": uri}))
    assert spec.dataset.prompts == uri


def test_missing_required_fields_are_each_named() -> None:
    lines = problems({"teacher": {"model": "hf://a/b"}})
    assert "spec.student: required field is missing" in lines
    assert "spec.dataset: required field is missing" in lines
    assert "spec.output: required field is missing" in lines


def test_error_shows_the_value_given() -> None:
    lines = problems(minimal(generate={"maxNewTokens": -5}))
    assert lines == [
        "spec.generate.maxNewTokens: Input should be greater than or equal to 1 (got -5)"
    ]


FULL = textwrap.dedent(
    """\
    teacher:
      model: hf://org/teacher@v2
      dtype: bfloat16
      tensorParallelSize: 2
      trustRemoteCode: false
    student:
      prune:
        from: teacher
        numLayers: 12
        depthImportance: cosine
        calibrationSamples: 256
      dtype: auto
      trustRemoteCode: false
    dataset:
      prompts: s3://bucket/prompts.parquet
      format: parquet
      messagesField: messages
      referenceField: answer
      evalFraction: '0.1'
      maxPrompts: 1000
    generate:
      backend: auto
      maxNewTokens: 256
      samplesPerPrompt: 2
      temperature: '0.7'
      topP: '0.9'
      topLogprobs: 20
      stop:
      - </s>
      batchSize: 16
      seed: 7
    train:
      losses:
        response: '1.0'
        logits:
          weight: '0.5'
          divergence: jsd
          beta: '0.25'
          temperature: '2.0'
          source: offline
          topK: 10
          missingMass: uniform
          sparsity: topK
          chunkSize: 512
        features:
          weight: '0.1'
          distance: cosine
          layerMap:
          - student: 0
            teacher: 1
          - student: 5
            teacher: 11
      epochs: 3
      batchSize: 4
      gradientAccumulation: 2
      maxSeqLength: 1024
      learningRate: 2e-5
      warmupRatio: '0.03'
      weightDecay: '0.01'
      scheduler: linear
      maxGradNorm: '1.0'
      precision: bf16
      gradientCheckpointing: true
      workers: 4
      strategy: ddp
      seed: 1
    quantize:
      schemes:
      - W4A16
      - W8A8
      minRetention: '0.95'
      calibrationSamples: 128
      calibrationMaxSeqLength: 1024
      w4a16Algorithm: GPTQ
      gptq:
        actOrder: 'off'
        dampeningFrac: '0.05'
      ignore:
      - lm_head
    evaluate:
      metrics:
      - tokenF1
      - perplexity
      gate:
        metric: perplexity
        minRetention: '0.9'
      maxSamples: 200
    output: s3://bucket/out
    """
)


def test_full_spec_round_trips_yaml_model_yaml_byte_for_byte() -> None:
    spec = load_pipeline_spec(FULL)
    text = yaml.safe_dump(dump_spec(spec), sort_keys=False)
    assert text == FULL
    assert load_pipeline_spec(text) == spec


def test_minimal_spec_round_trips_to_an_equal_model() -> None:
    spec = load_pipeline_spec(MINIMAL)
    again = load_pipeline_spec(yaml.safe_dump(dump_spec(spec)))
    assert again == spec
    assert dump_spec(again)["train"]["learningRate"] == "2e-5"


def test_whole_manifest_loads_and_ignores_cluster_only_fields(
    samples: dict[str, dict[str, object]],
) -> None:
    spec = load_pipeline_spec(yaml.safe_dump(samples["tiny-cpu"]))
    assert spec.teacher.model == "pvc://models/tiny-teacher"
    assert "placement" not in dump_spec(spec)


def test_non_mapping_spec_is_refused() -> None:
    with pytest.raises(SpecError, match="expected a mapping, got list"):
        load_pipeline_spec("- a\n- b\n")
