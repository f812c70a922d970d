"""The pipeline spec: teacher, student, data and how to train, quantise and evaluate.

One model, three uses (docs/design.md): the operator's CRD is generated from it, the operator
validates ``spec`` with it, and ``distill run`` / the stages read their configuration from it.
Field names are camelCase in YAML (Kubernetes style) and snake_case in Python; descriptions are
user documentation (they become ``kubectl explain``).

Every cross-field rule is written twice, side by side: as a CEL rule (``x-kubernetes-validations``,
enforced by the API server at ``kubectl apply``) and as a pydantic validator (enforced by
``distill run`` and by the operator). Tests hold the two to the same corpus of bad specs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

import yaml
from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from distillation_runtime.fields import (
    MODEL_URI_PATTERN,
    DecimalRange,
    DecimalString,
    StorageURIRules,
    cel,
)

API_GROUP = "distillation.dev"

Weight = Annotated[DecimalString, DecimalRange(ge="0")]
Ratio01 = Annotated[DecimalString, DecimalRange(ge="0", le="1")]
OpenRatio01 = Annotated[DecimalString, DecimalRange(gt="0", lt="1")]
Temperature = Annotated[DecimalString, DecimalRange(gt="0", le="100")]
SamplingTemperature = Annotated[DecimalString, DecimalRange(ge="0", le="100")]
TopP = Annotated[DecimalString, DecimalRange(gt="0", le="1")]
LearningRate = Annotated[DecimalString, DecimalRange(gt="0", le="1")]
Retention = Annotated[DecimalString, DecimalRange(gt="0", le="2")]

ModelURI = Annotated[str, Field(pattern=MODEL_URI_PATTERN, max_length=1024), StorageURIRules()]
"""hf://org/name[@revision], s3://bucket/path, gs://bucket/path, pvc://claim/path, file:// or a
plain path. A pvc:// claim must be a valid PersistentVolumeClaim name and an s3:// or gs:// URI
must name a valid bucket: refused here and by the CRD's CEL, not when a stage starts."""
StorageURI = ModelURI


TRUST_REMOTE_CODE = "Allow the checkpoint's own Python code to run; only for checkpoints you trust."


class SpecModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields refused, defaults validated."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )


def section(model: type[BaseModel], description: str) -> Any:
    """A sub-object that is always present, with every field at its default when omitted.

    The JSON schema's default is the whole defaulted object (not ``{}``): the API server checks
    a default against the object's CEL rules before filling in nested defaults.
    """
    default = model().model_dump(mode="json", by_alias=True, exclude_none=True)
    return Field(
        default_factory=model, description=description, json_schema_extra={"default": default}
    )


# --------------------------------------------------------------------------------------------
# Models: teacher and student
# --------------------------------------------------------------------------------------------


class DType(StrEnum):
    """Weights' precision when a model is loaded."""

    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class TeacherSpec(SpecModel):
    """The large model whose behaviour the student learns."""

    model: ModelURI = Field(
        description="Where the teacher's weights are: hf://org/name[@revision] (Hugging Face hub; "
        "token from the hub secret), s3://bucket/path, pvc://claim/path (a mounted volume) or a "
        "local path (distill run only)."
    )
    dtype: DType = Field(
        default=DType.AUTO,
        description="Precision to load the weights in; auto uses the checkpoint's own.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs one teacher replica is split over when it generates (vLLM tensor "
        "parallelism). Must divide the number of attention heads.",
    )
    trust_remote_code: bool = Field(default=False, description=TRUST_REMOTE_CODE)


class DepthImportance(StrEnum):
    """How the prune stage scores whole layers."""

    COSINE = "cosine"
    LOSS = "loss"


class BudgetAxes(StrEnum):
    """What a parameter budget may shrink."""

    WIDTH = "width"
    DEPTH = "depth"
    BOTH = "both"


class PruneSpec(SpecModel):
    """Minitron-style pruning of the teacher: the pruned model is the student's starting weights."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.hiddenSize) || has(self.intermediateSize) || "
                    "has(self.numAttentionHeads) || has(self.numLayers) || "
                    "has(self.parameterBudget)",
                    "set at least one target: hiddenSize, intermediateSize, numAttentionHeads, "
                    "numLayers or parameterBudget",
                ),
                cel(
                    "!has(self.parameterBudget) || !(has(self.hiddenSize) || "
                    "has(self.intermediateSize) || has(self.numAttentionHeads) || "
                    "has(self.numLayers))",
                    "parameterBudget replaces the explicit sizes: set one or the other",
                    ".parameterBudget",
                ),
                cel(
                    "!has(self.budgetAxes) || has(self.parameterBudget)",
                    "budgetAxes says how parameterBudget is met: set parameterBudget too",
                    ".budgetAxes",
                ),
            ]
        }
    )

    from_: str = Field(
        default="teacher",
        alias="from",
        pattern="^teacher$",
        description="The model to prune. Only the teacher is supported.",
    )
    hidden_size: int | None = Field(
        default=None, ge=1, description="Target embedding/hidden width (channels kept)."
    )
    intermediate_size: int | None = Field(
        default=None, ge=1, description="Target MLP intermediate width (neurons kept)."
    )
    num_attention_heads: int | None = Field(
        default=None,
        ge=1,
        description="Target number of query heads. With grouped-query attention whole KV groups "
        "are pruned, so this must be a multiple of the heads per group.",
    )
    num_layers: int | None = Field(
        default=None, ge=1, description="Target number of transformer layers (depth pruning)."
    )
    parameter_budget: int | None = Field(
        default=None,
        ge=1_000_000,
        description="Target total parameter count; the stage picks the largest shape at or "
        "under it (see budgetAxes). Use instead of the explicit sizes.",
    )
    budget_axes: BudgetAxes | None = Field(
        default=None,
        description="How parameterBudget is met: width (default; hidden and MLP channels, every "
        "layer kept, which Minitron found retains most), depth (whole layers dropped, widths "
        "kept) or both (layers shrink by the square root of the budget ratio, widths fill the "
        "rest). Only with parameterBudget.",
    )
    depth_importance: DepthImportance = Field(
        default=DepthImportance.COSINE,
        description="How layers are ranked for depth pruning: cosine (1 - cos(input, output) of "
        "each block) or loss (loss increase when the block is dropped; slower).",
    )
    calibration_samples: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Prompts from the dataset used for the importance forward passes.",
    )

    @model_validator(mode="after")
    def _targets(self) -> Self:
        explicit = [
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_layers,
        ]
        if self.parameter_budget is None and all(v is None for v in explicit):
            raise ValueError(
                "set at least one target: hiddenSize, intermediateSize, numAttentionHeads, "
                "numLayers or parameterBudget"
            )
        if self.parameter_budget is not None and any(v is not None for v in explicit):
            raise ValueError("parameterBudget replaces the explicit sizes: set one or the other")
        if self.budget_axes is not None and self.parameter_budget is None:
            raise ValueError(
                f"budgetAxes is {self.budget_axes.value} but parameterBudget is not set: "
                "budgetAxes says how parameterBudget is met; set parameterBudget too"
            )
        return self


class StudentSpec(SpecModel):
    """The small model being trained: an existing checkpoint, or one pruned from the teacher."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.model) != has(self.prune)",
                    "set exactly one of student.model (an existing checkpoint) or "
                    "student.prune (derive the student from the teacher)",
                )
            ]
        }
    )

    model: ModelURI | None = Field(
        default=None,
        description="Where the student's starting weights are (same forms as teacher.model). "
        "Leave empty when student.prune is set.",
    )
    prune: PruneSpec | None = Field(
        default=None,
        description="Derive the student by pruning the teacher. Leave empty when student.model "
        "is set.",
    )
    dtype: DType = Field(default=DType.AUTO, description="Precision to load the weights in.")
    trust_remote_code: bool = Field(default=False, description=TRUST_REMOTE_CODE)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.model is None) == (self.prune is None):
            got = "both" if self.model is not None else "neither"
            raise ValueError(
                "set exactly one of student.model (an existing checkpoint) or student.prune "
                f"(derive the student from the teacher); got {got}"
            )
        return self


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DatasetFormat(StrEnum):
    """File format of the prompts."""

    AUTO = "auto"
    JSONL = "jsonl"
    PARQUET = "parquet"


class DatasetSpec(SpecModel):
    """The prompts of the real workload: what the teacher answers and the student learns from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.promptField) && has(self.messagesField))",
                    "set at most one of promptField (plain text prompts) or messagesField "
                    "(chat messages rendered with the tokenizer's chat template)",
                )
            ]
        }
    )

    prompts: StorageURI = Field(
        description="JSONL or Parquet file (or folder of shards) with one prompt per record: "
        "s3://, gs://, pvc://claim/path or a local path."
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.AUTO,
        description="File format; auto decides by the file extension.",
    )
    prompt_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Record field holding the prompt text. Default: prompt.",
    )
    messages_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Record field holding chat messages ([{role, content}, ...]); they are "
        "rendered with the tokenizer's chat template. Use instead of promptField.",
    )
    reference_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Optional record field with a reference answer; evaluation then also scores "
        "teacher and student against it.",
    )
    eval_fraction: OpenRatio01 = Field(
        default=DecimalString("0.05"),
        description="Share of prompts held out for evaluation, between 0 and 1 (exclusive). The "
        "split hashes each prompt, so a prompt always lands on the same side.",
    )
    max_prompts: int | None = Field(
        default=None,
        ge=1,
        description="Use at most this many prompts (after dropping duplicates). Default: all.",
    )

    @model_validator(mode="after")
    def _one_field(self) -> Self:
        if self.prompt_field is not None and self.messages_field is not None:
            raise ValueError(
                "set at most one of promptField (plain text prompts) or messagesField (chat "
                "messages rendered with the tokenizer's chat template)"
            )
        return self

    @property
    def text_field(self) -> str:
        """The field plain-text prompts are read from."""
        return self.prompt_field or "prompt"


# --------------------------------------------------------------------------------------------
# Generate
# --------------------------------------------------------------------------------------------


class GenerateBackend(StrEnum):
    """Engine the teacher generates with."""

    AUTO = "auto"
    TRANSFORMERS = "transformers"
    VLLM = "vllm"


class GenerateSpec(SpecModel):
    """How the teacher answers the prompts."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.samplesPerPrompt == 1 || double(self.temperature) > 0.0",
                    "samplesPerPrompt above 1 needs temperature above 0 (greedy decoding gives "
                    "identical samples)",
                    ".samplesPerPrompt",
                )
            ]
        }
    )

    backend: GenerateBackend = Field(
        default=GenerateBackend.AUTO,
        description="auto uses vLLM when it is installed and a GPU is present, else transformers.",
    )
    max_new_tokens: int = Field(
        default=512, ge=1, le=131072, description="Longest response, in tokens."
    )
    samples_per_prompt: int = Field(
        default=1, ge=1, le=64, description="Responses generated per prompt."
    )
    temperature: SamplingTemperature = Field(
        default=DecimalString("0"),
        description='Sampling temperature as a decimal string; "0" is greedy decoding.',
    )
    top_p: TopP = Field(
        default=DecimalString("1.0"),
        description="Nucleus sampling: keep the smallest set of tokens whose probability "
        'reaches top_p. "1.0" keeps all.',
    )
    top_logprobs: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Store the teacher's top-k log-probabilities of every generated token, for "
        "offline logit distillation. 0 stores none. With train.losses.logits.sparsity: "
        "sampled, the number of tokens drawn from the teacher's distribution per generated "
        "token instead (the distinct ones are stored with their share of the draws).",
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=16,
        description="Strings that end a response (not included in it).",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Prompts per generation batch.")
    seed: int = Field(default=0, ge=0, description="Random seed for sampling.")

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> Self:
        if self.samples_per_prompt > 1 and self.temperature.decimal == 0:
            raise ValueError(
                f"samplesPerPrompt is {self.samples_per_prompt} but temperature is 0: more than "
                "one sample needs temperature above 0 (greedy decoding gives identical samples)"
            )
        return self


# --------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------


class Divergence(StrEnum):
    """How the student's token distribution is compared with the teacher's."""

    FORWARD_KL = "forwardKL"
    REVERSE_KL = "reverseKL"
    JSD = "jsd"


class LogitSource(StrEnum):
    """Where the teacher's logits come from during training."""

    ONLINE = "online"
    OFFLINE = "offline"


class MissingMass(StrEnum):
    """What offline distillation does with the probability outside the stored top-k."""

    IGNORE = "ignore"
    UNIFORM = "uniform"


class Sparsity(StrEnum):
    """Which of the teacher's tokens offline logit distillation keeps per response token."""

    TOP_K = "topK"
    SAMPLED = "sampled"


class LogitLossSpec(SpecModel):
    """Logit distillation: match the teacher's next-token distribution."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.topK) || self.source == 'offline'",
                    "topK applies only to source: offline (the stored top-k log-probs)",
                    ".topK",
                ),
                cel(
                    "!has(self.beta) || self.divergence == 'jsd'",
                    "beta applies only to divergence: jsd",
                    ".beta",
                ),
                cel(
                    "self.sparsity != 'sampled' || self.source == 'offline'",
                    "sparsity: sampled applies only to source: offline (the draws the generate "
                    "stage stores)",
                    ".sparsity",
                ),
                cel(
                    "self.sparsity != 'sampled' || self.divergence == 'forwardKL'",
                    "sparsity: sampled estimates forward KL only (reverse KL and jsd need the "
                    "teacher's probability of every token the student gives mass to)",
                    ".divergence",
                ),
                cel(
                    "self.sparsity != 'sampled' || double(self.temperature) == 1.0",
                    'sparsity: sampled needs temperature "1.0" (the draws are from the '
                    "teacher's distribution at temperature 1)",
                    ".temperature",
                ),
                cel(
                    "self.sparsity != 'sampled' || !has(self.topK)",
                    "topK cannot cut sampled draws (the first k of them are not a fair sample); "
                    "set generate.topLogprobs to the number of draws instead",
                    ".topK",
                ),
                cel(
                    "self.sparsity != 'sampled' || self.missingMass == 'ignore'",
                    "missingMass applies to topK only: sampled draws already describe the "
                    "whole distribution",
                    ".missingMass",
                ),
            ]
        }
    )

    weight: Weight = Field(
        default=DecimalString("1.0"), description="Weight of this loss in the sum."
    )
    divergence: Divergence = Field(
        default=Divergence.FORWARD_KL,
        description="forwardKL (mode covering), reverseKL (mode seeking) or jsd (generalized "
        "Jensen-Shannon with beta).",
    )
    beta: Ratio01 | None = Field(
        default=None,
        description='Interpolation of jsd between forward KL ("0") and reverse KL ("1"). '
        'Default "0.5". Only with divergence: jsd.',
    )
    temperature: Temperature = Field(
        default=DecimalString("1.0"),
        description="Softmax temperature for both models; the loss is scaled by T squared.",
    )
    source: LogitSource = Field(
        default=LogitSource.OFFLINE,
        description="offline: from the teacher's top-k log-probs stored by the generate stage "
        "(needs generate.topLogprobs). online: run the teacher during training (full "
        "distribution, more GPU memory).",
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Use the first k of the stored log-probs (at most generate.topLogprobs). "
        "Default: all stored. Only with source: offline.",
    )
    missing_mass: MissingMass = Field(
        default=MissingMass.IGNORE,
        description="Offline only: ignore the probability outside the top-k (renormalise), or "
        "spread it uniformly over the rest of the vocabulary.",
    )
    sparsity: Sparsity = Field(
        default=Sparsity.TOP_K,
        description="Offline only: which of the teacher's tokens the generate stage keeps per "
        "response token, generate.topLogprobs of them. topK: its most likely tokens (the tail "
        "is lost, so the estimate is biased). sampled: draws from its distribution (RS-KD, "
        "Anshumann et al. 2025), the distinct tokens kept with their share of the draws: an "
        "unbiased estimate of forward KL against the student's full distribution. sampled "
        'needs divergence forwardKL, temperature "1.0", no topK, and generate.backend '
        "transformers or auto (vLLM returns only the most likely tokens).",
    )
    chunk_size: int = Field(
        default=512,
        ge=16,
        le=65536,
        description="Tokens per chunk when computing logits and the loss, so the full "
        "[batch, sequence, vocabulary] tensor is never held in memory.",
    )

    @model_validator(mode="after")
    def _sampled_estimates_forward_kl(self) -> Self:
        if self.sparsity is not Sparsity.SAMPLED:
            return self
        wrong = [
            (
                self.source is not LogitSource.OFFLINE,
                f"source is {self.source.value}",
                "source: offline (the draws the generate stage stores)",
            ),
            (
                self.divergence is not Divergence.FORWARD_KL,
                f"divergence is {self.divergence.value}",
                "divergence forwardKL only (reverse KL and jsd need the teacher's probability "
                "of every token the student gives mass to)",
            ),
            (
                self.temperature.decimal != 1,
                f"temperature is {self.temperature}",
                'temperature "1.0" (the draws are from the teacher at temperature 1)',
            ),
            (
                self.top_k is not None,
                f"topK is {self.top_k}",
                "no topK (the first k draws are not a fair sample; set generate.topLogprobs "
                "to the number of draws)",
            ),
            (
                self.missing_mass is not MissingMass.IGNORE,
                f"missingMass is {self.missing_mass.value}",
                "missingMass ignore (sampled draws already describe the whole distribution)",
            ),
        ]
        for bad, found, allowed in wrong:
            if bad:
                raise ValueError(f"sparsity is sampled but {found}: sampled needs {allowed}")
        return self

    @model_validator(mode="after")
    def _options_match_mode(self) -> Self:
        if self.top_k is not None and self.source is not LogitSource.OFFLINE:
            raise ValueError(
                f"topK is {self.top_k} but source is {self.source.value}: topK applies only to "
                "source: offline (the stored top-k log-probs)"
            )
        if self.beta is not None and self.divergence is not Divergence.JSD:
            raise ValueError(
                f"beta is {self.beta} but divergence is {self.divergence.value}: beta applies "
                "only to divergence: jsd"
            )
        return self

    @property
    def jsd_beta(self) -> float:
        """Beta of the generalized JSD (0.5 unless set)."""
        return float(self.beta) if self.beta is not None else 0.5


class FeatureDistance(StrEnum):
    """Distance between projected student and teacher hidden states."""

    MSE = "mse"
    COSINE = "cosine"


class LayerPair(SpecModel):
    """One student layer trained to match one teacher layer."""

    student: int = Field(ge=0, description="Student layer index (0 = first transformer block).")
    teacher: int = Field(ge=0, description="Teacher layer index (0 = first transformer block).")


class FeatureLossSpec(SpecModel):
    """Feature distillation: student hidden states, through a learned projection, match the
    teacher's. Needs the teacher live during training."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.layerMap.all(p, self.layerMap.exists_one(q, q.student == p.student))",
                    "each student layer may appear only once in layerMap",
                    ".layerMap",
                )
            ]
        }
    )

    weight: Weight = Field(
        default=DecimalString("1.0"), description="Weight of this loss in the sum."
    )
    distance: FeatureDistance = Field(
        default=FeatureDistance.MSE,
        description="mse or cosine (1 - cosine similarity), averaged over tokens.",
    )
    layer_map: list[LayerPair] = Field(
        min_length=1,
        max_length=128,
        description="Which student layer learns which teacher layer.",
    )

    @field_validator("layer_map")
    @classmethod
    def _unique_students(cls, pairs: list[LayerPair]) -> list[LayerPair]:
        seen = [p.student for p in pairs]
        repeated = sorted({s for s in seen if seen.count(s) > 1})
        if repeated:
            raise ValueError(
                f"each student layer may appear only once in layerMap; repeated: {repeated}"
            )
        return pairs


class LossesSpec(SpecModel):
    """Which distillation losses are summed, and their weights."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "double(self.response) > 0.0 || has(self.logits) || has(self.features)",
                    "enable at least one loss: a response weight above 0, logits or features",
                )
            ]
        }
    )

    response: Weight = Field(
        default=DecimalString("1.0"),
        description="Weight of response distillation: cross-entropy on the teacher's generated "
        'tokens. "0" turns it off.',
    )
    logits: LogitLossSpec | None = Field(
        default=None, description="Logit distillation. Off when absent."
    )
    features: FeatureLossSpec | None = Field(
        default=None, description="Feature (hidden state) distillation. Off when absent."
    )

    @model_validator(mode="after")
    def _something_to_learn(self) -> Self:
        if self.response.decimal == 0 and self.logits is None and self.features is None:
            raise ValueError(
                "response weight is 0 and neither logits nor features is set: enable at least "
                "one loss"
            )
        return self


class LRScheduler(StrEnum):
    """Learning-rate schedule after warm-up."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Precision(StrEnum):
    """Numeric precision of training."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class TrainStrategy(StrEnum):
    """How several Ray Train workers share the student."""

    AUTO = "auto"
    DDP = "ddp"
    FSDP = "fsdp"


class TrainSpec(SpecModel):
    """How the student is trained (Ray Train, one to many workers)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.strategy != 'fsdp' || (!has(self.losses.features) && "
                    "(!has(self.losses.logits) || self.losses.logits.source != 'online'))",
                    "strategy fsdp cannot run the teacher live in every worker: use logits "
                    "source: offline (the generate stage's stored top-k) and no features, or "
                    "strategy ddp",
                    ".strategy",
                )
            ]
        }
    )

    losses: LossesSpec = section(LossesSpec, "Distillation losses and their weights.")
    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int = Field(
        default=8, ge=1, le=4096, description="Sequences per worker per optimizer step."
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=1_048_576,
        description="Prompt plus response, in tokens; longer sequences are truncated.",
    )
    learning_rate: LearningRate = Field(
        default=DecimalString("2e-5"), description='Peak learning rate, e.g. "2e-5".'
    )
    warmup_ratio: Ratio01 = Field(
        default=DecimalString("0.03"),
        description="Share of steps spent warming the learning rate up from 0.",
    )
    weight_decay: Weight = Field(default=DecimalString("0.0"), description="AdamW weight decay.")
    scheduler: LRScheduler = Field(
        default=LRScheduler.COSINE, description="Learning-rate schedule after warm-up."
    )
    max_grad_norm: Weight = Field(
        default=DecimalString("1.0"),
        description='Gradient clipping norm; "0" turns clipping off.',
    )
    precision: Precision = Field(
        default=Precision.AUTO,
        description="auto picks bf16 on GPUs that support it, else fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Trade compute for memory: recompute each decoder layer's activations in "
        "the backward pass instead of keeping them.",
    )
    workers: int = Field(
        default=1, ge=1, le=1024, description="Ray Train workers (data-parallel replicas)."
    )
    strategy: TrainStrategy = Field(
        default=TrainStrategy.AUTO,
        description="How the workers share the student. ddp: each worker holds the whole "
        "student, its gradients and AdamW state (about 16 bytes per parameter) and gradients "
        "are averaged. fsdp: PyTorch FSDP2 shards parameters, gradients and optimizer state "
        "over the workers (about 16/workers bytes per parameter each), with bf16 compute and "
        "fp32 gradient reduction on GPUs; checkpoints are sharded (torch.distributed.checkpoint) "
        "and the final model is a normal checkpoint. fsdp needs offline logits and no features "
        "(the teacher is not sharded). auto: ddp with one worker or on CPU workers; on GPU "
        "workers fsdp when 16 bytes per student parameter exceed half of the smallest "
        "worker's GPU memory (the other half for activations and the teacher). The choice is "
        "the train stage's strategy metric.",
    )
    seed: int = Field(default=0, ge=0, description="Random seed for shuffling and init.")

    @model_validator(mode="after")
    def _fsdp_without_live_teacher(self) -> Self:
        logits, features = self.losses.logits, self.losses.features
        online = logits is not None and logits.source is LogitSource.ONLINE
        if self.strategy is TrainStrategy.FSDP and (online or features is not None):
            live = "logits source: online" if online else "features"
            raise ValueError(
                f"strategy fsdp cannot run the teacher live in every worker ({live} needs it): "
                "use logits source: offline (the generate stage's stored top-k) and no "
                "features, or strategy ddp"
            )
        return self


# --------------------------------------------------------------------------------------------
# Quantize and evaluate
# --------------------------------------------------------------------------------------------


class QuantScheme(StrEnum):
    """llm-compressor schemes saved in compressed-tensors format (loaded natively by vLLM)."""

    FP8_DYNAMIC = "FP8_DYNAMIC"
    W4A16 = "W4A16"
    W8A8 = "W8A8"


class ActivationOrder(StrEnum):
    """The order GPTQ quantises a weight's input columns in (``actorder`` in llm-compressor)."""

    STATIC = "static"
    """Largest activations first, scales kept in column order: no cost when serving."""
    OFF = "off"
    """Column order."""


class W4A16Algorithm(StrEnum):
    """How W4A16 rounds its int4 weights."""

    GPTQ = "GPTQ"
    AWQ = "AWQ"


DampeningFraction = Annotated[DecimalString, DecimalRange(gt="0", lt="1")]


class GPTQSpec(SpecModel):
    """GPTQ's settings (W4A16 with w4a16Algorithm GPTQ, and W8A8)."""

    act_order: ActivationOrder = Field(
        default=ActivationOrder.STATIC,
        description="Order the input columns of each weight are quantised in: static (largest "
        "activations first, which rounds the most important columns while the most error can "
        "still be corrected; no cost when serving; llm-compressor's default) or off (column "
        "order).",
    )
    dampening_frac: DampeningFraction = Field(
        default=DecimalString("0.01"),
        description="Dampening added to the Hessian's diagonal, as a fraction of its mean, "
        'between 0 and 1 (exclusive), e.g. "0.01": higher is more stable on few or repetitive '
        "calibration samples, lower follows them more closely.",
    )


QUANTIZE_SCHEMES_MAX = len(QuantScheme)


class QuantizeSpec(SpecModel):
    """Quantise the trained student for serving, trying schemes in order until one keeps enough
    of the unquantised student's quality; evaluation runs again on the result."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.scheme) != has(self.schemes)",
                    "set exactly one of quantize.scheme (one scheme) or quantize.schemes (schemes "
                    "tried in order)",
                ),
                cel(
                    "!has(self.schemes) || self.schemes.all(s, self.schemes.exists_one(t, t == s))",
                    "each scheme may appear only once in quantize.schemes",
                    ".schemes",
                ),
            ]
        }
    )

    one_scheme: QuantScheme | None = Field(
        default=None,
        alias="scheme",
        description="One scheme: the same as schemes with one entry. FP8_DYNAMIC (no calibration; "
        "GPUs with compute capability 8.9+), W4A16 (int4 weights; 8.0+) or W8A8 (SmoothQuant + "
        "GPTQ int8; 7.5+). Set scheme or schemes, not both.",
    )
    schemes: list[QuantScheme] | None = Field(
        default=None,
        min_length=1,
        max_length=QUANTIZE_SCHEMES_MAX,
        description="Schemes to try in order, most compressed first (e.g. [W4A16, W8A8, "
        "FP8_DYNAMIC]): each is quantised and scored on the held-out prompts, and the first that "
        "keeps minRetention of the unquantised student's quality is served; when none does, the "
        "unquantised student is (status.metrics.scheme is none). Each attempt is stored under "
        "<output>/quantize-attempts/ and reused by later runs. Set scheme or schemes, not both.",
    )
    min_retention: Retention = Field(
        default=DecimalString("0.97"),
        description="Quality a scheme must keep, relative to the unquantised student, on the "
        'held-out prompts and the gate\'s metric (evaluate.gate.metric): "0.97" = 97%. For '
        "perplexity, unquantised perplexity divided by quantised.",
    )
    calibration_samples: int = Field(
        default=512,
        ge=1,
        le=100_000,
        description="Prompt/response pairs from the generate stage (the workload's prompts and "
        "the teacher's answers) used to calibrate W4A16 and W8A8, spread over the records.",
    )
    calibration_max_seq_length: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Longest calibration sequence (prompt plus answer), in tokens. Default: "
        "train.maxSeqLength, the length the student was trained and is served at.",
    )
    w4a16_algorithm: W4A16Algorithm = Field(
        default=W4A16Algorithm.GPTQ,
        alias="w4a16Algorithm",
        description="How W4A16 rounds its weights: GPTQ (symmetric int4, error-correcting "
        "rounding; settings in gptq) or AWQ (activation-aware scaling, then asymmetric int4 with "
        "zero points).",
    )
    gptq: GPTQSpec = section(GPTQSpec, "GPTQ's settings (W4A16 with GPTQ, and W8A8).")
    ignore: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="Modules kept in full precision (names or re:regular expressions, as "
        "llm-compressor takes them). lm_head is always kept in full precision.",
    )

    @field_validator("schemes")
    @classmethod
    def _unique_schemes(cls, schemes: list[QuantScheme] | None) -> list[QuantScheme] | None:
        if schemes is not None:
            repeated = sorted({s.value for s in schemes if schemes.count(s) > 1})
            if repeated:
                raise ValueError(
                    f"each scheme may appear only once in quantize.schemes; repeated: {repeated}"
                )
        return schemes

    @model_validator(mode="after")
    def _one_of_scheme_or_schemes(self) -> Self:
        if (self.one_scheme is None) == (self.schemes is None):
            got = "both" if self.one_scheme is not None else "neither"
            allowed = ", ".join(s.value for s in QuantScheme)
            raise ValueError(
                "set exactly one of quantize.scheme (one scheme) or quantize.schemes (schemes "
                f"tried in order, most compressed first); got {got}. Schemes: {allowed}"
            )
        return self

    @property
    def candidates(self) -> tuple[QuantScheme, ...]:
        """The schemes to try, in order (``scheme`` is the one-element list)."""
        return (self.one_scheme,) if self.one_scheme is not None else tuple(self.schemes or ())

    @property
    def scheme(self) -> QuantScheme:
        """The first scheme tried (the only one with the ``scheme`` shorthand)."""
        return self.candidates[0]


class Metric(StrEnum):
    """Quality metrics computed on the held-out prompts."""

    TOKEN_F1 = "tokenF1"
    ROUGE_L = "rougeL"
    EXACT_MATCH = "exactMatch"
    PERPLEXITY = "perplexity"


class GateSpec(SpecModel):
    """The quality bar the student must pass before it is served."""

    metric: Metric = Field(
        default=Metric.TOKEN_F1,
        description="Metric the gate compares; must be one of evaluate.metrics.",
    )
    min_retention: Retention = Field(
        default=DecimalString("0.95"),
        description="Student score divided by the teacher's score on the held-out prompts must "
        'reach this (for perplexity, teacher divided by student). "0.95" = 95% retained.',
    )


class AnswerChecks(SpecModel):
    """Task checks on every answer, reported for teacher and student (share of answers that
    pass). They need no reference answer."""

    pattern: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="A regular expression (Python syntax) the whole answer must match, e.g. "
        '"^[0-9]+$" for a number.',
    )
    valid_json: bool = Field(default=False, description="The answer must parse as JSON.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return pattern


def _default_metrics() -> list[Metric]:
    return [Metric.TOKEN_F1, Metric.ROUGE_L]


class EvaluateSpec(SpecModel):
    """Teacher and student answer the held-out prompts; the gate decides if the student ships."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.gate.metric in self.metrics",
                    "gate.metric must be one of evaluate.metrics",
                    ".gate.metric",
                )
            ]
        }
    )

    metrics: list[Metric] = Field(
        default_factory=_default_metrics,
        min_length=1,
        max_length=8,
        description="Metrics computed against the teacher's answers (and the reference answers "
        "when dataset.referenceField is set).",
    )
    gate: GateSpec = section(GateSpec, "The quality gate.")
    max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate on at most this many held-out prompts."
    )
    checks: AnswerChecks | None = Field(
        default=None, description="Task checks on each answer (format, JSON); reported only."
    )

    @model_validator(mode="after")
    def _gate_metric_is_computed(self) -> Self:
        if self.gate.metric not in self.metrics:
            computed = ", ".join(m.value for m in self.metrics)
            raise ValueError(
                f"gate.metric is {self.gate.metric.value} but evaluate.metrics is [{computed}]: "
                "the gate metric must be one of evaluate.metrics"
            )
        return self


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------

PIPELINE_RULES: list[JsonValue] = [
    cel(
        "!has(self.train.losses.logits) || self.train.losses.logits.source != 'offline' || "
        "self.generate.topLogprobs > 0",
        "offline logit distillation needs the teacher's log-probs: set generate.topLogprobs "
        "above 0, or use train.losses.logits.source: online",
        ".generate.topLogprobs",
    ),
    cel(
        "!has(self.train.losses.logits) || !has(self.train.losses.logits.topK) || "
        "self.train.losses.logits.topK <= self.generate.topLogprobs",
        "train.losses.logits.topK cannot exceed generate.topLogprobs (the log-probs stored)",
        ".train.losses.logits.topK",
    ),
    cel(
        "!has(self.train.losses.logits) || self.train.losses.logits.sparsity != 'sampled' || "
        "self.generate.backend != 'vllm'",
        "train.losses.logits.sparsity: sampled needs generate.backend transformers or auto "
        "(vLLM returns only the most likely tokens' log-probs, not the distribution to draw "
        "from)",
        ".generate.backend",
    ),
]


class PipelineSpec(SpecModel):
    """A whole distillation: teacher, student, data, stages and where artifacts go."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": PIPELINE_RULES})

    teacher: TeacherSpec = Field(description="The large model to distill from.")
    student: StudentSpec = Field(description="The small model to train, or how to derive it.")
    dataset: DatasetSpec = Field(description="The prompts of your workload.")
    generate: GenerateSpec = section(GenerateSpec, "How the teacher answers the prompts.")
    train: TrainSpec = section(TrainSpec, "How the student is trained.")
    quantize: QuantizeSpec | None = Field(
        default=None,
        description="Quantise the trained student for serving. No quantisation when absent.",
    )
    evaluate: EvaluateSpec = section(EvaluateSpec, "Evaluation and the quality gate.")
    output: StorageURI = Field(
        description="Where artifacts go: s3://bucket/prefix, pvc://claim/path or a local folder. "
        "Each stage writes <output>/<stage>-<fingerprint>/."
    )

    @model_validator(mode="after")
    def _offline_logits_have_logprobs(self) -> Self:
        logits = self.train.losses.logits
        if logits is None or logits.source is not LogitSource.OFFLINE:
            return self
        stored = self.generate.top_logprobs
        if stored == 0:
            raise ValueError(
                "train.losses.logits.source is offline but generate.topLogprobs is 0: offline "
                "logit distillation needs the teacher's log-probs; set generate.topLogprobs "
                "above 0, or use source: online"
            )
        if logits.top_k is not None and logits.top_k > stored:
            raise ValueError(
                f"train.losses.logits.topK is {logits.top_k} but generate.topLogprobs is "
                f"{stored}: topK cannot exceed the log-probs stored"
            )
        if logits.sparsity is Sparsity.SAMPLED and self.generate.backend is GenerateBackend.VLLM:
            raise ValueError(
                "train.losses.logits.sparsity is sampled but generate.backend is vllm: vLLM "
                "returns only the most likely tokens' log-probs, not the distribution to draw "
                "from; use generate.backend transformers or auto"
            )
        return self

    @property
    def sampled_teacher_signal(self) -> bool:
        """The generate stage draws the teacher's tokens (RS-KD) instead of keeping its top-k."""
        logits = self.train.losses.logits
        return (
            logits is not None
            and logits.source is LogitSource.OFFLINE
            and logits.sparsity is Sparsity.SAMPLED
        )


# --------------------------------------------------------------------------------------------
# Loading and errors
# --------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A spec that cannot run; ``problems`` lists one line per offending field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  - {p}" for p in problems))


def field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    """``spec`` + ``("train", "layerMap", 0)`` -> ``spec.train.layerMap[0]`` (Kubernetes style)."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


Locator = Callable[[tuple[int | str, ...]], int | None]
"""Maps an error's location (field path) to a line of the source file, when known."""


def describe_errors(
    err: ValidationError, prefix: str = "spec", locate: Locator | None = None
) -> list[str]:
    """One readable line per pydantic error: the field path (and the file's line when known),
    what was wrong, the value given."""
    lines = []
    for item in err.errors(include_url=False):
        path = field_path(prefix, item["loc"])
        line = locate(tuple(item["loc"])) if locate else None
        if line is not None:
            path += f" (line {line})"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        elif item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown field (check the spelling; fields are camelCase)")
        elif item["type"] in {"value_error", "assertion_error"}:
            lines.append(f"{path}: {message}")
        else:
            lines.append(f"{path}: {message} (got {item['input']!r})")
    return lines


M = TypeVar("M", bound=BaseModel)


def parse_model(
    model: type[M], data: Any, prefix: str = "spec", locate: Locator | None = None
) -> M:
    """Validate ``data`` as ``model``; raise ``SpecError`` naming every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe_errors(err, prefix, locate)) from None


def yaml_locator(text: str, base: tuple[str, ...] = ()) -> Locator:
    """Find the line of a field path in YAML text (the deepest existing node on the path)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None

    def locate(loc: tuple[int | str, ...]) -> int | None:
        node = root
        line = None
        for part in (*base, *loc):
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                node = node.value[part] if part < len(node.value) else None
            else:
                node = None
            if node is None:
                break
            line = node.start_mark.line + 1
        return line

    return locate


CLUSTER_ONLY_FIELDS = frozenset({"placement", "serve", "policy", "secrets"})
"""Distillation spec fields that only the operator reads; ``distill run`` ignores them."""


def load_pipeline_spec(text: str) -> PipelineSpec:
    """Parse a pipeline spec from YAML: a bare spec, or a whole Distillation manifest (its
    cluster-only fields are ignored, so the same file runs locally and in the cluster)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError([f"spec: not valid YAML: {err}"]) from None
    base: tuple[str, ...] = ()
    if isinstance(data, dict) and "spec" in data and "kind" in data:
        data, base = data["spec"], ("spec",)
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping, got {type(data).__name__}"])
    pipeline = {k: v for k, v in data.items() if k not in CLUSTER_ONLY_FIELDS}
    return parse_model(PipelineSpec, pipeline, locate=yaml_locator(text, base))


def dump_spec(spec: BaseModel) -> dict[str, Any]:
    """The spec as YAML-ready data: camelCase keys, decimals as strings, unset fields omitted."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
