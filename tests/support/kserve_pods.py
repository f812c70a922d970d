"""A KServe STAND-IN for the node tier: it runs each InferenceService's predictor as a real pod.

KServe's controller does not build here, so this plays its part, and only that part: for every
``serving.kserve.io/v1beta1`` InferenceService in a namespace it creates one Pod from the
predictor container the operator built (image, command, arguments, env, resources, unchanged),
with the model's ``pvc://claim/path`` ``STORAGE_URI`` mounted read-only at ``/mnt/models`` (what
KServe does for a PVC storage URI), owned by the InferenceService so it goes when that does.
It marks the InferenceService Ready, with the pod's URL, only when the pod answers an OpenAI
completion request; a pod that fails first gets Ready False with the reason. No Knative, no
ingress, no autoscaling, no revisions: those are KServe's and are not played.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

from support.kserve import (
    GROUP,
    PLURAL,
    VERSION,
    predictor_container,
    ready_status,
    served_model_name,
    storage_uri,
)

MODEL_DIR = "/mnt/models"
POLL_SECONDS = 1.0


def predictor_pod(isvc: dict[str, Any]) -> dict[str, Any]:
    """The pod KServe would run for ``isvc``'s predictor (one replica), reduced to what matters
    here: the operator's container and the model volume."""
    meta = isvc["metadata"]
    container = predictor_container(isvc)
    uri = storage_uri(container)
    if not uri.startswith("pvc://"):
        raise ValueError(f"STORAGE_URI {uri}: this stand-in serves pvc:// models only")
    claim, _, sub_path = uri.removeprefix("pvc://").partition("/")
    container["volumeMounts"] = [
        *container.get("volumeMounts", []),
        {"name": "model", "mountPath": MODEL_DIR, "subPath": sub_path, "readOnly": True},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-predictor",
            "labels": {"serving.kserve.io/inferenceservice": meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "InferenceService",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            ],
            "restartPolicy": "Always",
        },
    }


def completion(url: str, model: str, prompt: str, timeout: float = 30) -> dict[str, Any]:
    """POST an OpenAI completion request and return the answer."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    request = urllib.request.Request(
        f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


class KServePodStandIn:
    """Plays KServe's controller for one namespace's InferenceServices (see the module)."""

    def __init__(self, api: Any, namespace: str, probe_prompt: str) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.probe_prompt = probe_prompt
        self.served: dict[str, str] = {}
        """InferenceService UID -> the URL it was marked Ready with."""
        self.answers: dict[str, dict[str, Any]] = {}
        """InferenceService name -> the completion its pod gave before it was marked Ready."""
        self.errors: list[str] = []

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception as err:  # keep playing: note it, retry
                self.errors.append(str(err))
            stop.wait(POLL_SECONDS)

    def step(self) -> None:
        from kubernetes.client.exceptions import ApiException

        found: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL
        )
        for isvc in found["items"]:
            meta = isvc["metadata"]
            if meta.get("deletionTimestamp") or meta["uid"] in self.served:
                continue
            pod = predictor_pod(isvc)
            name = pod["metadata"]["name"]
            try:
                running = self.core.read_namespaced_pod(name, self.namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                self.core.create_namespaced_pod(self.namespace, pod)
                continue
            self.check(isvc, running)

    def check(self, isvc: dict[str, Any], pod: Any) -> None:
        """Ready once the pod answers a completion; Ready False if its container failed."""
        statuses = pod.status.container_statuses or []
        for status in statuses:
            waiting = status.state.waiting if status.state else None
            terminated = status.last_state.terminated if status.last_state else None
            if terminated is not None or (waiting and waiting.reason in ("ErrImageNeverPull",)):
                reason = (terminated.message or terminated.reason) if terminated else waiting.reason
                self.patch(isvc, ready_status(isvc, "False", "", f"predictor pod: {reason}"))
        if pod.status.phase != "Running" or not pod.status.pod_ip:
            return
        port = predictor_container(isvc)["ports"][0]["containerPort"]
        url = f"http://{pod.status.pod_ip}:{port}"
        model = served_model_name(predictor_container(isvc)) or isvc["metadata"]["name"]
        try:
            answer = completion(url, model, self.probe_prompt)
        except OSError:
            return  # still loading
        self.answers[isvc["metadata"]["name"]] = answer
        self.patch(isvc, ready_status(isvc, "True", url))
        self.served[isvc["metadata"]["uid"]] = url

    def patch(self, isvc: dict[str, Any], status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, isvc["metadata"]["name"], {"status": status}
        )
