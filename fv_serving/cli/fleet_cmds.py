"""`fv fleet pod-config`: what a Kubernetes pod of a fleet runs, rendered by its init container (fv_serving/k8s.py).

A fleet's switch is `fv switch` (it recognises the fleet layout); this group holds
what only a pod needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_pod_config(args: argparse.Namespace) -> int:
    from fv_serving.fleet.pod_config import write_pod_config
    from fv_serving.fleet.store import open_store

    written = write_pod_config(
        open_store(args.repository),
        Path(args.out),
        triton_http_port=args.triton_http_port,
        public_port=args.public_port,
        admin_port=args.admin_port,
        use_gpu=args.gpu,
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from fv_serving.cli.common import OneLineErrorParser

    fleet = sub.add_parser("fleet", help="what the pods of a fleet run (see fv k8s)")
    kinds = fleet.add_subparsers(dest="fleet_command", required=True, parser_class=OneLineErrorParser)
    p = kinds.add_parser("pod-config", help="render a pod's tritonserver flags and gateway from the repository")
    p.add_argument("--repository", required=True, help="the fleet's repository (s3://bucket/prefix or a folder)")
    p.add_argument("--out", required=True, help="where the pod's containers read it (an emptyDir)")
    p.add_argument("--triton-http-port", type=int, default=8000, help="Triton's HTTP port on the pod's loopback")
    p.add_argument("--public-port", type=int, default=8080, help="the gateway's public port (the Service's)")
    p.add_argument("--admin-port", type=int, default=8081, help="the gateway's admin port (fleet switches)")
    p.add_argument("--gpu", action="store_true", help="a GPU pod (GPU metrics and pinned memory on)")
    p.set_defaults(func=cmd_pod_config)
