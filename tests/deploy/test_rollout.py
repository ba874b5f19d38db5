"""`make deploy` and `make rollback` against a recorded fake kubectl (tests/fakes/kubectl).

A fake, because no Kubernetes cluster can exist on these machines: its answers follow the shapes of kubectl's
own output (`-o json` lists with the controller's revision annotation, `rollout status` errors, event tables),
and the tests check the commands issued, their order and the rollback-on-failure path.
"""

import json
import os
import subprocess
import sys

import pytest

from deploy.k8s import rollout

from tests.support.paths import ROOT

FAKE = ROOT / "tests" / "fakes" / "kubectl"
DEPLOYMENTS = ("detector", "enhancer", "envoy", "gateway", "lipsync")


def deployment_list(revisions: dict[str, int]) -> dict:
    items = [{"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": name, "namespace": "superwav2lip",
                           "labels": {"app.kubernetes.io/part-of": "superwav2lip"},
                           "annotations": {"deployment.kubernetes.io/revision": str(revision)}}}
             for name, revision in sorted(revisions.items())]
    return {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}


def ok(stdout: str | dict = "") -> dict:
    return {"stdout": stdout if isinstance(stdout, str) else json.dumps(stdout), "rc": 0}


def fail(stderr: str) -> dict:
    return {"stderr": stderr, "rc": 1}


BEFORE = deployment_list({name: 3 for name in DEPLOYMENTS})
# The apply changed the gateway's and lipsync's pod templates: the controller made new revisions.
AFTER = deployment_list({**{name: 3 for name in DEPLOYMENTS}, "gateway": 4, "lipsync": 4})
STATEFULSETS = {"apiVersion": "v1", "kind": "List", "items": [{"kind": "StatefulSet", "metadata": {"name": "redis"}}]}
EVENTS = ("LAST SEEN   TYPE      REASON      OBJECT                         MESSAGE\n"
          "12s         Warning   BackOff     pod/lipsync-7d9f8-abcde        Back-off restarting failed container "
          "lipsync in pod lipsync-7d9f8-abcde\n")
NOT_READY_POD = {"apiVersion": "v1", "kind": "List", "items": [
    {"metadata": {"name": "lipsync-6c4b2-old11"}, "status": {"containerStatuses": [{"ready": True, "restartCount": 0}]}},
    {"metadata": {"name": "lipsync-7d9f8-abcde"},
     "status": {"containerStatuses": [{"ready": False, "restartCount": 4}]}},
]}
CRASH_LOG = ('{"level": "ERROR", "message": "cannot start: wav2lip_gan.onnx: sha256 0badc0de does not match the '
             'manifest", "service": "lipsync"}\n')


def scenario(*rules) -> dict:
    return {"rules": [{"match": match, "outputs": outputs} for match, outputs in rules]}


def run_fake(tmp_path, rules, *args):
    scenario_path = tmp_path / "scenario.json"
    scenario_path.write_text(json.dumps(scenario(*rules)))
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, FAKE_KUBECTL_SCENARIO=str(scenario_path), FAKE_KUBECTL_LOG=str(log))
    result = subprocess.run([sys.executable, "-m", "deploy.k8s.rollout", *args, "--kubectl", str(FAKE),
                             "--health-interval-s", "0", "--health-attempts", "3", "--timeout-s", "60"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def verbs(calls):
    """Each call without the namespace flags, as one string."""
    return [" ".join(arg for arg in call[2:]) for call in calls]


COMMON = [
    (["get", "deployments"], [ok(BEFORE), ok(AFTER)]),
    (["apply", "-k"], [ok("deployment.apps/lipsync configured\n")]),
    (["get", "statefulsets"], [ok(STATEFULSETS)]),
]


def test_a_good_deploy_applies_waits_for_every_rollout_then_checks_health_through_envoy(tmp_path):
    result, calls = run_fake(tmp_path, COMMON + [
        (["rollout", "status"], [ok('deployment "x" successfully rolled out\n')]),
        (["get", "--raw"], [fail("Error from server (ServiceUnavailable): the server is currently unable"), ok("")]),
    ], "deploy", "--overlay", "deploy/k8s/overlays/cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(call[:2] == ["-n", "superwav2lip"] for call in calls)
    assert verbs(calls) == [
        "get deployments -l app.kubernetes.io/part-of=superwav2lip -o json",
        "apply -k deploy/k8s/overlays/cpu",
        "get deployments -l app.kubernetes.io/part-of=superwav2lip -o json",
        "get statefulsets -l app.kubernetes.io/part-of=superwav2lip -o json",
        *[f"rollout status deployment/{name} --timeout=60s" for name in DEPLOYMENTS],
        "rollout status statefulset/redis --timeout=60s",
        "get --raw /api/v1/namespaces/superwav2lip/services/http:envoy:http/proxy/healthz",
        "get --raw /api/v1/namespaces/superwav2lip/services/http:envoy:http/proxy/healthz",
    ]
    assert "deploy ok" in result.stdout and not any("undo" in v for v in verbs(calls))


def test_a_failed_rollout_says_why_and_undoes_only_what_this_deploy_changed(tmp_path):
    result, calls = run_fake(tmp_path, COMMON + [
        (["rollout", "status", "deployment/lipsync"],
         [fail('error: deployment "lipsync" exceeded its progress deadline\n'), ok("rolled out\n")]),
        (["rollout", "status"], [ok("rolled out\n")]),
        (["get", "events"], [ok(EVENTS)]),
        (["get", "pods"], [ok(NOT_READY_POD)]),
        (["logs"], [ok(CRASH_LOG)]),
        (["rollout", "undo"], [ok("deployment.apps/x rolled back\n")]),
    ], "deploy", "--overlay", "deploy/k8s/overlays/gpu")
    issued = verbs(calls)
    assert result.returncode == 1
    assert "deploy FAILED: lipsync" in result.stdout and "exceeded its progress deadline" in result.stdout
    assert "Back-off restarting failed container lipsync" in result.stdout  # the warning events
    assert "sha256 0badc0de does not match the manifest" in result.stdout  # the failing pod's last log lines
    assert "get pods -l app.kubernetes.io/name=lipsync -o json" in issued
    assert "logs pod/lipsync-7d9f8-abcde --all-containers --tail=40 --previous" in issued  # not the ready old pod
    assert [v for v in issued if v.startswith("rollout undo")] == ["rollout undo deployment/gateway",
                                                                  "rollout undo deployment/lipsync"]
    # The waits stopped at the failure (Redis's was never reached); the undone ones were waited for after.
    first_undo = issued.index("rollout undo deployment/gateway")
    assert [v for v in issued[:first_undo] if v.startswith("rollout status")] == [
        f"rollout status deployment/{name} --timeout=60s" for name in DEPLOYMENTS]
    assert issued[first_undo + 2:first_undo + 4] == ["get statefulsets -l app.kubernetes.io/part-of=superwav2lip -o json",
                                                    "rollout status deployment/gateway --timeout=60s"]
    assert not any(v.startswith("get --raw") for v in issued)


def test_failing_health_after_the_rollouts_also_rolls_back(tmp_path):
    result, calls = run_fake(tmp_path, COMMON + [
        (["rollout", "status"], [ok("rolled out\n")]),
        (["get", "--raw"], [fail('Error from server (ServiceUnavailable): no endpoints available for service '
                                 '"http:envoy:http"')]),
        (["get", "events"], [ok("No resources found\n")]),
        (["get", "pods"], [ok({"items": []})]),
        (["rollout", "undo"], [ok("rolled back\n")]),
    ], "deploy", "--overlay", "deploy/k8s/overlays/gpu")
    issued = verbs(calls)
    assert result.returncode == 1
    assert "/healthz through Envoy still failing" in result.stdout and "no endpoints available" in result.stdout
    assert sum(v.startswith("get --raw") for v in issued) == 3  # --health-attempts
    assert [v for v in issued if v.startswith("rollout undo")] == ["rollout undo deployment/gateway",
                                                                  "rollout undo deployment/lipsync"]


def test_a_failed_first_deploy_has_nothing_to_undo_and_says_how_to_remove_it(tmp_path):
    result, calls = run_fake(tmp_path, [
        (["get", "deployments"], [ok(deployment_list({})), ok(deployment_list({n: 1 for n in DEPLOYMENTS}))]),
        (["apply", "-k"], [ok("namespace/superwav2lip created\n")]),
        (["get", "statefulsets"], [ok(STATEFULSETS)]),
        (["rollout", "status", "deployment/detector"], [fail("error: timed out waiting for the condition\n")]),
        (["get", "events"], [ok(EVENTS)]),
        (["get", "pods"], [ok({"items": []})]),
    ], "deploy", "--overlay", "deploy/k8s/overlays/cpu")
    assert result.returncode == 1
    assert "nothing to roll back to" in result.stdout and "kubectl delete -k deploy/k8s/overlays/cpu" in result.stdout
    assert not any(v.startswith("rollout undo") for v in verbs(calls))


def test_rollback_undoes_every_deployment_waits_and_checks_health(tmp_path):
    result, calls = run_fake(tmp_path, [
        (["get", "deployments"], [ok(AFTER)]),
        (["get", "statefulsets"], [ok(STATEFULSETS)]),
        (["rollout", "undo"], [ok("rolled back\n")]),
        (["rollout", "status"], [ok("rolled out\n")]),
        (["get", "--raw"], [ok("")]),
    ], "rollback", "--context", "prod-east")
    issued = verbs(calls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(call[:4] == ["--context", "prod-east", "-n", "superwav2lip"] for call in calls)
    issued = [" ".join(call[4:]) for call in calls]
    assert [v for v in issued if v.startswith("rollout undo")] == [f"rollout undo deployment/{n}" for n in DEPLOYMENTS]
    assert issued.index("rollout undo deployment/lipsync") < issued.index("rollout status deployment/detector "
                                                                         "--timeout=60s")
    assert issued[-1].startswith("get --raw") and "rollback ok" in result.stdout


def test_rollback_with_nothing_deployed_fails_plainly(tmp_path):
    result, _ = run_fake(tmp_path, [(["get", "deployments"], [ok(deployment_list({}))])], "rollback")
    assert result.returncode == 1 and "no superwav2lip Deployments in namespace superwav2lip" in result.stdout


def test_an_unreachable_cluster_is_reported_without_a_traceback(tmp_path):
    result, _ = run_fake(tmp_path, [(["get"], [fail("The connection to the server localhost:8080 was refused")])],
                         "deploy", "--overlay", "deploy/k8s/overlays/cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "deploy FAILED" in result.stderr and "connection to the server localhost:8080 was refused" in result.stderr


@pytest.mark.parametrize("target,expected", [("deploy", "apply -k deploy/k8s/overlays/cpu"),
                                             ("rollback", "rollout undo deployment/detector")])
def test_make_targets_pass_the_overlay_and_kubectl_through(tmp_path, target, expected):
    scenario_path = tmp_path / "scenario.json"
    scenario_path.write_text(json.dumps(scenario(
        (["get", "deployments"], [ok(BEFORE)]), (["get", "statefulsets"], [ok({"items": []})]),
        (["apply"], [ok()]), (["rollout"], [ok()]), (["get", "--raw"], [ok()]))))
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, FAKE_KUBECTL_SCENARIO=str(scenario_path), FAKE_KUBECTL_LOG=str(log))
    result = subprocess.run(["make", "-s", target, "OVERLAY=cpu", f"KUBECTL={FAKE}", f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in verbs([json.loads(line) for line in log.read_text().splitlines()])


def test_kubectl_errors_carry_the_command_and_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KUBECTL_SCENARIO", str(tmp_path / "s.json"))
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(tmp_path / "log"))
    (tmp_path / "s.json").write_text(json.dumps(scenario((["get"], [fail("forbidden: User cannot list")]))))
    with pytest.raises(rollout.KubectlError, match="get deployments .*forbidden: User cannot list"):
        rollout.revisions(rollout.Kubectl(binary=str(FAKE)))
