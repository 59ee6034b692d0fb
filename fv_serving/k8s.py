"""Kubernetes manifests of a fleet: N pods of Triton + gateway on one S3 repository, and the switch Job.

`render(settings)` is pure (settings in, a list of Kubernetes objects as dicts out, the
same every time); `write_manifests` writes them as YAML, atomically. What a pod is,
and why:

  init container  `fv fleet pod-config` (gateway image) reads fleet.json from the
                  repository (the live colour) and the key, and writes Triton's flags
                  (`/run/fv/triton-args`, rendered by fv_serving.triton.flags.ServerFlags
                  at run time, so no tritonserver flag is written here) into a
                  memory-backed emptyDir (the key never touches the node's disk), and
                  the gateway's nginx.conf into the gateway's own emptyDir
                  (`/run/fv/gateway/`).
  triton          NVIDIA's image, on the pod's loopback only. It sees only the
                  triton-args file (subPath mount), a /tmp emptyDir (Triton copies each
                  S3 model there on load) and the S3 credentials.
  gateway         nginx; the only ports beyond loopback: 8080 public (health and the
                  public models), 8081 admin (the route flip and the locked operator
                  APIs a fleet switch calls, each checked against $FV_ADMIN_KEY, so the
                  key is in its environment). It sees its own volume only: not the
                  flags file, not the S3 credentials, not Triton's /proc (no shared
                  process namespace). The volume outlives a restart of the container,
                  so a restarted gateway finds the routes the last flip wrote there.

Init containers run once per pod, not per container restart: a triton or gateway
container that restarts reuses what pod-config rendered when the pod started (see the
fleet runtime for what that means after a switch).

Probes go to the gateway's public port, because the kubelet cannot reach Triton on
loopback: readiness (/v2/health/ready) on the gateway container, so a pod leaves the
Service as soon as either process cannot serve; the startup probe (slow model loads)
and liveness (/v2/health/live) on the triton container, so that a hung Triton is the
container restarted. A gateway that dies exits (nginx master) and is restarted; its
own liveness is a TCP check that does not depend on Triton.

The Service exposes only the public port; a NetworkPolicy admits the admin port only
from pods labelled as this fleet's operators (the switch Job), and the admin APIs
still need the key. Rolling updates never go below N ready pods (maxUnavailable 0,
maxSurge 1). The switch Job runs `fv switch` (on the fleet repository) under a ServiceAccount that may
only list pods in the namespace (how it finds every replica). The two Secrets are
created by the operator (`secret_commands`); no secret value is ever rendered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fv_serving import __version__
from fv_serving.atomic import write_bytes_atomic
from fv_serving.errors import InvalidInputError
from fv_serving.triton.control import KEY_ENV
from fv_serving.triton.flags import EXIT_TIMEOUT_S

Device = Literal["cpu", "gpu"]
DEVICES: tuple[Device, ...] = ("cpu", "gpu")

#: NVIDIA's container with Triton 2.51, the release this project's serving is measured on.
DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: The image deploy/Dockerfile builds: nginx + Lua for the gateway, `fv` for pod-config and the switch.
DEFAULT_GATEWAY_IMAGE = f"fv-serving-gateway:{__version__}"
#: The Kubernetes release whose schemas the manifests are validated against (tests/test_k8s.py).
KUBERNETES_VERSION = "1.30.0"

# The ports of the contract between these manifests and `fv fleet pod-config`.
PUBLIC_PORT = 8080
ADMIN_PORT = 8081
#: Triton's HTTP port on the pod's loopback (gRPC and metrics stay on pod-config's defaults, loopback too).
TRITON_HTTP_PORT = 8000
RUN_DIR = "/run/fv"
TRITON_ARGS = f"{RUN_DIR}/triton-args"
GATEWAY_DIR = f"{RUN_DIR}/gateway"
VECTOR_DIR = "/vectors"
#: The ConfigMap key (and file name under VECTOR_DIR) of the vector a switch Job installs.
VECTOR_KEY = "vector.safetensors"

#: uid/gid of the `triton-server` user of NVIDIA's image; deploy/Dockerfile gives the gateway image the same.
#: One uid for the pod: the init container writes the flags Triton reads; the mounts, not the uids,
#: keep the gateway away from them.
POD_UID = 1000
#: Label of the pods allowed to reach the admin port; its value is the fleet's name.
OPERATOR_LABEL = "fv-serving/fleet-operator"
#: The label KServe puts on every pod of an InferenceService.
KSERVE_POD_LABEL = "serving.kserve.io/inferenceservice"
#: Keys of the S3 Secret; AWS_ENDPOINT_URL (an S3-compatible store) is optional.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
S3_ENDPOINT_KEY = "AWS_ENDPOINT_URL"

STARTUP_PERIOD_S = 10
#: preStop sleeps: endpoints drop a terminating pod asynchronously, so the gateway keeps serving
#: this long before nginx's graceful stop (SIGQUIT, the image's STOPSIGNAL), and Triton longer,
#: so that requests the gateway is finishing still have a server behind them.
GATEWAY_DRAIN_S = 5
TRITON_DRAIN_S = GATEWAY_DRAIN_S + 5
#: Triton drains for EXIT_TIMEOUT_S after its SIGTERM; the rest is room before the kubelet's SIGKILL.
TERMINATION_GRACE_S = TRITON_DRAIN_S + EXIT_TIMEOUT_S + 15
#: A switch loads a model on every replica and checks it: minutes, not hours; a stuck one is ended.
SWITCH_DEADLINE_S = 1800
#: Finished switch Jobs (and their logs) are kept a day.
SWITCH_TTL_S = 86400

# Names: DNS-1035 labels (Services need them). 40 characters leave room for every suffix below.
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# The repository reaches Triton through a word-split shell line (`$(cat triton-args)`): no whitespace.
_S3_URL = re.compile(r"s3://[A-Za-z0-9][^\s\"'\\$`]*")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
# Kubernetes resource quantities (what the API server accepts; the schema does not check them).
_QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei|[eE]\d+)?")


@dataclass(frozen=True)
class K8sSettings:
    """Everything that decides the manifests of one fleet; validated here, so `render` cannot fail.

    `repository` is the S3 repository of `fv triton build` (built with `--runtime
    onnxruntime`: NVIDIA's image has Triton's ORT backend, not the python package the
    embedded ORT runner needs; add `--device gpu` for `device="gpu"`). Resource values
    are Kubernetes quantities; requests equal limits (Guaranteed QoS: a serving pod is
    the last one the kubelet evicts under memory pressure).
    """

    name: str
    namespace: str
    replicas: int
    repository: str
    device: Device
    triton_image: str = DEFAULT_TRITON_IMAGE
    gateway_image: str = DEFAULT_GATEWAY_IMAGE
    kserve: bool = False
    triton_cpu: str = "2"
    triton_memory: str = "4Gi"
    gateway_cpu: str = "500m"
    gateway_memory: str = "256Mi"
    switch_cpu: str = "1"
    switch_memory: str = "1Gi"
    #: Longest time a pod may take to load its models (S3 download, cold GPU) before it is restarted.
    startup_timeout_s: int = 600

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidInputError(
                "K8sSettings.name must be 1-40 lowercase letters, digits or '-', starting with a letter and "
                f"not ending with '-' (it names the Service and prefixes every object), got {self.name!r}"
            )
        if not isinstance(self.namespace, str) or not _NAMESPACE.fullmatch(self.namespace):
            raise InvalidInputError(
                f"K8sSettings.namespace must be a DNS label (lowercase letters, digits, '-'), got {self.namespace!r}"
            )
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or not 1 <= self.replicas <= 1000:
            raise InvalidInputError(f"K8sSettings.replicas must be an integer in [1, 1000], got {self.replicas!r}")
        if not isinstance(self.repository, str) or not _S3_URL.fullmatch(self.repository):
            raise InvalidInputError(
                "K8sSettings.repository must be an s3://BUCKET/PREFIX URL without whitespace or quotes "
                f"(every pod reads the same repository), got {self.repository!r}"
            )
        if self.device not in DEVICES:
            raise InvalidInputError(f"K8sSettings.device must be one of {DEVICES}, got {self.device!r}")
        for field in ("triton_image", "gateway_image"):
            value = getattr(self, field)
            if not isinstance(value, str) or not _IMAGE.fullmatch(value):
                raise InvalidInputError(f"K8sSettings.{field} must be an image reference, got {value!r}")
        for field in ("triton_cpu", "triton_memory", "gateway_cpu", "gateway_memory", "switch_cpu", "switch_memory"):
            value = getattr(self, field)
            if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
                raise InvalidInputError(
                    f"K8sSettings.{field} must be a Kubernetes quantity such as 500m, 2 or 4Gi, got {value!r}"
                )
        timeout = self.startup_timeout_s
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 30 <= timeout <= 24 * 3600:
            raise InvalidInputError(f"K8sSettings.startup_timeout_s must be seconds in [30, 86400], got {timeout!r}")

    # names derived from the fleet's name, so that several fleets share a namespace

    @property
    def admin_secret(self) -> str:
        return f"{self.name}-admin-key"

    @property
    def s3_secret(self) -> str:
        return f"{self.name}-s3"

    @property
    def vector_configmap(self) -> str:
        return f"{self.name}-switch-vector"

    @property
    def switch_name(self) -> str:
        return f"{self.name}-fleet-switch"

    @property
    def pod_selector(self) -> dict[str, str]:
        """The labels that select this fleet's serving pods (KServe sets its own on an InferenceService's pods)."""
        return {KSERVE_POD_LABEL: self.name} if self.kserve else {"app": self.name}

    @property
    def kube_selector(self) -> str:
        """`pod_selector` as a label-selector string, what `fv switch --kube-selector` takes."""
        return ",".join(f"{k}={v}" for k, v in self.pod_selector.items())


# -- rendering --------------------------------------------------------------------------------------


def render(settings: K8sSettings) -> list[dict[str, Any]]:
    """Every object of the fleet, in apply order; the switch Job is last (created per switch, not applied)."""
    s = settings
    return [
        _service_account(s),
        _role(s),
        _role_binding(s),
        *([_inference_service(s)] if s.kserve else [_deployment(s), _service(s)]),
        _disruption_budget(s),
        _network_policy(s),
        switch_job(s),
    ]


def _labels(s: K8sSettings, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fv-serving",
        "app.kubernetes.io/instance": s.name,
        "app.kubernetes.io/component": component,
    }


def _metadata(s: K8sSettings, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": s.namespace, "labels": _labels(s, component)}


def _secret_env(name: str, secret: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": name}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _s3_env(s: K8sSettings) -> list[dict[str, Any]]:
    return [
        *(_secret_env(key, s.s3_secret) for key in S3_SECRET_KEYS),
        _secret_env(S3_ENDPOINT_KEY, s.s3_secret, optional=True),
    ]


def _home_env() -> dict[str, str]:
    """Python (boto3, the kubernetes client) and CUDA keep caches under $HOME; the root filesystem is read-only."""
    return {"name": "HOME", "value": "/tmp"}


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_UID,
        "fsGroup": POD_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: str, memory: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    requests = {"cpu": cpu, "memory": memory}
    return {"requests": dict(requests), "limits": {**requests, **(extra or {})}}


def _http_probe(path: str, *, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PUBLIC_PORT},
        "periodSeconds": period_s,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _pre_stop_sleep(seconds: int) -> dict[str, Any]:
    return {"preStop": {"exec": {"command": ["sleep", str(seconds)]}}}


def pod_config_args(settings: K8sSettings) -> list[str]:
    """The init container's command: the contract with `fv fleet pod-config`."""
    gpu = ["--gpu"] if settings.device == "gpu" else []
    return [
        "fv",
        "fleet",
        "pod-config",
        "--repository",
        settings.repository,
        "--out",
        RUN_DIR,
        "--triton-http-port",
        str(TRITON_HTTP_PORT),
        "--public-port",
        str(PUBLIC_PORT),
        "--admin-port",
        str(ADMIN_PORT),
        *gpu,
    ]


def switch_args(settings: K8sSettings) -> list[str]:
    """The switch Job's command: `fv switch` on a fleet repository, its pods found by label."""
    return [
        "fv",
        "switch",
        "--repository",
        settings.repository,
        "--kube-selector",
        settings.kube_selector,
        "--namespace",
        settings.namespace,
        "--admin-port",
        str(ADMIN_PORT),
        "--vector",
        f"{VECTOR_DIR}/{VECTOR_KEY}",
    ]


def _init_container(s: K8sSettings) -> dict[str, Any]:
    return {
        "name": "pod-config",
        "image": s.gateway_image,
        "command": pod_config_args(s),
        "env": [_secret_env(KEY_ENV, s.admin_secret), *_s3_env(s), _home_env()],
        "resources": _resources(s.gateway_cpu, s.gateway_memory),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "flags", "mountPath": RUN_DIR},
            {"name": "gateway", "mountPath": GATEWAY_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _triton_container(s: K8sSettings) -> dict[str, Any]:
    gpu = {"nvidia.com/gpu": 1} if s.device == "gpu" else None
    return {
        "name": "triton",
        "image": s.triton_image,
        # The flags are one line written by pod-config (fv_serving.triton.flags.ServerFlags); the key among them.
        "command": ["/bin/sh", "-c", f"exec tritonserver $(cat {TRITON_ARGS})"],
        "env": [*_s3_env(s), _home_env()],
        "resources": _resources(s.triton_cpu, s.triton_memory, gpu),
        "securityContext": _container_security(),
        "startupProbe": _http_probe(
            "/v2/health/ready", period_s=STARTUP_PERIOD_S, failures=math.ceil(s.startup_timeout_s / STARTUP_PERIOD_S)
        ),
        "livenessProbe": _http_probe("/v2/health/live", period_s=10, failures=3),
        "lifecycle": _pre_stop_sleep(TRITON_DRAIN_S),
        "volumeMounts": [
            {"name": "flags", "mountPath": TRITON_ARGS, "subPath": "triton-args", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _gateway_container(s: K8sSettings) -> dict[str, Any]:
    # KServe's Service targets the container it calls kserve-container, and every port that one declares;
    # the admin port is then left undeclared there (the NetworkPolicy, not the declaration, guards it).
    ports = [{"name": "http", "containerPort": PUBLIC_PORT, "protocol": "TCP"}]
    if not s.kserve:
        ports.append({"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"})
    return {
        "name": "kserve-container" if s.kserve else "gateway",
        "image": s.gateway_image,
        # No `-g 'daemon off;'`: the rendered nginx.conf says it, and nginx refuses a duplicate directive.
        "command": ["nginx", "-p", GATEWAY_DIR, "-c", f"{GATEWAY_DIR}/nginx.conf"],
        "env": [_secret_env(KEY_ENV, s.admin_secret)],  # read by the admin listener (`env FV_ADMIN_KEY;`)
        "ports": ports,
        "resources": _resources(s.gateway_cpu, s.gateway_memory),
        "securityContext": _container_security(),
        "readinessProbe": _http_probe("/v2/health/ready", period_s=5, failures=2),
        "livenessProbe": {"tcpSocket": {"port": PUBLIC_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": _pre_stop_sleep(GATEWAY_DRAIN_S),
        "volumeMounts": [{"name": "gateway", "mountPath": GATEWAY_DIR}],
    }


def _pod_spec(s: K8sSettings) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # serving pods never call the API server
        "enableServiceLinks": False,
        "shareProcessNamespace": False,  # Triton's command line holds the key
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": _pod_security(),
        "initContainers": [_init_container(s)],
        "containers": [_gateway_container(s), _triton_container(s)],
        "volumes": [
            # Triton's flags hold the key: in memory, never on the node's disk, never mounted in the gateway.
            {"name": "flags", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            # nginx.conf, the Lua checks, nginx's pid, temp folders and error log.
            {"name": "gateway", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "tmp", "emptyDir": {}},
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": s.pod_selector},
            }
        ],
    }
    if s.device == "gpu":
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def _rolling_update() -> dict[str, Any]:
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def _deployment(s: K8sSettings) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(s, s.name, "server"),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": s.pod_selector},
            "strategy": _rolling_update(),
            "progressDeadlineSeconds": s.startup_timeout_s + 120,
            "template": {
                "metadata": {"labels": {**s.pod_selector, **_labels(s, "server")}},
                "spec": _pod_spec(s),
            },
        },
    }


def _service(s: K8sSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(s, s.name, "server"),
        "spec": {
            "type": "ClusterIP",
            "selector": s.pod_selector,
            "ports": [{"name": "http", "port": PUBLIC_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _inference_service(s: K8sSettings) -> dict[str, Any]:
    """The KServe variant: KServe makes the Deployment and the Service (raw mode: plain Kubernetes objects)."""
    metadata = _metadata(s, s.name, "server")
    metadata["annotations"] = {"serving.kserve.io/deploymentMode": "RawDeployment"}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {
            "predictor": {
                "minReplicas": s.replicas,
                "maxReplicas": s.replicas,
                "deploymentStrategy": _rolling_update(),
                **_pod_spec(s),
            }
        },
    }


def _disruption_budget(s: K8sSettings) -> dict[str, Any]:
    # Drains evict one pod at a time; a budget of 0 would block node maintenance forever.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(s, s.name, "server"),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": s.pod_selector},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",  # a crash-looping pod must not block a drain
        },
    }


def _network_policy(s: K8sSettings) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(s, s.name, "server"),
        "spec": {
            "podSelector": {"matchLabels": s.pod_selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": PUBLIC_PORT}]},
                {
                    "from": [{"podSelector": {"matchLabels": {OPERATOR_LABEL: s.name}}}],
                    "ports": [{"protocol": "TCP", "port": ADMIN_PORT}],
                },
            ],
        },
    }


def _service_account(s: K8sSettings) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(s, s.switch_name, "fleet-switch")}


def _role(s: K8sSettings) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(s, s.switch_name, "fleet-switch"),
        # All a switch asks the API server: the pods of the selector, to reach each one's admin port.
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
    }


def _role_binding(s: K8sSettings) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(s, s.switch_name, "fleet-switch"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": s.switch_name},
        "subjects": [{"kind": "ServiceAccount", "name": s.switch_name, "namespace": s.namespace}],
    }


def switch_job(settings: K8sSettings) -> dict[str, Any]:
    """One fleet switch: `kubectl create -f` it (generateName: every switch is a new Job, with its own log).

    backoffLimit 0: a failed switch has already rolled back everywhere; whether to try
    again is an operator's decision, not a retry loop's.
    """
    s = settings
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "generateName": f"{s.switch_name}-",
            "namespace": s.namespace,
            "labels": _labels(s, "fleet-switch"),
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": SWITCH_DEADLINE_S,
            "ttlSecondsAfterFinished": SWITCH_TTL_S,
            "template": {
                "metadata": {"labels": {**_labels(s, "fleet-switch"), OPERATOR_LABEL: s.name}},
                "spec": {
                    "serviceAccountName": s.switch_name,
                    "automountServiceAccountToken": True,  # the kubernetes client's in-cluster credentials
                    "restartPolicy": "Never",
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "switch",
                            "image": s.gateway_image,
                            "command": switch_args(s),
                            "env": [_secret_env(KEY_ENV, s.admin_secret), *_s3_env(s), _home_env()],
                            "resources": _resources(s.switch_cpu, s.switch_memory),
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "vector", "mountPath": VECTOR_DIR, "readOnly": True},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "vector", "configMap": {"name": s.vector_configmap}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


# -- what the operator runs -------------------------------------------------------------------------

FLEET_FILE = "fleet.yaml"
SWITCH_FILE = "fleet-switch-job.yaml"


def secret_commands(settings: K8sSettings) -> list[str]:
    """Shell lines that create the two Secrets without a secret on any command line (files, then removed)."""
    s = settings
    return [
        "umask 077",
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32), end=\"\")' > admin.key",
        f"kubectl -n {s.namespace} create secret generic {s.admin_secret} --from-file={KEY_ENV}=admin.key",
        "rm admin.key",
        f"# write s3.env: KEY=value lines for {', '.join(S3_SECRET_KEYS)}",
        f"# (and {S3_ENDPOINT_KEY} for an S3-compatible store)",
        f"kubectl -n {s.namespace} create secret generic {s.s3_secret} --from-env-file=s3.env",
        "rm s3.env",
    ]


def switch_commands(settings: K8sSettings, out: str | Path, vector: str = "VECTOR.safetensors") -> list[str]:
    """Shell lines of one fleet switch as a Job: the vector into the ConfigMap, a new Job, its log, its verdict.

    Server-side apply: a client-side apply would also store the vector in an
    annotation, halving the 1 MiB a ConfigMap may hold.
    """
    s = settings
    ns = f"kubectl -n {s.namespace}"
    return [
        f"{ns} create configmap {s.vector_configmap} --from-file={VECTOR_KEY}={vector} --dry-run=client -o yaml"
        " | kubectl apply --server-side --force-conflicts -f -",
        f"job=$(kubectl create -f {Path(out) / SWITCH_FILE} -o name)",
        f'{ns} logs -f --pod-running-timeout=5m "$job"',
        f'test "$({ns} get "$job" -o jsonpath=\'{{.status.succeeded}}\')" = 1   # the switch\'s verdict',
    ]


def to_yaml(objects: Sequence[Mapping[str, Any]]) -> str:
    """Objects as one multi-document YAML text, keys in the order they were built (deterministic)."""
    try:
        import yaml
    except ImportError as exc:  # PyYAML comes with the [fleet] extra (and the kubernetes client)
        raise InvalidInputError("writing manifests needs PyYAML: pip install 'fv-serving[fleet]'") from exc

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # a reviewer reads every value where it applies, never an &id001 reference

    header = f"# Rendered by `fv k8s` (fv-serving {__version__}); regenerate it rather than edit it.\n"
    return header + yaml.dump_all(objects, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=10_000)


def write_manifests(settings: K8sSettings, out: str | Path) -> list[Path]:
    """Write FLEET_FILE (everything `kubectl apply` keeps in place) and SWITCH_FILE (the Job), atomically."""
    objects = render(settings)
    fleet = [o for o in objects if o["kind"] != "Job"]
    jobs = [o for o in objects if o["kind"] == "Job"]
    out = Path(out)
    return [
        write_bytes_atomic(out / FLEET_FILE, to_yaml(fleet).encode()),
        write_bytes_atomic(out / SWITCH_FILE, to_yaml(jobs).encode()),
    ]
