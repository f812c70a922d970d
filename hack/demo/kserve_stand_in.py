"""A local KServe STAND-IN: it serves each InferenceService with ``distill serve`` on loopback.

With no kubelet there is no predictor pod; so for the demo this stand-in takes KServe's place.
(The demo serves with ``serve.gpus: 0``, for which the operator's predictor container is the
runtime image's ``distill serve`` too: the stand-in runs that server as a local process.)
For every ``serving.kserve.io/v1beta1`` InferenceService in the namespace it:

1. reads what the operator put in the predictor container: the model's ``STORAGE_URI`` (a
   ``pvc://`` URI resolves under ``DISTILL_PVC_ROOT``, the demo's claims folder, as KServe's
   storage initializer would fetch it to ``/mnt/models``) and ``--served-model-name``;
2. starts ``distill serve <STORAGE_URI> --port <free port> --served-model-name <name>`` (the
   project's own OpenAI-compatible server on transformers, in place of the predictor pod);
3. waits for ``GET /health`` to answer 200, then writes the status KServe writes for a ready
   service: ``conditions`` Ready (and PredictorReady, IngressReady) True, ``url`` (here the
   loopback address, where KServe would give the ingress host) and ``observedGeneration`` equal
   to ``metadata.generation``. A server that exits before it is healthy is reported Ready
   False with the tail of its stderr.

A new generation (the operator updated the spec) restarts the server; a deleted
InferenceService has its server stopped. LLMInferenceServices are not played.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo_common import KSERVE_STAND_IN, Printer, child_env, distill_command, tail

from support.kserve import predictor_container, ready_status, served_model_name, storage_uri
from support.net import free_port

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
POLL_SECONDS = 0.5


@dataclass
class Server:
    """One ``distill serve`` process for one generation of an InferenceService."""

    name: str
    uid: str
    generation: int
    url: str
    process: subprocess.Popen[bytes]
    stderr: Path
    ready: bool = False
    failed: bool = False


def healthy(url: str) -> bool:
    """Whether ``distill serve`` answers ``/health`` with 200 (it says 503 while it loads)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return int(response.status) == 200
    except OSError:
        return False


class KServeStandIn:
    """Plays KServe for the InferenceServices of one namespace (see the module docstring)."""

    def __init__(
        self, api: Any, namespace: str, pvc_root: Path, work: Path, printer: Printer
    ) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.pvc_root = pvc_root
        self.work = work
        self.printer = printer
        self.servers: dict[str, Server] = {}
        """By InferenceService UID."""
        self.refused: set[str] = set()
        """UIDs of InferenceServices with nothing to serve (no STORAGE_URI)."""

    def say(self, text: str) -> None:
        self.printer.say(text, KSERVE_STAND_IN)

    def serve_forever(self, stop: threading.Event) -> None:
        """Poll the namespace's InferenceServices until ``stop``, then stop every server."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as err:  # keep playing KServe: say what happened, retry
                if not stop.is_set():  # else the demo is ending and takes the API with it
                    self.say(f"error (retrying): {err}")
            stop.wait(POLL_SECONDS)
        self.stop()

    def step(self) -> None:
        """One level-based pass: stop servers of deleted (or changed) services, start servers
        for new generations, report the ones that became healthy or died."""
        found: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL
        )
        by_uid = {i["metadata"]["uid"]: i for i in found["items"]}
        for uid, server in list(self.servers.items()):
            isvc = by_uid.get(uid)
            if isvc is None or isvc["metadata"].get("deletionTimestamp"):
                self.halt(server)
                del self.servers[uid]
                self.say(f"{server.name}: deleted; its server stopped")
            elif isvc["metadata"].get("generation") != server.generation:
                self.halt(server)
                del self.servers[uid]
                self.say(f"{server.name}: spec changed; restarting its server")
        for uid, isvc in by_uid.items():
            if (
                uid not in self.servers
                and uid not in self.refused
                and not isvc["metadata"].get("deletionTimestamp")
            ):
                self.start(isvc)
            current = self.servers.get(uid)
            if current is not None:
                self.check(isvc, current)

    def start(self, isvc: dict[str, Any]) -> None:
        """``distill serve`` for this InferenceService's model, on a free loopback port."""
        meta = isvc["metadata"]
        container = predictor_container(isvc)
        try:
            uri = storage_uri(container)
        except ValueError as err:  # nothing to serve: said once, as KServe's status says it
            self.refused.add(meta["uid"])
            self.patch(isvc, ready_status(isvc, "False", "", str(err)))
            self.say(f"{meta['name']}: not served: {err}")
            return
        port = free_port()
        command = [*distill_command(), "serve", uri, "--port", str(port)]
        name = served_model_name(container)
        if name:
            command += ["--served-model-name", name]
        folder = self.work / "serving" / meta["name"]
        folder.mkdir(parents=True, exist_ok=True)
        env = child_env(self.pvc_root, {"DISTILL_WORK_DIR": str(folder / "scratch")})
        with (folder / "server.out").open("wb") as out, (folder / "server.err").open("wb") as err:
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        self.servers[meta["uid"]] = Server(
            meta["name"],
            meta["uid"],
            int(meta.get("generation") or 0),
            url,
            process,
            folder / "server.err",
        )
        shown = " ".join(["distill", *command[len(distill_command()) :]])
        self.say(f"{meta['name']}: starting `{shown}` (in place of the predictor pod)")

    def check(self, isvc: dict[str, Any], server: Server) -> None:
        """Ready once ``/health`` answers 200; Ready False if the server died before that."""
        if server.ready or server.failed:
            return
        if server.process.poll() is not None:
            server.failed = True
            reason = tail(server.stderr)
            self.say(f"{server.name}: its server exited {server.process.returncode}:\n{reason}")
            self.patch(isvc, ready_status(isvc, "False", server.url, f"server exited: {reason}"))
            return
        if healthy(server.url):
            server.ready = True
            self.patch(isvc, ready_status(isvc, "True", server.url))
            self.say(f"{server.name}: /health answers 200; Ready at {server.url}")

    def patch(self, isvc: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge ``status`` into the InferenceService's status subresource."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, isvc["metadata"]["name"], {"status": status}
            )
        except ApiException as err:
            if err.status != 404:
                raise

    @staticmethod
    def halt(server: Server) -> None:
        """SIGTERM (``distill serve`` stops cleanly on it), SIGKILL if it does not."""
        if server.process.poll() is not None:
            return
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()

    def stop(self) -> None:
        """Stop every server (the demo is ending)."""
        for server in self.servers.values():
            self.halt(server)
        self.servers.clear()
