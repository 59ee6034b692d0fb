"""Which servers form a fleet: the replicas `fv serve --replicas` runs, a list of URLs, or Kubernetes pods.

A switch talks to every replica's Triton with the deployment's key, and to every
gateway's admin listener to flip the route. In Kubernetes both are the pod's gateway
admin port (Triton listens on the pod's loopback; the admin listener proxies the
locked APIs to it and owns the route), so a pod contributes one URL to each list.
Pods come from a label selector through the official `kubernetes` client, with a
kube context from the operator's machine or the in-cluster service account of a Job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.fleet.replica import Replica, RouteFlip
from fv_serving.triton.repository import ENSEMBLE_MODEL


@dataclass(frozen=True)
class Members:
    """The replicas (Triton HTTP URLs) and the gateways (admin URLs) of one fleet."""

    replicas: tuple[str, ...]
    gateways: tuple[str, ...]

    def replica_handles(self, key: str | None, timeout_s: float) -> list[Replica]:
        if not self.replicas:
            raise InvalidInputError("the fleet has no replica: name them (--replica URL) or a --kube-selector")
        return [Replica(url, key, timeout_s) for url in self.replicas]

    def route_flips(self, key: str | None, timeout_s: float) -> list[RouteFlip]:
        from fv_serving.gateway.routes import set_route

        if key is None:
            raise InvalidInputError("flipping a gateway's route needs the deployment's key ($FV_ADMIN_KEY)")

        def flip_at(admin_url: str) -> RouteFlip:
            return lambda upstream: set_route(admin_url, ENSEMBLE_MODEL, upstream, key, timeout_s)

        return [flip_at(url) for url in self.gateways]


def kube_members(
    selector: str,
    namespace: str,
    admin_port: int,
    context: str | None = None,
    list_pods: Callable[[str, str], Sequence[object]] | None = None,
) -> Members:
    """The Running pods matching `selector`: each pod's admin port serves as its replica and its gateway."""
    pods = (list_pods or _list_pods(context))(namespace, selector)
    urls = []
    for pod in pods:
        status = getattr(pod, "status", None)
        if getattr(status, "phase", None) == "Running" and getattr(status, "pod_ip", None):
            urls.append(f"http://{status.pod_ip}:{admin_port}")  # type: ignore[union-attr]
    if not urls:
        raise ServerError(f"no Running pod matches {selector!r} in namespace {namespace!r}")
    return Members(tuple(sorted(urls)), tuple(sorted(urls)))


def _list_pods(context: str | None) -> Callable[[str, str], Sequence[object]]:
    """The kubernetes client's pod listing: in-cluster credentials in a pod, else the kube config's context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(context=context)
    api = client.CoreV1Api()
    return lambda namespace, selector: list(api.list_namespaced_pod(namespace, label_selector=selector).items)
