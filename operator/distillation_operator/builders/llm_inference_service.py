"""The KServe ``LLMInferenceService`` (``serving.kserve.io/v1alpha2``) serving the student.

KServe's recommended resource for LLMs since v0.17: vLLM pods behind KServe's gateway and the
llm-d inference scheduler (prefix-cache and load aware routing), multi-GPU through
``parallelism``. KServe composes the workload from its well-known configs (image, command,
probes) and this object's overrides: the model URI and served name, the replicas, tensor
parallelism, and the main container's image, resources and environment (extra vLLM flags go in
``VLLM_ADDITIONAL_ARGS``, which KServe's vLLM command appends). Its storage initializer fetches
``spec.model.uri`` (s3://, pvc://, hf://) as for an InferenceService.
"""

from __future__ import annotations

import shlex
from typing import Any

from distillation_operator.api import DistillationSpec, ServeSpec
from distillation_operator.builders.common import (
    ANNOTATION_SPEC_HASH,
    Images,
    child_metadata,
    container_resources,
    spec_hash,
)
from distillation_operator.builders.inference_service import (
    engine_args,
    hub_token_env,
    inference_service_name,
    serving_placement,
)

LLM_INFERENCE_SERVICE_API = "serving.kserve.io/v1alpha2"
MAIN_CONTAINER = "main"
"""The container name KServe's configs merge overrides into."""
ROUTER: dict[str, Any] = {"route": {}, "gateway": {}, "scheduler": {}}
"""KServe-managed HTTPRoute, Gateway and llm-d scheduler: what its LLM guides deploy."""


def build_llm_inference_service(
    body: dict[str, Any],
    spec: DistillationSpec,
    model_uri: str,
    images: Images,
    min_compute_capability: str | None = None,
) -> dict[str, Any]:
    """The LLMInferenceService serving the model at ``model_uri`` (the final student's folder),
    named like the InferenceService would be (one serving child per Distillation)."""
    serve = spec.serve or ServeSpec()
    name = inference_service_name(body["metadata"]["name"])
    env = hub_token_env(spec)
    extra = engine_args(serve, tensor_parallel=False)  # parallelism.tensor says it
    if extra:
        env.append({"name": "VLLM_ADDITIONAL_ARGS", "value": shlex.join(extra)})
    container: dict[str, Any] = {
        "name": MAIN_CONTAINER,
        "image": serve.image or images.vllm,
        "resources": container_resources(
            serve.cpu, serve.memory, serve.gpus, spec.placement.gpu_resource_name
        ),
    }
    if env:
        container["env"] = env
    spec_: dict[str, Any] = {
        "model": {"uri": model_uri, "name": body["metadata"]["name"]},
        "replicas": serve.replicas,
        "template": {"containers": [container], **serving_placement(spec, min_compute_capability)},
        "router": ROUTER,
    }
    if serve.tensor_parallel > 1:
        spec_["parallelism"] = {"tensor": serve.tensor_parallel}
    metadata = child_metadata(body, name, "serve")
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(spec_)}
    return {
        "apiVersion": LLM_INFERENCE_SERVICE_API,
        "kind": "LLMInferenceService",
        "metadata": metadata,
        "spec": spec_,
    }
