"""The ``Distillation`` custom resource (``distillation.dev/v1alpha1``, short name ``dist``).

``spec`` is the runtime's pipeline spec plus what only a cluster needs: where the stages run
(``placement``), which secrets they get (``secrets``), how the result is served (``serve``) and
how failures and pauses are handled (``policy``). ``status`` is observed state and an API of its
own: GitOps tools read ``observedGeneration`` and ``conditions`` to decide health.

``crdgen`` turns these models into the CRD; the handlers validate ``spec`` with them.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, create_model, model_validator

from distillation_runtime.fields import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DNS_SUBDOMAIN_BODY,
    Matches,
    cel,
    cel_string,
)
from distillation_runtime.spec import (
    API_GROUP,
    CLUSTER_ONLY_FIELDS,
    PIPELINE_RULES,
    PipelineSpec,
    SpecModel,
    section,
)
from distillation_runtime.stages import STAGES, definition, placement_sections

VERSION = "v1alpha1"
KIND = "Distillation"
PLURAL = "distillations"
SINGULAR = "distillation"
SHORT_NAMES = ["dist"]
API_VERSION = f"{API_GROUP}/{VERSION}"

QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""Kubernetes resource quantity (``4``, ``500m``, ``16Gi``), as in the core API's schema but
without a leading '-': a pod's requests and limits must not be negative, and the API server
would only say so when the operator creates the RayJob."""

Quantity = Annotated[
    str,
    Matches(
        QUANTITY_PATTERN,
        'a non-negative Kubernetes quantity such as "4", "500m", "16Gi" or "1e3"',
        max_length=64,
    ),
]
ResourceName = Annotated[str, Field(pattern=DNS_SUBDOMAIN, min_length=1, max_length=253)]
EnvName = Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)]

SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
"""A key of a Secret's data, as the core API validates it (``secretKeyRef.key``)."""

SecretKey = Annotated[
    str,
    Matches(
        SECRET_KEY_PATTERN,
        "a Secret key: at most 253 letters, digits, '-', '_' or '.'",
        min_length=1,
        max_length=253,
    ),
]

_REGISTRY_HOST = r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?"
_REGISTRY = (
    rf"((localhost|{_REGISTRY_HOST}(\.{_REGISTRY_HOST})+|\[[0-9a-fA-F:]+\])(:[0-9]+)?"
    rf"|{_REGISTRY_HOST}:[0-9]+)"
)
_REPOSITORY_PART = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^({_REGISTRY}/)?{_REPOSITORY_PART}(/{_REPOSITORY_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}))?$"
)
"""An OCI image reference (the distribution grammar): optional registry (a host with a dot, a
port or ``localhost``), a lowercase repository path, optional ``:tag`` and/or ``@digest``.
Kubernetes takes any string here and the kubelet refuses a bad one only when pulling, so the
pod would sit in InvalidImageName; this refuses it at ``kubectl apply``."""

Image = Annotated[
    str,
    Matches(
        IMAGE_PATTERN,
        "an image reference such as ghcr.io/org/image:1.0, vllm/vllm-openai:v0.33.0 or "
        "localhost:5000/org/image@sha256:<64 hex digits> (optional registry host[:port]/, a "
        "lowercase repository path, optional :tag and/or @sha256: digest)",
        min_length=1,
        max_length=512,
    ),
]

LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
"""A label value (at most 63 characters, checked by length): may be empty."""

LabelValue = Annotated[
    str,
    Matches(
        LABEL_VALUE_PATTERN,
        "a label value: empty, or at most 63 letters, digits, '-', '_' or '.' with a letter or "
        "digit at each end",
        max_length=63,
    ),
]

_LABEL_KEY_BODY = rf"({DNS_SUBDOMAIN_BODY}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = rf"^{_LABEL_KEY_BODY}$"
"""A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters."""

LABEL_KEY_PREFIX_PATTERN = r"^([^/]{1,253}/)?[^/]+$"
"""A label key's prefix has at most 253 characters (a second pattern: RE2 has no look-ahead)."""

LABEL_KEY_ALLOWED = (
    "a label key: an optional prefix (a DNS subdomain of at most 253 lowercase letters, digits, "
    "'-' and '.') and '/', then a name of at most 63 letters, digits, '-', '_' or '.' with a "
    "letter or digit at each end"
)

MAX_LABELS = 64
"""Labels per selector. Kubernetes has no limit, but the API server bounds the cost of the key
rule by it (an unbounded map makes every CEL rule on it too expensive to admit)."""

TolerationKey = Annotated[
    str,
    Matches(
        rf"^({_LABEL_KEY_BODY})?$",
        LABEL_KEY_ALLOWED + ", or empty to match every key",
        max_length=317,
    ),
]


def _valid_label_key(key: str) -> bool:
    return all(re.fullmatch(p, key) for p in (LABEL_KEY_PATTERN, LABEL_KEY_PREFIX_PATTERN))


class _LabelKeys:
    """``Annotated[dict[str, LabelValue], _LabelKeys()]``: label keys checked, at most
    ``MAX_LABELS`` of them. Structural schemas cannot constrain map keys, so the CRD gets the key
    check as a CEL rule on the map, and pydantic reports it on the map too (both name the same
    field: ``spec.placement.nodeSelector``)."""

    def check(self, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"has {len(labels)} labels; at most {MAX_LABELS} are allowed")
        for key in labels:
            if not _valid_label_key(key):
                raise ValueError(f"key {key!r} must be {LABEL_KEY_ALLOWED}")
        return labels

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(schema)
        key_checks = " && ".join(
            f"k.matches({cel_string(p)})" for p in (LABEL_KEY_PATTERN, LABEL_KEY_PREFIX_PATTERN)
        )
        out["maxProperties"] = MAX_LABELS
        out["x-kubernetes-validations"] = [
            cel(f"self.all(k, {key_checks})", f"every key must be {LABEL_KEY_ALLOWED}")
        ]
        return out


Labels = Annotated[dict[str, LabelValue], _LabelKeys()]
"""Label selector terms (nodeSelector, clusterSelector): keys and values in Kubernetes label
syntax, which the API server would otherwise refuse only on the RayJob or InferenceService."""

CLUSTER_SCHEMES = ("hf://", "s3://", "gs://", "pvc://")


# --------------------------------------------------------------------------------------------
# Placement: where the stages run
# --------------------------------------------------------------------------------------------


class TolerationOperator(StrEnum):
    """How a toleration matches a taint's value."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    """Which taint effect a toleration tolerates."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    """A pod toleration, as in the core API (lets pods land on tainted GPU nodes)."""

    # The core API's rules, repeated: the API server would apply them only to the RayJob's or
    # InferenceService's pods, after the Distillation was accepted.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                    "value must be empty when operator is Exists (Exists matches every value of "
                    "the key; use operator Equal to match one value)",
                    ".value",
                ),
                cel(
                    "!has(self.tolerationSeconds) || "
                    "(has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds needs effect NoExecute (it is how long a pod stays on a "
                    "node after a NoExecute taint appears)",
                    ".tolerationSeconds",
                ),
                cel(
                    f"!has(self.key) || self.key == '' || "
                    f"self.key.matches({cel_string(LABEL_KEY_PREFIX_PATTERN)})",
                    "the prefix of key (before '/') has at most 253 characters",
                    ".key",
                ),
                cel(
                    "self.operator == 'Exists' || (has(self.key) && self.key != '')",
                    "operator must be Exists when key is empty (an empty key matches every "
                    "taint, so there is no value to be Equal to)",
                    ".operator",
                ),
            ]
        }
    )

    key: TolerationKey | None = Field(
        default=None, description="Taint key; empty matches all keys."
    )
    operator: TolerationOperator = Field(
        default=TolerationOperator.EQUAL, description="Exists or Equal."
    )
    value: LabelValue | None = Field(
        default=None, description="Taint value to match with operator Equal."
    )
    effect: TaintEffect | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound."
    )

    @model_validator(mode="after")
    def _as_the_core_api_checks(self) -> Self:
        if self.key and not re.fullmatch(LABEL_KEY_PREFIX_PATTERN, self.key):
            prefix = self.key.split("/", 1)[0]
            raise ValueError(
                f"the prefix of key {self.key!r} has {len(prefix)} characters: the prefix of "
                "key (before '/') has at most 253 characters"
            )
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise ValueError(
                f"operator is Exists but value is {self.value!r}: value must be empty when "
                "operator is Exists (Exists matches every value of the key; use operator Equal "
                "to match one value)"
            )
        if self.toleration_seconds is not None and self.effect is not TaintEffect.NO_EXECUTE:
            effect = self.effect.value if self.effect is not None else "empty"
            raise ValueError(
                f"tolerationSeconds is {self.toleration_seconds} but effect is {effect}: "
                "tolerationSeconds needs effect NoExecute (it is how long a pod stays on a node "
                "after a NoExecute taint appears)"
            )
        if not self.key and self.operator is not TolerationOperator.EXISTS:
            raise ValueError(
                f"key is empty but operator is {self.operator.value}: operator must be Exists "
                "when key is empty (an empty key matches every taint, so there is no value to "
                "be Equal to)"
            )
        return self


class Resources(SpecModel):
    """CPU, memory and GPUs of one Ray pod."""

    cpu: Quantity | None = Field(
        default=None, description='CPU request and limit, e.g. "8" or "500m". Default: 4.'
    )
    memory: Quantity | None = Field(
        default=None, description='Memory request and limit, e.g. "64Gi". Default: 16Gi.'
    )
    gpus: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="GPUs per pod (placement.gpuResourceName). Default: 0 for the head, 0 for "
        "workers (CPU only); set it for real models.",
    )


class StagePlacement(Resources):
    """Ray workers for one stage; fields left empty fall back to placement.workers."""

    replicas: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Ray worker pods for the stage. Default: 1 (train: enough pods for "
        "train.workers).",
    )
    image: Image | None = Field(
        default=None, description="Image for this stage only (overrides placement.image)."
    )


def _stage_placements() -> type[SpecModel]:
    """``placement.stages``: one optional field per placement section of the stage table."""
    fields: dict[str, Any] = {}
    for section_name, doc in placement_sections().items():
        if not section_name.isidentifier():
            raise ValueError(f"placement section {section_name!r} is not a valid field name")
        fields[section_name] = (StagePlacement | None, Field(default=None, description=doc))
    model: type[SpecModel] = create_model(
        "StagePlacements",
        __base__=SpecModel,
        __doc__="Per-stage overrides of placement.workers.",
        **fields,
    )
    return model


if TYPE_CHECKING:

    class StagePlacements(SpecModel):
        """Per-stage overrides of placement.workers (one field per stage table section)."""

else:
    StagePlacements = _stage_placements()


class EnvVar(SpecModel):
    """A plain environment variable for every stage pod (never a secret: see spec.secrets)."""

    name: EnvName = Field(description="Variable name.")
    value: str = Field(max_length=4096, description="Variable value.")


class Placement(SpecModel):
    """Where and how the stage RayJobs run."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.clusterSelector) || (!has(self.head) && !has(self.workers) && "
                    "!has(self.stages))",
                    "clusterSelector runs the stages on an existing RayCluster: head, workers "
                    "and stages cannot be set with it",
                    ".clusterSelector",
                ),
                cel(
                    "!has(self.clusterSelector) || 'ray.io/cluster' in self.clusterSelector",
                    "clusterSelector must name the RayCluster with the label ray.io/cluster",
                    ".clusterSelector",
                ),
                cel(
                    "!has(self.clusterSelector) || !has(self.queueName)",
                    "queueName cannot be used with clusterSelector: Kueue admits RayJobs that "
                    "create their own cluster",
                    ".queueName",
                ),
            ]
        }
    )

    image: Image | None = Field(
        default=None,
        description="Runtime image for the stages. Default: the operator's configured runtime "
        "image (Helm value images.runtime).",
    )
    quantize_image: Image | None = Field(
        default=None,
        description="Image for the quantize stage (llm-compressor has its own pins). Default: "
        "the operator's configured quantize image.",
    )
    head: Resources | None = Field(
        default=None, description="The Ray head pod. Default: 2 CPU, 8Gi, no GPU."
    )
    workers: StagePlacement | None = Field(
        default=None, description="Ray worker pods of every stage, unless the stage overrides."
    )
    stages: StagePlacements | None = Field(
        default=None, description="Per-stage overrides of workers."
    )
    gpu_resource_name: Annotated[
        str, Field(pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*$", max_length=253)
    ] = Field(default="nvidia.com/gpu", description="Extended resource name GPUs are requested as.")
    node_selector: Labels | None = Field(
        default=None, description="Node labels every stage pod must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations for every stage pod."
    )
    priority_class_name: ResourceName | None = Field(
        default=None, description="PriorityClass of the stage pods."
    )
    service_account_name: ResourceName | None = Field(
        default=None, description="ServiceAccount the stage pods run as."
    )
    queue_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] | None = Field(
        default=None,
        description="Kueue LocalQueue to admit the RayJobs through (label "
        "kueue.x-k8s.io/queue-name). Kueue then owns suspending and resuming them.",
    )
    cluster_selector: Labels | None = Field(
        default=None,
        description="Run the stages on an existing RayCluster with these labels instead of "
        "creating one per stage.",
    )
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=64,
        description="Extra plain environment variables for the stage pods (e.g. AWS_ENDPOINT_URL).",
    )

    @model_validator(mode="after")
    def _existing_cluster_has_no_sizes(self) -> Self:
        sized = self.head is not None or self.workers is not None or self.stages is not None
        if self.cluster_selector is not None and sized:
            raise ValueError(
                "clusterSelector runs the stages on an existing RayCluster: head, workers and "
                "stages cannot be set with it"
            )
        if self.cluster_selector is not None and "ray.io/cluster" not in self.cluster_selector:
            raise ValueError(
                f"clusterSelector is {self.cluster_selector}: it must name the RayCluster with "
                "the label ray.io/cluster"
            )
        if self.cluster_selector is not None and self.queue_name is not None:
            raise ValueError(
                "queueName cannot be used with clusterSelector: Kueue admits RayJobs that "
                "create their own cluster"
            )
        return self


# --------------------------------------------------------------------------------------------
# Secrets, serving, policy
# --------------------------------------------------------------------------------------------


class SecretKeyRef(SpecModel):
    """One key of a Secret in the Distillation's namespace."""

    name: ResourceName = Field(description="Secret name.")
    key: SecretKey = Field(default="HF_TOKEN", description="Key in the Secret.")


class ObjectStoreSecret(SpecModel):
    """S3-compatible credentials, read from a Secret in the Distillation's namespace."""

    name: ResourceName = Field(description="Secret name.")
    access_key_id_key: SecretKey = Field(
        default="AWS_ACCESS_KEY_ID", description="Key holding the access key id."
    )
    secret_access_key_key: SecretKey = Field(
        default="AWS_SECRET_ACCESS_KEY", description="Key holding the secret access key."
    )


class Secrets(SpecModel):
    """Secrets the stages need; passed to pods only as secretKeyRef environment variables."""

    hugging_face_token: SecretKeyRef | None = Field(
        default=None, description="Hugging Face hub token for hf:// models (env HF_TOKEN)."
    )
    object_store: ObjectStoreSecret | None = Field(
        default=None, description="Credentials for s3:// models, data and output."
    )


class ServingRuntime(StrEnum):
    """Model server of the InferenceService."""

    VLLM = "vllm"


class ServingAPI(StrEnum):
    """Which KServe resource serves the student."""

    INFERENCE_SERVICE = "InferenceService"
    LLM_INFERENCE_SERVICE = "LLMInferenceService"


class ServeSpec(SpecModel):
    """Serve the final student with KServe (an InferenceService or an LLMInferenceService)
    once it passes the gate."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.maxReplicas) || self.maxReplicas >= self.replicas",
                    "maxReplicas must be at least replicas",
                    ".maxReplicas",
                ),
                cel(
                    "!has(self.tensorParallelSize) || self.tensorParallelSize <= self.gpus",
                    "tensorParallelSize splits a replica over its GPUs: it must be at most gpus",
                    ".tensorParallelSize",
                ),
                cel(
                    "!has(self.api) || self.api != 'LLMInferenceService' || "
                    "!has(self.maxReplicas) || self.maxReplicas == self.replicas",
                    "LLMInferenceService autoscaling needs KServe's workload variant autoscaler, "
                    "which the operator does not configure: set maxReplicas equal to replicas, "
                    "or use api InferenceService",
                    ".maxReplicas",
                ),
            ]
        }
    )

    runtime: ServingRuntime = Field(default=ServingRuntime.VLLM, description="Model server.")
    api: ServingAPI | None = Field(
        default=None,
        description="KServe resource that serves the student: InferenceService (serving."
        "kserve.io/v1beta1, a vLLM predictor container) or LLMInferenceService (serving.kserve."
        "io/v1alpha2: vLLM behind KServe's gateway and the llm-d scheduler). Default: the one "
        "the cluster serves, InferenceService when it serves both.",
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="GPUs per replica. 0 serves with `distill serve` of the runtime image "
        "(transformers on the CPU; a quantised student is decompressed as it loads, as the "
        "evaluate-quantized stage loads it): for trying the pipeline without GPUs, not for speed.",
    )
    tensor_parallel_size: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs one replica's vLLM splits the model over (--tensor-parallel-size; "
        "LLMInferenceService parallelism.tensor). Default: gpus when more than one. At most "
        "gpus.",
    )
    replicas: int = Field(default=1, ge=1, le=1000, description="Minimum replicas.")
    max_replicas: int | None = Field(
        default=None, ge=1, le=1000, description="Autoscale up to this many. Default: replicas."
    )
    cpu: Quantity | None = Field(default=None, description="CPU per replica.")
    memory: Quantity | None = Field(default=None, description="Memory per replica.")
    image: Image | None = Field(
        default=None, description="vLLM image override. Default: the operator's configured one."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="vLLM --max-model-len. Default: the model's."
    )
    args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=64, description="Extra vLLM server arguments."
    )
    node_selector: Labels | None = Field(
        default=None, description="Node labels the serving pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations for the serving pods."
    )
    service_account_name: ResourceName | None = Field(
        default=None,
        description="ServiceAccount of the serving pods, through which KServe's storage "
        "initializer reads the student from the output store: one with an IAM/workload-identity "
        "annotation (e.g. eks.amazonaws.com/role-arn), or with a Secret of AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY attached and annotated serving.kserve.io/s3-endpoint (KServe's S3 "
        "convention). Default: placement.serviceAccountName, the account the stages wrote with.",
    )

    @model_validator(mode="after")
    def _replica_range(self) -> Self:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(
                f"maxReplicas is {self.max_replicas} but replicas is {self.replicas}: "
                "maxReplicas must be at least replicas"
            )
        if self.tensor_parallel_size is not None and self.tensor_parallel_size > self.gpus:
            raise ValueError(
                f"tensorParallelSize is {self.tensor_parallel_size} but gpus is {self.gpus}: "
                "tensorParallelSize splits a replica over its GPUs, so it must be at most gpus"
            )
        autoscaled = self.max_replicas is not None and self.max_replicas != self.replicas
        if self.api is ServingAPI.LLM_INFERENCE_SERVICE and autoscaled:
            raise ValueError(
                f"maxReplicas is {self.max_replicas} but replicas is {self.replicas} with api "
                "LLMInferenceService: its autoscaling needs KServe's workload variant autoscaler, "
                "which the operator does not configure; set maxReplicas equal to replicas, or "
                "use api InferenceService"
            )
        return self

    @property
    def tensor_parallel(self) -> int:
        """GPUs per vLLM replica the model is split over."""
        return self.tensor_parallel_size or max(self.gpus, 1)


class PolicySpec(SpecModel):
    """Retries, pauses and time limits."""

    retries: int = Field(
        default=2, ge=0, le=20, description="Times a failed stage is retried before giving up."
    )
    backoff_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="Wait before the first retry; doubles on each further retry.",
    )
    suspend: bool = Field(
        default=False,
        description="Pause: no new stage starts, and a running stage's RayJob is suspended "
        "(unless Kueue manages it). Set back to false to continue where it stopped.",
    )
    max_parallel_stages: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Stages whose RayJobs may run at once. Default: no limit (stages that do "
        "not need each other, such as prune and generate, run together). Set 1 where the "
        "namespace's quota or GPU pool fits one stage's Ray cluster at a time: KubeRay creates "
        "each RayJob's pods without gang scheduling, so two stages started together can each "
        "hold part of the quota and wait for the other's pods forever. A waiting stage is "
        "Pending with a message naming the stages it waits for. Counts this Distillation's "
        "own RayJobs only: a limit across Distillations in a namespace is Kueue's "
        "(placement.queueName).",
    )
    stage_deadline_seconds: int | None = Field(
        default=None,
        ge=60,
        description="Fail a stage whose RayJob runs longer than this (activeDeadlineSeconds).",
    )
    deadline_seconds: int | None = Field(
        default=None,
        ge=60,
        description="Fail the whole Distillation when its stages have not all finished this "
        "long after the first one started; the running RayJob is stopped.",
    )
    ttl_seconds_after_finished: int = Field(
        default=600,
        ge=0,
        le=604800,
        description="Keep a finished stage's Ray cluster this long for inspection.",
    )


# --------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------

_CLUSTER_URI_RULE = (
    "{field}.matches('^(hf|s3|gs|pvc)://')",
    "{name} must be hf://, s3://, gs:// or pvc:// in a cluster (local paths work only with "
    "distill run)",
)


def _cluster_uri_rules() -> list[JsonValue]:
    rules: list[JsonValue] = []
    for field, name, guard in (
        ("self.teacher.model", "teacher.model", None),
        ("self.student.model", "student.model", "has(self.student.model)"),
        ("self.dataset.prompts", "dataset.prompts", None),
        ("self.output", "output", None),
    ):
        rule = _CLUSTER_URI_RULE[0].format(field=field)
        if guard:
            rule = f"!{guard} || {rule}"
        rules.append(cel(rule, _CLUSTER_URI_RULE[1].format(name=name), "." + name))
    return rules


class DistillationSpec(PipelineSpec):
    """Desired state: the pipeline, where it runs, and how the result is served."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": PIPELINE_RULES + _cluster_uri_rules()}
    )

    placement: Placement = section(Placement, "Where and how the stage RayJobs run.")
    secrets: Secrets | None = Field(
        default=None, description="Secrets for model hubs and object stores."
    )
    serve: ServeSpec | None = Field(
        default=None,
        description="Serve the final student (KServe InferenceService, vLLM) once it passes the "
        "quality gate. Not served when absent.",
    )
    policy: PolicySpec = section(PolicySpec, "Retries, suspend and deadlines.")

    @model_validator(mode="after")
    def _reachable_from_cluster(self) -> Self:
        for name, uri in (
            ("teacher.model", self.teacher.model),
            ("student.model", self.student.model),
            ("dataset.prompts", self.dataset.prompts),
            ("output", self.output),
        ):
            if uri is not None and not uri.startswith(CLUSTER_SCHEMES):
                raise ValueError(
                    f"{name} is {uri!r}: in a cluster it must be hf://, s3://, gs:// or pvc:// "
                    "(local paths work only with distill run)"
                )
        return self

    def pipeline(self) -> PipelineSpec:
        """The runtime's part of the spec (what the stages and ``distill run`` see)."""
        data = self.model_dump(by_alias=True, exclude=set(CLUSTER_ONLY_FIELDS))
        return PipelineSpec.model_validate(data)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------

CONDITION_READY = "Ready"
"""The summary: True once the student passed its gate (and, with ``serve``, is served)."""
CONDITION_RECONCILING = "Reconciling"
"""kstatus's abnormal-true pair: True while work is under way."""
CONDITION_STALLED = "Stalled"
"""kstatus's abnormal-true pair: True when it failed and needs a spec change."""
CONDITION_SERVED = "Served"
"""True once the InferenceService of the student reports Ready (only with ``spec.serve``)."""


def stage_condition(stage: str) -> str:
    """The condition type of a stage (the stage table's ``condition``)."""
    return definition(stage).condition


class Reason(StrEnum):
    """Reasons of the summary conditions (Ready, Reconciling, Stalled, Served) and of the
    Events that are not stage transitions. A stage's own condition has its state as reason."""

    PENDING = "Pending"
    STAGE_RUNNING = "StageRunning"
    QUEUED = "Queued"
    RETRYING = "Retrying"
    SUSPENDED = "Suspended"
    GATE_UNKNOWN = "GateUnknown"
    SERVING = "Serving"
    SUCCEEDED = "Succeeded"
    SERVED = "Served"
    STAGE_FAILED = "StageFailed"
    GATE_FAILED = "GateFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INVALID_SPEC = "InvalidSpec"
    MISSING_API = "MissingAPI"
    """An API the spec needs (KubeRay, KServe, Kueue) is not served by the cluster; the
    operator looks again every minute and resumes by itself once it is installed."""
    CHILD_WRITE_FAILED = "ChildWriteFailed"
    """The API server refused a write of a child (RBAC, a ResourceQuota, a webhook, a name taken
    by an object the Distillation does not own); the message is the server's."""
    IDLE = "Idle"
    """Reconciling=False: nothing to do."""
    PROGRESSING = "Progressing"
    """Stalled=False: not stuck."""
    READY = "Ready"
    """Served=True."""
    NOT_READY = "NotReady"
    """Served=False: not answering yet."""


STALLING_REASONS = frozenset(
    {
        Reason.GATE_FAILED,
        Reason.STAGE_FAILED,
        Reason.DEADLINE_EXCEEDED,
        Reason.INVALID_SPEC,
        Reason.MISSING_API,
        Reason.CHILD_WRITE_FAILED,
    }
)
"""Summary reasons that need a person (a Warning event, Stalled=True)."""


class EventReason(StrEnum):
    """Reasons of the Events of stage transitions (the summary's own Events use ``Reason``)."""

    STAGE_STARTED = "StageStarted"
    STAGE_QUEUED = "StageQueued"
    STAGE_RETRYING = "StageRetrying"
    STAGE_SUSPENDED = "StageSuspended"
    STAGE_SUCCEEDED = "StageSucceeded"
    STAGE_FAILED = "StageFailed"
    STAGE_REPLACED = "StageReplaced"


def _condition_types_doc() -> str:
    stages = ", ".join(f"{entry.condition} ({entry.name})" for entry in STAGES)
    return (
        f"{CONDITION_READY} (summary), {CONDITION_RECONCILING} (work under way), "
        f"{CONDITION_STALLED} (failed; needs a spec change), one per stage: {stages}; and "
        f"{CONDITION_SERVED} when spec.serve is set."
    )


class ConditionStatus(StrEnum):
    """Status of a condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class StatusModel(BaseModel):
    """Base of status models: camelCase; mutable, and tolerant of fields a newer operator
    version wrote (status is read back after upgrades and downgrades)."""

    model_config = SpecModel.model_config | ConfigDict(frozen=False, extra="ignore")


class Condition(StatusModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Ready, Reconciling, Stalled, Served, or a stage's (e.g. StudentTrained).",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase machine-readable reason.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this condition was computed for."
    )


class StageState(StrEnum):
    """Where a stage is."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    RETRYING = "Retrying"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StageProgress(StatusModel):
    """How far a running stage is, from the record it writes beside its artifact."""

    done: int = Field(ge=0, description="Units done (train: optimizer steps; generate: records).")
    total: int | None = Field(default=None, ge=0, description="Units in all, when known.")
    unit: str = Field(max_length=32, description="What is counted: steps, records.")
    percent: str | None = Field(default=None, max_length=16, description="done/total, in %.")
    eta_seconds: int | None = Field(
        default=None, ge=0, description="Seconds left at the rate so far."
    )
    loss: str | None = Field(default=None, max_length=32, description="Current training loss.")
    updated: datetime | None = Field(default=None, description="When the stage wrote it.")


class StageStatus(StatusModel):
    """Observed state of one stage."""

    name: str = Field(max_length=63, description="Stage name, e.g. generate.")
    state: StageState = Field(
        description="Pending (waits for its inputs), Queued (held by Kueue), Running, Retrying "
        "(an attempt failed; the next starts after the backoff), Suspended (spec.policy.suspend), "
        "Succeeded or Failed (out of retries)."
    )
    fingerprint: str | None = Field(
        default=None, max_length=128, description="Hash of the stage's inputs and config."
    )
    ray_job: str | None = Field(
        default=None, max_length=253, description="Name of the stage's current RayJob."
    )
    attempts: int = Field(default=0, ge=0, description="RayJobs started for this stage.")
    failed_attempts: list[int] | None = Field(
        default=None,
        max_length=64,
        description="Attempts that failed, at this fingerprint: the retry budget is counted "
        "from here, so it survives KubeRay's TTL (or a person) deleting the failed RayJobs.",
    )
    start_time: datetime | None = Field(default=None, description="When the stage started.")
    completion_time: datetime | None = Field(default=None, description="When the stage finished.")
    artifact: str | None = Field(
        default=None, max_length=2048, description="URI of the stage's output."
    )
    metrics: dict[str, str] | None = Field(
        default=None, description="Stage metrics as decimal strings."
    )
    message: str | None = Field(
        default=None, max_length=32768, description="Why the stage is in this state."
    )
    progress: StageProgress | None = Field(
        default=None,
        description="While it runs: steps or records done, loss, ETA (read every 30 s at most).",
    )


class Phase(StrEnum):
    """Summary of where the whole Distillation is."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ServingStatus(StatusModel):
    """The KServe resource serving the student."""

    inference_service: str | None = Field(
        default=None,
        max_length=253,
        description="Name of the InferenceService or LLMInferenceService (see kind).",
    )
    kind: str | None = Field(
        default=None,
        max_length=63,
        description="InferenceService or LLMInferenceService (spec.serve.api, or the one the "
        "cluster serves).",
    )
    url: str | None = Field(default=None, max_length=2048, description="Where to send requests.")
    ready: bool = Field(default=False, description="Whether it answers requests.")


class DeadlineClock(StatusModel):
    """What ``policy.deadlineSeconds`` counts: the working time of the current generation."""

    generation: int = Field(ge=0, description="The spec generation whose work is timed.")
    started: datetime = Field(description="When that generation's work started.")
    suspended_seconds: int = Field(
        default=0, ge=0, description="Seconds spent suspended since then (not counted)."
    )
    suspended_since: datetime | None = Field(
        default=None, description="Set while spec.policy.suspend holds the work."
    )


class DistillationStatus(StatusModel):
    """Observed state, written only by the operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this status describes."
    )
    phase: Phase | None = Field(default=None, description="Summary of where it is.")
    conditions: list[Condition] | None = Field(
        default=None,
        description=_condition_types_doc(),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    current_stage: str | None = Field(
        default=None,
        max_length=63,
        description="The stages running now (comma-separated: independent stages run together).",
    )
    start_time: datetime | None = Field(
        default=None,
        description="When the first stage started.",
    )
    completion_time: datetime | None = Field(
        default=None, description="When the last stage finished."
    )
    progress: str | None = Field(
        default=None, max_length=32, description="Stages done out of all, e.g. 3/6."
    )
    stage_progress: str | None = Field(
        default=None,
        max_length=128,
        description="The running stages' own progress, e.g. 'train 45% (1h10m left)'.",
    )
    deadline_clock: DeadlineClock | None = Field(
        default=None,
        description="What policy.deadlineSeconds counts: from the start of the current "
        "generation's work, without the time spent suspended.",
    )
    stages: list[StageStatus] | None = Field(
        default=None,
        description="One entry per planned stage, in order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    metrics: dict[str, str] | None = Field(
        default=None,
        description="Final metrics as decimal strings (retention, teacher and student scores).",
    )
    serving: ServingStatus | None = Field(default=None, description="The serving endpoint.")


# --------------------------------------------------------------------------------------------
# The resource
# --------------------------------------------------------------------------------------------

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Whether the student passed its gate and is delivered.",
    },
    {
        "name": "Stage",
        "type": "string",
        "jsonPath": ".status.currentStage",
        "description": "The stage running now.",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Stages done out of all.",
    },
    {
        "name": "Step",
        "type": "string",
        "jsonPath": ".status.stageProgress",
        "description": "How far the running stage is (percent, time left).",
    },
    {
        "name": "Retention",
        "type": "string",
        "jsonPath": ".status.metrics.retention",
        "description": "Student score / teacher score on the held-out prompts.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class Distillation(BaseModel):
    """A teacher distilled into a student, evaluated against it, and served."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: DistillationSpec
    status: DistillationStatus | None = None
