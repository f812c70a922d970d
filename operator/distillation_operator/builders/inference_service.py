"""The KServe ``InferenceService`` (``serving.kserve.io/v1beta1``) serving the student with vLLM
(``distill serve`` of the runtime image when ``serve.gpus`` is 0).

A custom predictor container runs vLLM's OpenAI-compatible server. KServe's storage initializer
downloads the model named by the container's ``STORAGE_URI`` (s3://, gs://, pvc://, hf://) to
``/mnt/models`` before the server starts. A quantised student (compressed-tensors) needs no flag:
vLLM reads the scheme from its config. When the quantize stage recorded the minimum GPU compute
capability the scheme needs, the pods are kept to nodes that report it (NVIDIA GPU feature
discovery labels).
"""

from __future__ import annotations

from typing import Any

from distillation_operator.api import DistillationSpec, ServeSpec
from distillation_operator.builders.common import (
    ANNOTATION_SPEC_HASH,
    Images,
    child_metadata,
    child_name,
    container_resources,
    spec_hash,
)

MODEL_DIR = "/mnt/models"
SERVING_PORT = 8080
GPU_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
GPU_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
MAX_INFERENCE_SERVICE_NAME = 45
"""KServe takes DNS-1035 names only and builds 63-character labels from them: its predictor's
Service and Deployment ``<name>-predictor`` and, in older releases and Knative mode,
``<name>-predictor-default`` (18 more characters: 63 - 18 = 45). What is left of the 63 also
keeps host names such as ``<name>-predictor-<namespace>`` valid for short namespaces."""

INFERENCE_SERVICE_API = "serving.kserve.io/v1beta1"


def inference_service_name(distillation: str) -> str:
    """The InferenceService name: the Distillation's, as a DNS-1035 label KServe accepts (a
    Distillation named ``7b-chat`` or ``llama.v2`` gets a rewritten, hashed one)."""
    return child_name(distillation, (), MAX_INFERENCE_SERVICE_NAME)


def engine_args(serve: ServeSpec, *, tensor_parallel: bool = True) -> list[str]:
    """vLLM arguments from the spec: tensor parallelism over the replica's GPUs (unless the
    resource says it itself: LLMInferenceService's parallelism), the context length, the user's
    extras."""
    args = []
    if tensor_parallel and serve.tensor_parallel > 1:
        args += ["--tensor-parallel-size", str(serve.tensor_parallel)]
    if serve.max_model_len is not None:
        args += ["--max-model-len", str(serve.max_model_len)]
    return args + list(serve.args or [])


def vllm_args(serve: ServeSpec, served_name: str) -> list[str]:
    """vLLM server arguments: the model folder, the port KServe routes to, the spec's."""
    args = ["--model", MODEL_DIR, "--port", str(SERVING_PORT), "--served-model-name", served_name]
    return args + engine_args(serve)


def hub_token_env(spec: DistillationSpec) -> list[dict[str, Any]]:
    """The hub token as a ``secretKeyRef`` variable, when the spec names one."""
    if spec.secrets is None or spec.secrets.hugging_face_token is None:
        return []
    token = spec.secrets.hugging_face_token
    return [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}
    ]


def serving_placement(spec: DistillationSpec, min_compute_capability: str | None) -> dict[str, Any]:
    """Pod fields of the serving pods (both APIs): nodes, tolerations, GPUs of the compute
    capability a quantised student needs, and the account KServe's storage initializer uses."""
    serve = spec.serve or ServeSpec()
    pod: dict[str, Any] = {}
    if serve.node_selector:
        pod["nodeSelector"] = dict(serve.node_selector)
    if serve.tolerations:
        pod["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in serve.tolerations
        ]
    if min_compute_capability and serve.gpus:
        pod["affinity"] = compute_capability_affinity(min_compute_capability)
    account = serve.service_account_name or spec.placement.service_account_name
    if account:
        pod["serviceAccountName"] = account
    return pod


def compute_capability_affinity(capability: str) -> dict[str, Any]:
    """Node affinity for GPUs of at least ``capability`` ("8.9"): major > 8, or 8 and minor >= 9.

    ``Gt`` is strict, so "at least N" is written ``Gt N-1``."""
    major, _, minor = capability.partition(".")
    terms = [
        {"matchExpressions": [{"key": GPU_MAJOR_LABEL, "operator": "Gt", "values": [major]}]},
        {
            "matchExpressions": [
                {"key": GPU_MAJOR_LABEL, "operator": "In", "values": [major]},
                {"key": GPU_MINOR_LABEL, "operator": "Gt", "values": [str(int(minor or 0) - 1)]},
            ]
        },
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }
    }


def predictor_command(serve: ServeSpec, images: Images, served_name: str) -> dict[str, Any]:
    """Image, command and arguments of the predictor container. With GPUs, vLLM's OpenAI
    server. With ``serve.gpus: 0``, ``distill serve`` of the runtime image (transformers on the
    CPU, the same OpenAI routes): vLLM's image is built for GPUs and does not start without
    one."""
    if serve.gpus == 0:
        return {
            "image": serve.image or images.runtime,
            "command": ["distill", "serve"],
            "args": [
                MODEL_DIR,
                "--host",
                "0.0.0.0",
                "--port",
                str(SERVING_PORT),
                "--served-model-name",
                served_name,
            ],
        }
    return {
        "image": serve.image or images.vllm,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(serve, served_name),
    }


def build_inference_service(
    body: dict[str, Any],
    spec: DistillationSpec,
    model_uri: str,
    images: Images,
    min_compute_capability: str | None = None,
) -> dict[str, Any]:
    """The InferenceService serving the model at ``model_uri`` (the final student's folder)."""
    serve = spec.serve or ServeSpec()
    name = inference_service_name(body["metadata"]["name"])
    env = [{"name": "STORAGE_URI", "value": model_uri}, *hub_token_env(spec)]
    container = {
        "name": "kserve-container",
        **predictor_command(serve, images, body["metadata"]["name"]),
        "env": env,
        "ports": [{"containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": container_resources(
            serve.cpu, serve.memory, serve.gpus, spec.placement.gpu_resource_name
        ),
    }
    predictor: dict[str, Any] = {
        "minReplicas": serve.replicas,
        "maxReplicas": serve.max_replicas or serve.replicas,
        "containers": [container],
        **serving_placement(spec, min_compute_capability),
    }
    spec_ = {"predictor": predictor}
    metadata = child_metadata(body, name, "serve")
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(spec_)}
    return {
        "apiVersion": INFERENCE_SERVICE_API,
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": spec_,
    }
