"""One KubeRay ``RayJob`` (``ray.io/v1``) per stage attempt. Pure: data in, a dict out.

The RayJob runs ``distill stage NAME --config-env DISTILL_SPEC`` on a Ray cluster created for it
(or on an existing one, ``placement.clusterSelector``). The pipeline spec travels in the job's
runtime environment (``spec.runtimeEnvYAML``), so the exact config a stage ran with is readable
from the RayJob itself and is byte-for-byte what ``distill run`` would read from a file.
Secrets reach the pods only as ``secretKeyRef`` environment variables.
"""

from __future__ import annotations

import shlex
from typing import Any

from distillation_operator.api import DistillationSpec, Resources, StagePlacement
from distillation_operator.builders.common import (
    ANNOTATION_ARTIFACT,
    ANNOTATION_FINGERPRINT,
    LABEL_ATTEMPT,
    LABEL_STAGE,
    Images,
    child_metadata,
    child_name,
    container_resources,
)
from distillation_runtime.plan import Plan
from distillation_runtime.spec import dump_spec
from distillation_runtime.stages import ImageKind, definition
from distillation_runtime.storage import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, parse_uri
from distillation_runtime.yamlio import dump_yaml

MAX_RAYJOB_NAME = 47
"""KubeRay refuses longer RayJob names (its RayCluster and service names derive from them)."""
SPEC_ENV = "DISTILL_SPEC"
RAYJOB_API = "ray.io/v1"
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_QUEUE_LABEL = f"{KUEUE_GROUP}/queue-name"
HEAD_DEFAULTS = Resources(cpu="2", memory="8Gi", gpus=0)
WORKER_DEFAULTS = StagePlacement(cpu="4", memory="16Gi", gpus=0, replicas=1)
WORKER_GROUP = "workers"
RAY_VERSION = "2.60.0"
"""The Ray in the stage images (uv.lock; a unit test keeps them equal), given to KubeRay as
``rayVersion``: KubeRay picks version-dependent behaviour by it, e.g. from 2.53 its probes are
HTTP checks of the dashboard agent instead of ``wget`` commands run inside the container."""


def rayjob_name(distillation: str, stage: str, attempt: int) -> str:
    """``<distillation>-<stage>-<attempt>`` as a DNS-1035 label of at most 47 characters, unique
    per Distillation (``child_name``)."""
    return child_name(distillation, (stage, attempt), MAX_RAYJOB_NAME)


def entrypoint(stage: str, plan: Plan) -> str:
    """The command the Ray driver runs (the same ``distill stage`` a user can run by hand), with
    the artifact URIs the operator planned for the stage and its inputs: an image of another
    version writes exactly where the operator will look."""
    planned = plan[stage]
    artifacts = [
        f"--artifact {shlex.quote(f'{n}={plan.artifact(n)}')}" for n in (stage, *planned.waits_for)
    ]
    return " ".join([definition(stage).entrypoint, "--config-env", SPEC_ENV, *artifacts])


def runtime_env_yaml(spec: DistillationSpec) -> str:
    """Ray runtime environment carrying the pipeline spec (every default filled in)."""
    return dump_yaml({"env_vars": {SPEC_ENV: dump_yaml(dump_spec(spec.pipeline()))}})


def stage_override(spec: DistillationSpec, stage: str) -> StagePlacement | None:
    """``placement.stages.<section>``, when set (the stage table names the section:
    evaluate-quantized is sized by evaluate's)."""
    stages = spec.placement.stages
    section_name = definition(stage).placement_section
    found = getattr(stages, section_name, None) if stages is not None else None
    return found if isinstance(found, StagePlacement) else None


def stage_workers(spec: DistillationSpec, stage: str) -> StagePlacement:
    """Worker pods of ``stage``: its override, else placement.workers (unless the stage table
    says the stage sizes itself: the preflight), else the stage table's default (training: one
    pod per Ray Train worker, ``train.workers``; the preflight: none), else one."""
    override = stage_override(spec, stage)
    layers = (
        (spec.placement.workers, override) if definition(stage).shared_placement else (override,)
    )
    merged: dict[str, Any] = WORKER_DEFAULTS.model_dump(exclude_none=True)
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    replicas_given = any(layer is not None and layer.replicas for layer in layers)
    placement = StagePlacement.model_validate(merged)
    default_workers = definition(stage).default_workers
    if default_workers is not None and not replicas_given:
        # may be 0 (head only), which a user's placement may not ask for
        placement = placement.model_copy(update={"replicas": default_workers(spec)})
    return placement


def stage_image(spec: DistillationSpec, stage: str, images: Images) -> str:
    """The image of ``stage``: a per-stage override, else the image of its kind (the stage
    table's): the quantize image, the runtime image with vLLM (a stage that generates with vLLM
    on GPU pods), or the runtime image."""
    override = stage_override(spec, stage)
    if override is not None and override.image:
        return override.image
    if definition(stage).image is ImageKind.QUANTIZE:
        return spec.placement.quantize_image or images.quantize
    if spec.placement.image:
        return spec.placement.image
    if runs_vllm(spec, stage):
        return images.runtime_vllm or images.runtime
    return images.runtime


def runs_vllm(spec: DistillationSpec, stage: str) -> bool:
    """Whether ``stage`` generates with vLLM: the spec lets it (backend vllm or auto) and its
    pods have GPUs (vLLM runs on GPUs only; on CPU pods auto means transformers)."""
    return definition(stage).uses_vllm(spec) and (stage_workers(spec, stage).gpus or 0) > 0


def secret_env(spec: DistillationSpec) -> list[dict[str, Any]]:
    """Hub token and object-store keys as ``secretKeyRef`` variables (never their values)."""
    env: list[dict[str, Any]] = []
    secrets = spec.secrets
    if secrets is None:
        return env

    def ref(var: str, name: str, key: str) -> dict[str, Any]:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}

    if secrets.hugging_face_token is not None:
        token = secrets.hugging_face_token
        env.append(ref("HF_TOKEN", token.name, token.key))
    if secrets.object_store is not None:
        store = secrets.object_store
        env.append(ref("AWS_ACCESS_KEY_ID", store.name, store.access_key_id_key))
        env.append(ref("AWS_SECRET_ACCESS_KEY", store.name, store.secret_access_key_key))
    return env


def pvc_claims(spec: DistillationSpec) -> list[str]:
    """PersistentVolumeClaims the spec's ``pvc://`` URIs name (mounted into every Ray pod)."""
    uris = [spec.teacher.model, spec.student.model, spec.dataset.prompts, spec.output]
    claims = {parse_uri(u).bucket for u in uris if u is not None and u.startswith("pvc://")}
    return sorted(claims)


def pod_template(
    spec: DistillationSpec, container: str, image: str, resources: Resources
) -> dict[str, Any]:
    """A Ray pod: image, resources, scheduling, secrets as env, PVCs mounted."""
    placement = spec.placement
    claims = pvc_claims(spec)
    env = [{"name": PVC_ROOT_ENV, "value": DEFAULT_PVC_ROOT}]
    env += [{"name": e.name, "value": e.value} for e in placement.env or []]
    env += secret_env(spec)
    main: dict[str, Any] = {
        "name": container,
        "image": image,
        "resources": container_resources(
            resources.cpu, resources.memory, resources.gpus, placement.gpu_resource_name
        ),
        "env": env,
    }
    pod: dict[str, Any] = {"containers": [main]}
    if claims:
        main["volumeMounts"] = [
            {"name": f"pvc-{i}", "mountPath": f"{DEFAULT_PVC_ROOT}/{claim}"}
            for i, claim in enumerate(claims)
        ]
        pod["volumes"] = [
            {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}}
            for i, claim in enumerate(claims)
        ]
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in placement.tolerations
        ]
    if placement.priority_class_name:
        pod["priorityClassName"] = placement.priority_class_name
    if placement.service_account_name:
        pod["serviceAccountName"] = placement.service_account_name
    return {"spec": pod}


def ray_cluster_spec(spec: DistillationSpec, stage: str, images: Images) -> dict[str, Any]:
    """A head group and one worker group sized for ``stage``."""
    image = stage_image(spec, stage, images)
    head = HEAD_DEFAULTS.model_copy(
        update=spec.placement.head.model_dump(exclude_none=True) if spec.placement.head else {}
    )
    workers = stage_workers(spec, stage)
    replicas = workers.replicas if workers.replicas is not None else 1
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},
            "template": pod_template(spec, "ray-head", image, head),
        },
    }
    if replicas:  # none: the driver runs on the head (the preflight)
        cluster["workerGroupSpecs"] = [
            {
                "groupName": WORKER_GROUP,
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": {},
                "template": pod_template(spec, "ray-worker", image, workers),
            }
        ]
    return cluster


def build_rayjob(
    body: dict[str, Any],
    spec: DistillationSpec,
    plan: Plan,
    stage: str,
    attempt: int,
    images: Images,
) -> dict[str, Any]:
    """The RayJob of one attempt at ``stage`` of the Distillation ``body``."""
    name = rayjob_name(body["metadata"]["name"], stage, attempt)
    planned = plan[stage]
    metadata = child_metadata(body, name, stage, {LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)})
    metadata["annotations"] = {
        ANNOTATION_FINGERPRINT: planned.fingerprint,
        ANNOTATION_ARTIFACT: plan.artifact(stage),
    }
    policy, placement = spec.policy, spec.placement
    job: dict[str, Any] = {
        "entrypoint": entrypoint(stage, plan),
        "runtimeEnvYAML": runtime_env_yaml(spec),
        # Retries are new attempts (new RayJobs) decided by the operator, with its backoff.
        "backoffLimit": 0,
        "submissionMode": "K8sJobMode",
    }
    if placement.cluster_selector:
        job["clusterSelector"] = dict(placement.cluster_selector)
        job["shutdownAfterJobFinishes"] = False  # never tear down a cluster we did not create
    else:
        job["rayClusterSpec"] = ray_cluster_spec(spec, stage, images)
        job["shutdownAfterJobFinishes"] = True
        job["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    if policy.stage_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = policy.stage_deadline_seconds
    if placement.queue_name:
        # Kueue's webhook suspends the job on creation and admits it by resuming it.
        metadata["labels"][KUEUE_QUEUE_LABEL] = placement.queue_name
    return {"apiVersion": RAYJOB_API, "kind": "RayJob", "metadata": metadata, "spec": job}
