"""Deleting a Distillation deletes what it owns (the garbage collector runs on the plane)."""

from __future__ import annotations

import time
from typing import Any

from support.corpus import load_sample


def test_owned_configmap_goes_with_its_distillation(api: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    manifest = load_sample("tiny-cpu")
    owner = custom.create_namespaced_custom_object(
        "distillation.dev", "v1alpha1", namespace, "distillations", manifest
    )
    reference = client.V1OwnerReference(
        api_version="distillation.dev/v1alpha1",
        kind="Distillation",
        name=owner["metadata"]["name"],
        uid=owner["metadata"]["uid"],
        controller=True,
        block_owner_deletion=True,
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="tiny-cpu-generate", owner_references=[reference]),
            data={"stage.yaml": "stage: generate\n"},
        ),
    )
    custom.delete_namespaced_custom_object(
        "distillation.dev", "v1alpha1", namespace, "distillations", "tiny-cpu"
    )
    # The garbage collector sees a newly installed CRD's objects on its next discovery resync
    # (~30 s), so allow a few resyncs.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_config_map("tiny-cpu-generate", namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return
        time.sleep(1)
    raise AssertionError("the owned ConfigMap was not garbage-collected within 120 s")
