"""What one Kubernetes pod of a fleet runs, rendered at pod start by its init container (`fv fleet pod-config`).

The pod's containers cannot run `fv`: NVIDIA's Triton image has none, and the
gateway's nginx only reads files. So the init container reads the repository's
fleet state and the deployment's key ($FV_ADMIN_KEY, from the Secret) and writes:
  * `triton-args`: one line of tritonserver flags (fv_serving/triton/flags.py, the one
    source of them): explicit model control, both colours and `fused` loaded (the
    route picks a colour; a Triton container restarted after a flip needs nothing
    re-rendered), loopback addresses, the operator APIs locked behind the key;
  * `gateway/`: the gateway's run dir (fv_serving.gateway: nginx.conf, the Lua checks,
    the routes folder): the public port for health and the public models, the admin
    port for route flips and, passed through to this pod's Triton, the locked
    operator APIs a fleet switch uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from fv_serving.atomic import write_bytes_atomic
from fv_serving.errors import InvalidInputError
from fv_serving.fleet.layout import COLOURS, colour_model, is_fleet
from fv_serving.fleet.store import Store
from fv_serving.triton.control import KEY_ENV
from fv_serving.triton.flags import ServerFlags
from fv_serving.triton.model_config import CONFIG_FILENAME
from fv_serving.triton.repository import FUSED_MODEL

TRITON_ARGS_FILENAME = "triton-args"
GATEWAY_FOLDER = "gateway"
#: Triton's own ports on the pod's loopback, beside the HTTP one the manifests name.
GRPC_PORT, METRICS_PORT = 8001, 8002


def fleet_models(store: Store) -> tuple[str, ...]:
    """What every replica of a fleet loads: both colours, and `fused` when the repository has it."""
    fused = (FUSED_MODEL,) if store.exists(f"{FUSED_MODEL}/{CONFIG_FILENAME}") else ()
    return (*(colour_model(c) for c in COLOURS), *fused)


def write_pod_config(
    store: Store, out: Path, *, triton_http_port: int, public_port: int, admin_port: int, use_gpu: bool
) -> list[str]:
    """Write `triton-args` and the gateway's run dir into `out`; returns the paths written."""
    from fv_serving.gateway.config import GatewayConfig
    from fv_serving.gateway.process import Gateway
    from fv_serving.triton.supervisor import public_models

    if not is_fleet(store):
        raise InvalidInputError(f"{store.url} is not in the fleet layout (fv triton build --fleet)")
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise InvalidInputError(f"${KEY_ENV} is not set: the pod's model control would be open (mount the Secret)")
    models = fleet_models(store)
    flags = ServerFlags(
        repository=store.triton_url,
        models=models,
        http_port=triton_http_port,
        grpc_port=GRPC_PORT,
        metrics_port=METRICS_PORT,
        admin_key=key,
        use_gpu=use_gpu,
    )
    args_path = write_bytes_atomic(out / TRITON_ARGS_FILENAME, (" ".join(flags.to_args_list()) + "\n").encode())
    args_path.chmod(0o600)
    config = GatewayConfig(
        host="0.0.0.0",
        port=public_port,
        upstreams=(f"127.0.0.1:{triton_http_port}",),
        models=public_models(store, models),
        run_dir=str((out / GATEWAY_FOLDER).absolute()),
        admin_host="0.0.0.0",
        admin_port=admin_port,
        admin_passthrough=True,
    )
    Gateway(config, admin_key=key).prepare()
    return [str(args_path), config.conf_path]
