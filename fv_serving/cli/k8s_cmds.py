"""`fv k8s`: write the Kubernetes manifests of a fleet (fv_serving.k8s), then print what to run next.

Nothing here talks to a cluster: the manifests are rendered from the settings alone,
so they can be reviewed, committed and diffed before anything is applied.
"""

from __future__ import annotations

import argparse
import dataclasses


def cmd_k8s(args: argparse.Namespace) -> int:
    from fv_serving.k8s import FLEET_FILE, K8sSettings, secret_commands, switch_commands, write_manifests

    settings = K8sSettings(
        name=args.name,
        namespace=args.namespace,
        replicas=args.replicas,
        repository=args.repository,
        device="gpu" if args.gpu else "cpu",
        triton_image=args.image,
        gateway_image=args.gateway_image,
        kserve=args.kserve,
        triton_cpu=args.triton_cpu,
        triton_memory=args.triton_memory,
        startup_timeout_s=args.startup_timeout,
    )
    for path in write_manifests(settings, args.out):
        print(f"wrote {path}")
    print("once, create the Secrets (nothing secret is in the manifests):")
    for line in secret_commands(settings):
        print(f"  {line}")
    print("apply:")
    print(f"  kubectl apply -f {args.out}/{FLEET_FILE}")
    print("switch the whole fleet to a vector (a Job inside the cluster):")
    for line in switch_commands(settings, args.out):
        print(f"  {line}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from fv_serving.k8s import DEFAULT_GATEWAY_IMAGE, DEFAULT_TRITON_IMAGE, K8sSettings

    d = {f.name: f.default for f in dataclasses.fields(K8sSettings)}
    p = sub.add_parser(
        "k8s",
        help="write Kubernetes manifests: Triton + gateway pods on an S3 repository, Service, PDB, switch Job",
        description="Renders the manifests offline (no cluster needed) into --out: fleet.yaml for `kubectl apply` "
        "and fleet-switch-job.yaml, created once per fleet switch.",
    )
    p.add_argument("--name", required=True, help="the fleet's name: the Service, the pods' app label, object prefix")
    p.add_argument("--namespace", default="default", help="namespace of every object (default: default)")
    p.add_argument("--replicas", type=int, default=2, help="pods, each Triton + gateway (default 2)")
    p.add_argument(
        "--repository",
        required=True,
        help="s3://BUCKET/PREFIX written by `fv triton build --runtime onnxruntime` (add --device gpu for --gpu)",
    )
    p.add_argument("--image", default=DEFAULT_TRITON_IMAGE, help=f"Triton image (default {DEFAULT_TRITON_IMAGE})")
    p.add_argument(
        "--gateway-image",
        default=DEFAULT_GATEWAY_IMAGE,
        help=f"image built from deploy/Dockerfile (default {DEFAULT_GATEWAY_IMAGE})",
    )
    device = p.add_mutually_exclusive_group(required=True)
    device.add_argument("--cpu", action="store_true", help="CPU pods")
    device.add_argument("--gpu", action="store_true", help="one nvidia.com/gpu per pod")
    p.add_argument("--kserve", action="store_true", help="a KServe InferenceService (raw mode) instead of Deployment")
    p.add_argument(
        "--triton-cpu", default=d["triton_cpu"], help=f"Triton's CPU request = limit (default {d['triton_cpu']})"
    )
    p.add_argument(
        "--triton-memory",
        default=d["triton_memory"],
        help=f"Triton's memory request = limit (default {d['triton_memory']})",
    )
    p.add_argument(
        "--startup-timeout",
        type=int,
        default=d["startup_timeout_s"],
        help=f"seconds a pod may take to load its models before it is restarted (default {d['startup_timeout_s']})",
    )
    p.add_argument("--out", required=True, help="folder to write the manifests to")
    p.set_defaults(func=cmd_k8s)
