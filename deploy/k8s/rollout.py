"""`make deploy` and `make rollback`: apply an overlay, wait for every rollout and for /healthz through Envoy; on
failure say why (warning events, the failing pod's last log lines) and undo what this deploy changed.

    python -m deploy.k8s.rollout deploy --overlay deploy/k8s/overlays/gpu
    python -m deploy.k8s.rollout rollback
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

PART_OF = "app.kubernetes.io/part-of=superwav2lip"
REVISION = "deployment.kubernetes.io/revision"
LOG_LINES = 40
EVENT_LINES = 20


class KubectlError(RuntimeError):
    """A kubectl command failed; the message carries its output."""


@dataclass
class Kubectl:
    """Runs the user's kubectl against one namespace (and context, when given)."""

    binary: str = "kubectl"
    namespace: str = "superwav2lip"
    context: str | None = None

    def run(self, *args: str, timeout: float | None = None) -> str:
        command = [self.binary, *(["--context", self.context] if self.context else []), "-n", self.namespace, *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KubectlError(f"{' '.join(args)}: no answer within {timeout:g} s") from None
        if result.returncode:
            raise KubectlError(f"{' '.join(args)}: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "-o", "json"))


def revisions(kubectl: Kubectl) -> dict[str, str]:
    """Each of our Deployments and its current revision (the controller's annotation)."""
    listing = kubectl.json("get", "deployments", "-l", PART_OF)
    return {item["metadata"]["name"]: item["metadata"].get("annotations", {}).get(REVISION, "")
            for item in listing["items"]}


def statefulsets(kubectl: Kubectl) -> list[str]:
    return [item["metadata"]["name"] for item in kubectl.json("get", "statefulsets", "-l", PART_OF)["items"]]


def wait_for_rollouts(kubectl: Kubectl, deployments: list[str], timeout_s: float, say: Callable[[str], None]) -> None:
    """Waits for each rollout in turn; raises naming the first that does not finish."""
    for kind, name in [("deployment", n) for n in deployments] + [("statefulset", n) for n in statefulsets(kubectl)]:
        say(f"waiting for {kind}/{name}")
        try:
            kubectl.run("rollout", "status", f"{kind}/{name}", f"--timeout={int(timeout_s)}s", timeout=timeout_s + 30)
        except KubectlError as error:
            raise RolloutFailed(name, str(error)) from None


class RolloutFailed(RuntimeError):
    def __init__(self, workload: str, reason: str) -> None:
        super().__init__(f"{workload}: {reason}")
        self.workload = workload


def check_health(kubectl: Kubectl, attempts: int, interval_s: float, say: Callable[[str], None]) -> None:
    """GET /healthz on the Envoy Service through the API server's proxy (no port-forward needed)."""
    path = f"/api/v1/namespaces/{kubectl.namespace}/services/http:envoy:http/proxy/healthz"
    for attempt in range(1, attempts + 1):
        try:
            kubectl.run("get", "--raw", path, timeout=30)
            say("healthz: ok through Envoy")
            return
        except KubectlError as error:
            if attempt == attempts:
                raise RolloutFailed("envoy", f"/healthz through Envoy still failing: {error}") from None
            time.sleep(interval_s)


def explain(kubectl: Kubectl, workload: str, say: Callable[[str], None]) -> None:
    """Prints the namespace's latest warning events and the last log lines of the workload's first pod that is
    not ready (its previous run too when it restarted)."""
    try:
        events = kubectl.run("get", "events", "--field-selector", "type=Warning", "--sort-by=.lastTimestamp")
        say("recent warning events:\n" + "\n".join(events.strip().splitlines()[-EVENT_LINES:]))
        pods = kubectl.json("get", "pods", "-l", f"app.kubernetes.io/name={workload}")["items"]
    except KubectlError as error:
        say(f"(could not read events or pods: {error})")
        return
    for pod in pods:
        statuses = pod.get("status", {}).get("containerStatuses", [])
        if statuses and all(status.get("ready") for status in statuses):
            continue
        name = pod["metadata"]["name"]
        restarted = any(status.get("restartCount", 0) for status in statuses)
        try:
            logs = kubectl.run("logs", f"pod/{name}", "--all-containers", f"--tail={LOG_LINES}",
                               *(["--previous"] if restarted else []))
        except KubectlError as error:
            logs = f"(no logs: {error})"
        say(f"last log lines of pod/{name}{' (previous run)' if restarted else ''}:\n{logs.rstrip()}")
        return


def undo(kubectl: Kubectl, deployments: list[str], timeout_s: float, say: Callable[[str], None]) -> bool:
    """`rollout undo` for each Deployment, then waits for them; True when every one came back."""
    ok = True
    for name in deployments:
        try:
            kubectl.run("rollout", "undo", f"deployment/{name}")
            say(f"rolled back deployment/{name}")
        except KubectlError as error:
            say(f"could not roll back deployment/{name}: {error}")
            ok = False
    try:
        wait_for_rollouts(kubectl, deployments, timeout_s, say)
    except RolloutFailed as error:
        say(f"rollback did not finish: {error}")
        ok = False
    return ok


def deploy(kubectl: Kubectl, overlay: str, timeout_s: float, health_attempts: int = 12, health_interval_s: float = 5,
           say: Callable[[str], None] = print) -> int:
    """Applies the overlay; 0 when every rollout finished and /healthz answers, else explains, undoes the
    Deployments this apply changed and returns 1."""
    before = revisions(kubectl)
    say(f"applying {overlay} to namespace {kubectl.namespace}")
    kubectl.run("apply", "-k", overlay)
    deployments = sorted(revisions(kubectl))
    try:
        wait_for_rollouts(kubectl, deployments, timeout_s, say)
        check_health(kubectl, health_attempts, health_interval_s, say)
    except RolloutFailed as failure:
        say(f"deploy FAILED: {failure}")
        explain(kubectl, failure.workload, say)
        after = revisions(kubectl)
        changed = [name for name in deployments if name in before and after.get(name) != before[name]]
        created = [name for name in deployments if name not in before]
        if created:
            say(f"first deploy of {', '.join(created)}: nothing to roll back to (kubectl delete -k {overlay} removes it)")
        if changed:
            say(f"rolling back {', '.join(changed)}")
            undo(kubectl, changed, timeout_s, say)
        return 1
    say("deploy ok")
    return 0


def rollback(kubectl: Kubectl, timeout_s: float, health_attempts: int = 12, health_interval_s: float = 5,
             say: Callable[[str], None] = print) -> int:
    """Undoes the last rollout of each of our Deployments, waits for them and checks /healthz."""
    deployments = sorted(revisions(kubectl))
    if not deployments:
        say(f"no superwav2lip Deployments in namespace {kubectl.namespace}")
        return 1
    if not undo(kubectl, deployments, timeout_s, say):
        return 1
    try:
        check_health(kubectl, health_attempts, health_interval_s, say)
    except RolloutFailed as failure:
        say(f"rollback finished but {failure}")
        return 1
    say("rollback ok")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["deploy", "rollback"])
    parser.add_argument("--overlay", default="deploy/k8s/overlays/gpu", help="kustomize overlay folder (deploy)")
    parser.add_argument("--namespace", default="superwav2lip")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl to run (default: the one on PATH)")
    parser.add_argument("--timeout-s", type=float, default=900, help="longest wait per rollout (model warm-up "
                                                                      "and TensorRT builds are slow)")
    parser.add_argument("--health-attempts", type=int, default=12)
    parser.add_argument("--health-interval-s", type=float, default=5)
    args = parser.parse_args(argv)
    kubectl = Kubectl(args.kubectl, args.namespace, args.context)
    try:
        if args.action == "deploy":
            code = deploy(kubectl, args.overlay, args.timeout_s, args.health_attempts, args.health_interval_s)
        else:
            code = rollback(kubectl, args.timeout_s, args.health_attempts, args.health_interval_s)
    except (KubectlError, FileNotFoundError) as error:
        print(f"{args.action} FAILED: {error}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
