"""`fv k8s`: the manifests are valid Kubernetes 1.30 objects (strict, offline) and keep what a fleet relies on.

kubernetes-validate checks every object against the API server's JSON schemas
(strict: an unknown field is an error) without a cluster. No cluster can be run on
these machines, so what a cluster does with the objects (scheduling, probes,
NetworkPolicy enforcement) is argued in fv_serving/k8s.py, not tested here. The
objects checked are the ones parsed back from the written YAML: what an operator
applies is what is validated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fv_serving.cli.main import main
from fv_serving.errors import InvalidInputError
from fv_serving.k8s import (
    ADMIN_PORT,
    FLEET_FILE,
    KUBERNETES_VERSION,
    OPERATOR_LABEL,
    PUBLIC_PORT,
    SWITCH_FILE,
    TERMINATION_GRACE_S,
    TRITON_DRAIN_S,
    TRITON_HTTP_PORT,
    Device,
    K8sSettings,
    render,
    write_manifests,
)
from fv_serving.triton.control import KEY_ENV
from fv_serving.triton.flags import DEFAULT_HOST, EXIT_TIMEOUT_S, ServerFlags

REPO = "s3://fleet-bucket/fv/mnist"
NAME, NAMESPACE, REPLICAS = "mnist", "serving", 3
BUILT_IN = ("ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy")


def make(device: Device = "cpu", **kwargs: Any) -> K8sSettings:
    return K8sSettings(name=NAME, namespace=NAMESPACE, replicas=REPLICAS, repository=REPO, device=device, **kwargs)


def written(settings: K8sSettings, out: Path) -> list[dict[str, Any]]:
    """The objects as an operator gets them: written, then parsed back."""
    return [doc for path in write_manifests(settings, out) for doc in yaml.safe_load_all(path.read_text())]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_template(objects: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """(labels the serving pods carry, their pod spec), from the Deployment or the InferenceService."""
    kinds = {o["kind"] for o in objects}
    if "Deployment" in kinds:
        template = one(objects, "Deployment")["spec"]["template"]
        return template["metadata"]["labels"], template["spec"]
    predictor = dict(one(objects, "InferenceService")["spec"]["predictor"])
    for key in ("minReplicas", "maxReplicas", "deploymentStrategy"):
        predictor.pop(key)
    return {"serving.kserve.io/inferenceservice": NAME}, predictor  # the label KServe puts on its pods


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in container.items() if k.endswith("Probe")}


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


@pytest.fixture(params=["cpu", "gpu"])
def device(request: pytest.FixtureRequest) -> Device:
    return request.param


@pytest.fixture
def objects(device: Device, tmp_path: Path) -> list[dict[str, Any]]:
    return written(make(device), tmp_path)


# -- schema validation ------------------------------------------------------------------------------


def test_cpu_and_gpu_manifests_are_valid_kubernetes_strict(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    assert [o["kind"] for o in objects] == [*BUILT_IN, "Job"]
    for obj in objects:
        assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == "1.30"
    assert [o["kind"] for o in yaml.safe_load_all((tmp_path / SWITCH_FILE).read_text())] == ["Job"]


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("a container field", lambda d: _rename(d["spec"]["template"]["spec"]["containers"][0], "readinessProbe")),
        ("the rolling update", lambda d: _rename(d["spec"]["strategy"]["rollingUpdate"], "maxUnavailable")),
        ("the pod's security", lambda d: _rename(d["spec"]["template"]["spec"]["securityContext"], "runAsNonRoot")),
        ("a wrong type", lambda d: d["spec"].__setitem__("replicas", "3")),
    ],
)
def test_the_validator_refuses_a_misspelled_field(where: str, mutate: Any, tmp_path: Path) -> None:
    deployment = one(written(make("gpu"), tmp_path), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _rename(mapping: dict[str, Any], key: str) -> None:
    """A typo a reviewer could miss: one letter dropped."""
    mapping[key[:-2] + key[-1]] = mapping.pop(key)


def test_kserve_variant_validates_except_the_custom_resource(tmp_path: Path) -> None:
    objects = written(make("gpu", kserve=True), tmp_path)
    assert "Deployment" not in {o["kind"] for o in objects} and "Service" not in {o["kind"] for o in objects}
    isvc = one(objects, "InferenceService")
    # kubernetes-validate has no schema for custom resources (the CLI only warns): validate the pod part as a Pod.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(isvc, KUBERNETES_VERSION, strict=True)
    labels, pod = pod_template(objects)
    as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": NAME, "labels": labels}, "spec": pod}
    kubernetes_validate.validate(as_pod, KUBERNETES_VERSION, strict=True)
    for obj in objects:
        if obj is not isvc:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == REPLICAS
    assert predictor["deploymentStrategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # KServe's Service targets kserve-container and every port it declares: the admin port is not declared.
    assert [p["containerPort"] for p in containers(pod)["kserve-container"]["ports"]] == [PUBLIC_PORT]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = one(objects, kind)["spec"].get("selector") or one(objects, kind)["spec"]["podSelector"]
        assert selector["matchLabels"] == labels
    command = one(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--kube-selector") + 1] == f"serving.kserve.io/inferenceservice={NAME}"


# -- the properties a fleet relies on ---------------------------------------------------------------


def test_the_service_exposes_only_the_gateways_public_port(objects: list[dict[str, Any]]) -> None:
    service = one(objects, "Service")
    labels, pod = pod_template(objects)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["port"] == PUBLIC_PORT
    [target] = [
        (c["name"], p["containerPort"])
        for c in pod["containers"]
        for p in c.get("ports", [])
        if p["name"] == port["targetPort"]
    ]
    assert target == ("gateway", PUBLIC_PORT)
    # Triton declares no port at all: it listens on the pod's loopback only.
    assert "ports" not in containers(pod)["triton"]
    assert ADMIN_PORT not in {p["port"] for p in service["spec"]["ports"]}


def test_rolling_updates_never_go_below_n_ready_pods(objects: list[dict[str, Any]]) -> None:
    spec = one(objects, "Deployment")["spec"]
    assert spec["replicas"] == REPLICAS
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["selector"]["matchLabels"] == {"app": NAME}
    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["selector"]["matchLabels"] == {"app": NAME}


def test_probes_go_to_the_gateways_public_port(objects: list[dict[str, Any]]) -> None:
    _, pod = pod_template(objects)
    by_name = containers(pod)
    gateway, triton = probes(by_name["gateway"]), probes(by_name["triton"])
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": PUBLIC_PORT}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": PUBLIC_PORT}
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": PUBLIC_PORT}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= make().startup_timeout_s
    assert gateway["livenessProbe"] == {"tcpSocket": {"port": PUBLIC_PORT}, "periodSeconds": 10, "failureThreshold": 3}
    # The kubelet cannot reach Triton's loopback port: no probe may aim at it.
    ports = [(p.get("httpGet") or p["tcpSocket"])["port"] for c in by_name.values() for p in probes(c).values()]
    assert ports and set(ports) == {PUBLIC_PORT}
    assert "startupProbe" not in gateway and not probes(by_name["pod-config"])


def test_the_key_comes_only_from_the_secret(device: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "SENTINEL-KEY-not-to-be-inlined")
    objects = written(make(device), tmp_path)
    text = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "SENTINEL" not in text
    assert "restricted-api" not in text and "restricted-protocol" not in text  # the flags are rendered in the pod
    assert not {"Secret", "ConfigMap"} & {o["kind"] for o in objects}
    key_envs = [node for node in walk(objects) if isinstance(node, dict) and node.get("name") == KEY_ENV]
    assert len(key_envs) == 3  # pod-config, the gateway's admin listener, the switch Job
    for env in key_envs:
        assert env == {"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": f"{NAME}-admin-key", "key": KEY_ENV}}}
    _, pod = pod_template(objects)
    by_name = containers(pod)
    assert KEY_ENV in {e["name"] for e in by_name["pod-config"]["env"]}
    assert KEY_ENV not in {e["name"] for e in by_name["triton"]["env"]}  # Triton reads it from its flags file
    # The gateway parses hostile requests: the key (its admin listener checks it) and nothing else.
    assert [e["name"] for e in by_name["gateway"]["env"]] == [KEY_ENV]
    assert by_name["gateway"]["volumeMounts"] == [{"name": "gateway", "mountPath": "/run/fv/gateway"}]
    assert pod["shareProcessNamespace"] is False  # Triton's command line holds the key
    # The flags file (the key among Triton's flags) lives in memory and reaches Triton alone, read-only.
    [flags] = [v for v in pod["volumes"] if v["name"] == "flags"]
    assert flags["emptyDir"]["medium"] == "Memory"
    readers = {n: m for n, c in by_name.items() for m in c.get("volumeMounts", []) if m["name"] == "flags"}
    assert set(readers) == {"pod-config", "triton"}
    assert readers["triton"] == {"name": "flags", "mountPath": "/run/fv/triton-args", "subPath": "triton-args",
                                 "readOnly": True}  # fmt: skip


def test_gpu_resources_only_in_the_gpu_variant(tmp_path: Path) -> None:
    gpu = written(make("gpu"), tmp_path / "gpu")
    _, pod = pod_template(gpu)
    triton = containers(pod)["triton"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for name, container in containers(pod).items():
        if name != "triton":
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
    cpu_text = "".join(p.read_text() for p in write_manifests(make("cpu"), tmp_path / "cpu"))
    assert "nvidia.com/gpu" not in cpu_text


def test_the_switch_job_has_minimal_rbac_and_calls_the_fleet_switch(objects: list[dict[str, Any]]) -> None:
    account = f"{NAME}-fleet-switch"
    assert not {"ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in objects}
    role = one(objects, "Role")
    assert role["metadata"] == {**role["metadata"], "name": account, "namespace": NAMESPACE}
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert one(objects, "ServiceAccount")["metadata"]["name"] == account
    job = one(objects, "Job")
    assert job["metadata"]["generateName"] == f"{account}-" and "name" not in job["metadata"]
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account and pod["restartPolicy"] == "Never"
    [switch] = pod["containers"]
    assert switch["command"] == [
        "fv", "switch", "--repository", REPO, "--kube-selector", f"app={NAME}", "--namespace", NAMESPACE,
        "--admin-port", str(ADMIN_PORT), "--vector", "/vectors/vector.safetensors",
    ]  # fmt: skip
    assert {"name": "vector", "configMap": {"name": f"{NAME}-switch-vector"}} in pod["volumes"]
    # Only the switch talks to the API server; serving pods get no token.
    _, serving = pod_template(objects)
    assert serving["automountServiceAccountToken"] is False and "serviceAccountName" not in serving


def test_the_admin_port_admits_only_fleet_operators(objects: list[dict[str, Any]]) -> None:
    policy = one(objects, "NetworkPolicy")["spec"]
    labels, _ = pod_template(objects)
    assert policy["podSelector"]["matchLabels"] == {"app": NAME} and policy["policyTypes"] == ["Ingress"]
    rules = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(rules) == {PUBLIC_PORT, ADMIN_PORT}
    assert "from" not in rules[PUBLIC_PORT]  # the public port: anyone the Service serves
    assert rules[ADMIN_PORT]["from"] == [{"podSelector": {"matchLabels": {OPERATOR_LABEL: NAME}}}]
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert job_labels[OPERATOR_LABEL] == NAME and OPERATOR_LABEL not in labels
    assert "app" not in job_labels  # the switch is neither selected by the Service nor switched itself


def test_every_container_runs_unprivileged(objects: list[dict[str, Any]]) -> None:
    pods = [pod_template(objects)[1], one(objects, "Job")["spec"]["template"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for name, container in containers(pod).items():
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"].items() <= container["resources"]["limits"].items(), name


def test_the_pod_follows_the_contract_with_pod_config_and_server_flags(objects: list[dict[str, Any]]) -> None:
    _, pod = pod_template(objects)
    by_name = containers(pod)
    gpu = ["--gpu"] if "nvidia.com/gpu" in str(by_name["triton"]["resources"]) else []
    assert by_name["pod-config"]["command"] == [
        "fv", "fleet", "pod-config", "--repository", REPO, "--out", "/run/fv", "--triton-http-port",
        str(TRITON_HTTP_PORT), "--public-port", str(PUBLIC_PORT), "--admin-port", str(ADMIN_PORT), *gpu,
    ]  # fmt: skip
    assert by_name["triton"]["command"] == ["/bin/sh", "-c", "exec tritonserver $(cat /run/fv/triton-args)"]
    assert by_name["pod-config"]["volumeMounts"][:2] == [
        {"name": "flags", "mountPath": "/run/fv"},
        {"name": "gateway", "mountPath": "/run/fv/gateway"},
    ]
    assert by_name["gateway"]["command"] == ["nginx", "-p", "/run/fv/gateway", "-c", "/run/fv/gateway/nginx.conf"]
    assert len({TRITON_HTTP_PORT, PUBLIC_PORT, ADMIN_PORT}) == 3
    # What pod-config renders from the single source binds Triton to loopback on the port the gateway is told.
    flags = ServerFlags(repository=REPO, models=("unlearned_blue",), http_port=TRITON_HTTP_PORT, grpc_port=8001,
                        metrics_port=8002, admin_key="k").to_args_list()  # fmt: skip
    assert DEFAULT_HOST == "127.0.0.1" and f"--http-address={DEFAULT_HOST}" in flags
    assert f"--http-port={TRITON_HTTP_PORT}" in flags
    # Triton drains for --exit-timeout-secs after its preStop: all within the grace period.
    assert TRITON_DRAIN_S + EXIT_TIMEOUT_S < TERMINATION_GRACE_S == pod["terminationGracePeriodSeconds"]
    for name in ("pod-config", "triton"):
        s3 = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in by_name[name]["env"] if "valueFrom" in e}
        assert {k for k, ref in s3.items() if ref["name"] == f"{NAME}-s3" and not ref.get("optional")} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }


def test_output_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    settings = make("gpu")
    first = [p.read_bytes() for p in write_manifests(settings, tmp_path / "a")]
    again = [p.read_bytes() for p in write_manifests(settings, tmp_path / "a")]
    other = [p.read_bytes() for p in write_manifests(settings, tmp_path / "b")]
    assert first == again == other
    assert b"&id" not in b"".join(first)  # no YAML anchors: every value is read where it applies
    assert written(settings, tmp_path / "c") == render(settings)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([FLEET_FILE, SWITCH_FILE])


@pytest.mark.parametrize(
    "change",
    [
        {"name": "Mnist"},
        {"name": "mnist-"},
        {"name": "m" * 41},
        {"namespace": "Serving"},
        {"replicas": 0},
        {"replicas": True},
        {"repository": "/srv/repository"},
        {"repository": "s3://bucket/with space"},
        {"repository": "s3://bucket/$(id)"},
        {"device": "tpu"},
        {"triton_image": "nvcr.io/nvidia/tritonserver:24.10-py3 --privileged"},
        {"triton_memory": "4 GiB"},
        {"startup_timeout_s": 5},
    ],
)
def test_settings_refuse_what_would_make_a_broken_manifest(change: dict[str, Any]) -> None:
    fields = {"name": NAME, "namespace": NAMESPACE, "replicas": REPLICAS, "repository": REPO, "device": "cpu"}
    with pytest.raises(InvalidInputError):
        K8sSettings(**{**fields, **change})


def test_the_cli_writes_what_render_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["k8s", "--name", NAME, "--namespace", NAMESPACE, "--replicas", str(REPLICAS), "--repository", REPO]
    assert main([*argv, "--gpu", "--triton-memory", "8Gi", "--out", str(tmp_path)]) == 0
    expected = render(make("gpu", triton_memory="8Gi"))
    got = [d for name in (FLEET_FILE, SWITCH_FILE) for d in yaml.safe_load_all((tmp_path / name).read_text())]
    assert got == expected
    printed = capsys.readouterr().out
    assert f"kubectl apply -f {tmp_path}/{FLEET_FILE}" in printed and f"{NAME}-admin-key" in printed
    assert main([*argv, "--cpu", "--repository", "/not/s3", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--cpu", "--gpu", "--out", str(tmp_path)])
    assert refused.value.code == 2
