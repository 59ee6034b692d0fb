"""`fv triton build | serve | stop | switch | status | infer`: the serving side.

A deployment started by `fv serve` (foreground, or --detach: the same supervisor as a
daemon) writes its state (pids, ports, log, repository) and its model-control key to
a run folder, by default `<repository>.server/` beside the repository. Every other
command finds the server, its repository and its key from there (`--repository R` or
`--run-dir D`), or from an explicit `--url` (plus `--repository` where the
repository's records are needed, and $FV_ADMIN_KEY / --admin-key-file for the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fv_serving.cli.serving_args import (
    Target,
    add_target,
    add_vector_choice,
    admission_policy,
    default_run_dir,
    print_warnings,
    resolve_target,
    run_dir_of,
    vector_choice,
)
from fv_serving.errors import InvalidInputError, ServerError

if TYPE_CHECKING:  # imported lazily at run time: `fv --help` should not pay for onnx
    import onnx

# -- fv triton build ----------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    import tempfile

    from fv_serving.fleet.layout import make_fleet_layout, publish
    from fv_serving.fleet.store import S3Store
    from fv_serving.onnx.graph import load_model
    from fv_serving.triton.build import build_deployment
    from fv_serving.triton.supervisor import STATE_FILENAME, read_run_state, supervisor_alive

    remote = args.out.startswith("s3://")
    fleet = args.fleet or remote  # switches on object storage are fleet switches
    if fleet and args.gated:
        raise InvalidInputError("the gated mode is served by single deployments only, not yet by the fleet layout")
    if not remote:
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise InvalidInputError(f"{out} exists and is not empty; pass --overwrite to replace it")
        run_dir = default_run_dir(out)
        if (run_dir / STATE_FILENAME).is_file() and supervisor_alive(read_run_state(run_dir), run_dir):
            raise ServerError(f"a server is serving {out} (state in {run_dir}); `fv stop --repository {out}` first")
    store = S3Store(args.out) if remote else None
    if store is not None and store.exists("fleet.json") and not args.overwrite:
        raise InvalidInputError(f"{args.out} already holds a fleet repository; pass --overwrite to replace it")
    checks: list[str] = []
    if args.classifier is not None:
        classifier, class_names, source = _exported_checkpoint(Path(args.classifier), checks)
    else:
        source = Path(args.classifier_onnx).absolute()
        classifier, class_names = load_model(source, "classifier graph"), []
    with tempfile.TemporaryDirectory(prefix="fv-build-") as staging:
        report = build_deployment(
            Path(staging) / "repo" if remote else Path(args.out),
            vector_choice(args),
            classifier,
            classifier_source=str(source),
            class_names=class_names,
            fused=args.fused,
            runtime=args.runtime,
            device=args.device,
            max_batch_size=args.max_batch_size,
            instance_count=args.instances,
            intra_op_threads=args.threads,
            force=args.force,
            policy=admission_policy(args),
            overwrite=args.overwrite,
            checks=checks,
            gated=args.gated,
        )
        notes = []
        if fleet:
            state = make_fleet_layout(report.repository)
            notes.append(f"fleet layout: live colour {state.live}, both colours on version {state.live_version}")
        if store is not None:
            keys = publish(report.repository, store)
            notes.append(f"published {len(keys)} objects to {args.out} (configs after every file, fleet.json last)")
    where = args.out if remote else report.repository
    print(f"wrote Triton repository {where} (runtime {args.runtime}, device {args.device})")
    print(f"  models: {', '.join(report.models)} (+ classifier, forget_step); forget vector {report.vector_id}")
    for check in [*report.checks, *notes]:
        print(f"  verified: {check}")
    print_warnings(report.warnings)
    hint = f"--repository {args.out} --run-dir DIR --replicas 3" if remote else f"--repository {args.out} --detach"
    print(f"  serve it: fv serve {hint}")
    return 0


def _exported_checkpoint(path: Path, checks: list[str]) -> tuple[onnx.ModelProto, list[str], Path]:
    """A `fv train` checkpoint exported to ONNX, with the exporter's parity check (needs the learning extra)."""
    import tempfile

    from fv_serving.models import load_classifier
    from fv_serving.onnx.export import export_classifier
    from fv_serving.onnx.graph import load_model

    loaded = load_classifier(path)
    with tempfile.TemporaryDirectory(prefix="fv-export-") as tmp:
        summary = export_classifier(loaded.model, Path(tmp) / "classifier.onnx")
        model = load_model(Path(tmp) / "classifier.onnx", "exported classifier")
    checks += [f"classifier export: {v}" for v in summary.verified]
    return model, list(loaded.model.spec.class_names), path.absolute()


# -- fv serve / stop ----------------------------------------------------------------------------------


def _public_address(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInputError(f"--public must be HOST:PORT (e.g. 0.0.0.0:8080), got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from fv_serving.net import is_loopback
    from fv_serving.triton.supervisor import (
        STATE_FILENAME,
        ServeOptions,
        Supervisor,
        read_run_state,
        start_detached,
        stop_deployment,
        supervisor_alive,
    )

    remote = args.repository.startswith("s3://")
    repository = args.repository if remote else str(Path(args.repository).absolute())
    if not remote and not Path(repository).is_dir():
        raise InvalidInputError(f"model repository {repository} does not exist")
    if remote and not args.run_dir:
        raise InvalidInputError("a repository in object storage needs --run-dir (where state, key and logs go)")
    if not is_loopback(args.host) and not args.expose_triton:
        raise InvalidInputError(
            f"Triton listens on loopback only; to serve {args.host} use the gateway (--public {args.host}:PORT), or "
            "--expose-triton if a network policy already keeps everyone else out"
        )
    run_dir = Path(args.run_dir).absolute() if args.run_dir else default_run_dir(repository)
    if (run_dir / STATE_FILENAME).is_file():
        old = read_run_state(run_dir)
        if supervisor_alive(old, run_dir):
            raise ServerError(
                f"a deployment is already running from {run_dir} (pid {old.supervisor_pid}, {old.server.http_url}); "
                f"`fv stop --run-dir {run_dir}` first"
            )
        print(stop_deployment(run_dir))  # a crashed or killed one: clear its state, processes and shm
    if args.replicas < 1:
        raise InvalidInputError(f"--replicas must be >= 1, got {args.replicas}")
    options = ServeOptions(
        repository=repository,
        run_dir=run_dir,
        models=tuple(args.models or ()),
        replicas=args.replicas,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        public=_public_address(args.public),
        ready_timeout_s=args.ready_timeout,
        use_gpu=args.gpu,
        max_restarts=args.max_restarts,
    )
    if args.detach:
        state = start_detached(options)
        server = state.server
        print(
            f"tritonserver pid {server.pid} ready, models {', '.join(server.models)} (supervisor pid "
            f"{state.supervisor_pid}, restarts crashed servers)"
        )
        print(f"  HTTP    {server.http_url}   (loopback; model control locked by the key in {run_dir}/admin.key)")
        print(f"  gRPC    {server.grpc_url}")
        if state.public_url:
            print(f"  public  {state.public_url}   (gateway: public models only, checked requests)")
        print(f"  logs    {server.log_path}, {run_dir / 'supervisor.log'}")
        print(f"detached; stop it with: fv stop --run-dir {run_dir}")
        return 0
    return Supervisor(options).run()


def cmd_stop(args: argparse.Namespace) -> int:
    from fv_serving.triton.supervisor import STATE_FILENAME, stop_deployment

    run_dir = run_dir_of(args)
    if not (run_dir / STATE_FILENAME).is_file():
        print(f"no server running from {run_dir}")
        return 0
    print(stop_deployment(run_dir))
    return 0


# -- fv switch / status -------------------------------------------------------------------------------


def cmd_switch(args: argparse.Namespace) -> int:
    from fv_serving.fleet.layout import is_fleet
    from fv_serving.fleet.store import open_store
    from fv_serving.triton.client import TritonClient
    from fv_serving.triton.signals import stop_requests
    from fv_serving.triton.switch import switch_vector

    named_fleet = bool(args.replica or args.kube_selector)
    target = resolve_target(args, need_repository=True, need_server=not named_fleet)
    assert target.repository is not None
    if is_fleet(open_store(target.repository)):
        if args.gated:
            raise InvalidInputError("the gated mode is served by single deployments only, not yet by the fleet layout")
        return _fleet_switch(args, target)
    if named_fleet:
        raise InvalidInputError(f"{target.repository} is not in the fleet layout (fv triton build --fleet)")
    assert target.url is not None
    with stop_requests(), TritonClient(target.url, timeout_s=args.timeout, admin_key=target.admin_key) as c:
        result = switch_vector(
            target.repository,
            c,
            vector_choice(args),
            force=args.force,
            policy=admission_policy(args),
            timeout_s=args.timeout,
            keep_versions=args.keep_versions,
            log_path=target.log_path,
            gated=args.gated,
        )
    _print_notes(result.recovered, result.checks, result.warnings)
    step = "forget_step" if result.topology == "plain" else "forget_step_gated"
    print(
        f"switched {step} v{result.previous_version} -> v{result.version}: "
        f"vector {result.previous_vector_id} -> {result.vector_id}" + (" (FORCED)" if result.forced else "")
    )
    if result.topology_changed:
        print(f"  'unlearned' now runs the {result.topology} topology (ensemble config changed and written)")
    print(
        f"  new vector serving {result.serving_s:.2f} s after the request "
        f"(validation {result.validate_s:.2f} s, Triton load_model {result.load_s:.2f} s); confirmed and journaled"
    )
    if result.pruned:
        print(f"  removed old version folders {list(result.pruned)}")
    if result.classifier is None:
        return 0
    if result.classifier.disturbed:
        print(f"WARNING: the classifier WAS reloaded during the switch: {result.classifier.describe()}")
        return 1
    if result.classifier.reloaded:
        print(
            "  classifier reloaded with the plain topology (idle before, no request met it): "
            + result.classifier.describe()
        )
        return 0
    print(f"  classifier not reloaded: {result.classifier.describe()}")
    return 0


def _print_notes(recovered: tuple[str, ...], checks: tuple[str, ...], warnings: tuple[str, ...]) -> None:
    """What a switch found to recover, checked and warns about, one line each."""
    for note in recovered:
        print(f"recovered: {note}")
    for check in checks:
        print(f"validated: {check}")
    print_warnings(warnings)


def _fleet_switch(args: argparse.Namespace, target: Target) -> int:
    from fv_serving.fleet.members import Members, kube_members
    from fv_serving.fleet.store import open_store
    from fv_serving.fleet.switch import fleet_switch
    from fv_serving.triton.signals import stop_requests

    assert target.repository is not None
    if args.kube_selector:
        members = kube_members(args.kube_selector, args.namespace, args.admin_port, args.kube_context)
    elif args.replica:
        members = Members(tuple(args.replica), tuple(args.gateway_admin or ()))
    else:
        state = target.state
        if state is None:
            raise InvalidInputError("name the fleet: --replica URL [...] --gateway-admin URL, or --kube-selector")
        members = Members(tuple(s.http_url for s in state.servers), (state.admin_url,) if state.admin_url else ())
    with stop_requests():
        result = fleet_switch(
            open_store(target.repository),
            members.replica_handles(target.admin_key, args.timeout),
            members.route_flips(target.admin_key, args.timeout) if members.gateways else [],
            vector_choice(args),
            force=args.force,
            policy=admission_policy(args),
            timeout_s=args.timeout,
        )
    _print_notes(result.recovered, result.checks, result.warnings)
    print(
        f"fleet switched on {result.replicas} replica(s): v{result.previous_version} -> v{result.version}, vector "
        f"{result.previous_vector_id} -> {result.vector_id} (live colour now {result.live})"
    )
    print(
        f"  every replica serving the new vector {result.all_serving_s:.2f} s after the request (validation "
        f"{result.validate_s:.2f} s, prepare on all replicas {result.prepare_s:.2f} s, then one route flip)"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fv_serving.cli.common import print_json
    from fv_serving.triton.status import collect_status, history_lines, render_status
    from fv_serving.triton.supervisor import STATE_FILENAME, read_run_state

    target = resolve_target(args, need_repository=False, need_server=False)
    run_dir = target.run_dir
    state = read_run_state(run_dir) if run_dir is not None and (run_dir / STATE_FILENAME).is_file() else None
    status = collect_status(target.url, target.repository, state.server if state else None, target.admin_key)
    if state is not None:
        status["supervisor"] = {"pid": state.supervisor_pid, "restarts": state.restarts, "gateway": state.gateway}
    if args.history and target.repository is not None:
        status["history"] = history_lines(target.repository, args.history)
    if args.json:
        print_json(status)
    else:
        if target.url is None:
            print(f"server   none running (no state in {run_dir}); showing the repository only")
        for line in render_status(status):
            print(line)
        if state is not None:
            gateway = f", gateway {state.public_url}" if state.public_url else ""
            print(f"super    pid {state.supervisor_pid}, tritonserver restarts {state.restarts}{gateway}")
        for line in status.get("history", []):
            print(f"journal  {line}")
    return 1 if status["problems"] else 0


# -- fv infer -----------------------------------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> int:
    from fv_serving.cli.common import print_json
    from fv_serving.triton.client import TritonClient
    from fv_serving.triton.deployment import class_names_of
    from fv_serving.triton.infer import dataset_sample, read_inputs, score, softmax
    from fv_serving.triton.status import forgotten_classes

    if bool(args.files) == bool(args.data):
        raise InvalidInputError("give input files (PNG/.npy) or --data NAME, not both or neither")
    target = resolve_target(args, need_repository=False)
    assert target.url is not None
    names = class_names_of(target.repository) if target.repository else []
    with TritonClient(target.url, protocol=args.protocol, admin_key=target.admin_key) as client:
        io = client.model_io(args.model)
        chw = io.inputs[0].dims[1:]
        if args.data:
            images, labels, data_names = dataset_sample(args.data, args.count, args.data_root)
            names = names or data_names
        else:
            images, files = read_inputs(args.files, chw)
        started = time.perf_counter()
        named = any(t.name == "vector_id" for t in io.outputs)
        if named:
            logits, ids = client.infer_with_ids(args.model, images, batch_size=args.batch_size)
        else:
            logits, ids = client.infer(args.model, images, batch_size=args.batch_size), []
        seconds = time.perf_counter() - started
    vector_ids = sorted(set(ids))
    forgotten = forgotten_classes(target.repository, vector_ids) if target.repository else []
    predicted = logits.argmax(axis=1)
    served_by = f"vector {', '.join(vector_ids)}" if vector_ids else "no forget vector (answers name none)"
    rate = f"{len(images)} images in {seconds:.2f} s ({len(images) / seconds:.0f}/s) through {args.model!r}"
    if args.data:
        report = score(predicted, labels, names)
        if args.json:
            print_json(
                {
                    "model": args.model,
                    "vector_ids": vector_ids,
                    "forgotten": forgotten,
                    **dataclasses.asdict(report),
                    "seconds": seconds,
                }
            )
            return 0
        print(rate + f" at {target.url}; answered by {served_by}")
        for line in report.lines(highlight=forgotten):
            print(line)
        return 0
    confidence = softmax(logits).max(axis=1)
    rows = [
        {
            "input": f,
            "class": int(p),
            "name": names[p] if p < len(names) else str(p),
            "confidence": float(c),
            "vector_id": ids[i] if ids else None,
        }
        for i, (f, p, c) in enumerate(zip(files, predicted, confidence, strict=True))
    ]
    if args.json:
        print_json({"model": args.model, "forgotten": forgotten, "predictions": rows})
        return 0
    print(rate + f"; answered by {served_by}")
    for row in rows:
        mark = "  (a forgotten class)" if row["class"] in forgotten else ""
        print(f"  {row['input']:<24} -> {row['class']} {row['name']:<14} p={row['confidence']:.3f}{mark}")
    return 0


# -- arguments ----------------------------------------------------------------------------------------


def _add_gated(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gated",
        action="store_true",
        help="serve the (class-wise) vector gated: delta only where the classifier predicts a forgotten class, "
        "a second classifier pass on those images (not input-agnostic; see fv_serving/triton/topology.py)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from fv_serving.cli.common import OneLineErrorParser
    from fv_serving.triton.flags import DEFAULT_HOST, DEFAULT_READY_TIMEOUT_S
    from fv_serving.triton.model_config import DEVICES, RUNTIMES
    from fv_serving.triton.switch import DEFAULT_KEEP_VERSIONS, DEFAULT_TIMEOUT_S

    triton = sub.add_parser("triton", help="build a Triton model repository (classifier + forget step + ensemble)")
    kinds = triton.add_subparsers(dest="triton_command", required=True, parser_class=OneLineErrorParser)
    p = kinds.add_parser("build", help="export/verify the graphs and write the repository")
    clf = p.add_mutually_exclusive_group(required=True)
    clf.add_argument("--classifier", help="checkpoint written by `fv train` (exported to ONNX here; needs [learn])")
    clf.add_argument("--classifier-onnx", help="an ONNX classifier taking raw pixels [N,C,H,W] in [0,1]")
    add_vector_choice(p)
    p.add_argument("--out", required=True, help="repository folder to write, or s3://bucket/prefix (a fleet)")
    p.add_argument(
        "--fleet", action="store_true", help="the fleet layout (blue/green ensembles; see fv serve --replicas)"
    )
    p.add_argument("--fused", action="store_true", help="also add model 'fused' (vector baked in)")
    _add_gated(p)
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="python",
        help="python: ORT inside Triton's python backend (embedded default); onnxruntime: Triton's ORT backend",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="instance group kind (default cpu)")
    p.add_argument("--max-batch-size", type=int, default=64, help="dynamic batching limit (default 64)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default 1)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per instance (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="run tritonserver (supervised) on a repository, foreground or --detach")
    p.add_argument("--repository", required=True)
    p.add_argument("--run-dir", help="state, key and log folder (default <repository>.server)")
    p.add_argument("--detach", action="store_true", help="return once ready; the supervisor keeps running")
    p.add_argument("--models", nargs="+", help="models to load (default: unlearned, and fused when present)")
    p.add_argument("--replicas", type=int, default=1, help="tritonservers on the repository, behind the gateway")
    p.add_argument("--public", metavar="HOST:PORT", help="start the gateway there (the only address beyond loopback)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"Triton's own address (default {DEFAULT_HOST})")
    p.add_argument("--expose-triton", action="store_true", help="allow a non-loopback --host (no gateway in front)")
    p.add_argument("--http-port", type=int, help="default: a free port")
    p.add_argument("--grpc-port", type=int, help="default: a free port")
    p.add_argument("--metrics-port", type=int, help="default: a free port")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help=f"seconds to wait for readiness (default {DEFAULT_READY_TIMEOUT_S:.0f})",
    )
    p.add_argument("--max-restarts", type=int, default=5, help="crashed-server restarts per 10 minutes (default 5)")
    p.add_argument("--gpu", action="store_true", help="enable GPU metrics and pinned memory (GPU hosts)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop a deployment started by `fv serve` (a no-op if none runs)")
    p.add_argument("--repository", help="its repository (run folder <repository>.server)")
    p.add_argument("--run-dir", help="its run folder")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("switch", help="change the served forget vector live (the classifier stays loaded)")
    add_target(p)
    add_vector_choice(p)
    fleet = p.add_argument_group("a fleet (repository in the fleet layout) not started by this `fv serve`")
    fleet.add_argument("--replica", action="append", metavar="URL", help="a replica's Triton HTTP URL (repeat)")
    fleet.add_argument("--gateway-admin", action="append", metavar="URL", help="a gateway's admin URL (repeat)")
    fleet.add_argument("--kube-selector", help="the fleet's pods by label selector (kubernetes client)")
    fleet.add_argument("--namespace", default="default", help="with --kube-selector (default: default)")
    fleet.add_argument("--kube-context", help="with --kube-selector, outside a cluster")
    fleet.add_argument("--admin-port", type=int, default=8081, help="the pods' gateway admin port (default 8081)")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the lock wait, load and confirmation"
    )
    p.add_argument(
        "--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS, help="forget_step version folders kept (>= 2)"
    )
    _add_gated(p)
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("status", help="health, active vector, problems, models, statistics (exit 1 on a problem)")
    add_target(p)
    p.add_argument("--history", type=int, nargs="?", const=20, default=0, help="also the last N journal entries")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("infer", help="classify images (PNG/.npy) or score a data set through the server")
    add_target(p)
    p.add_argument("files", nargs="*", help="PNG/JPEG images or .npy arrays ([C,H,W] or [N,C,H,W])")
    p.add_argument("--data", help="score the first --count test images of this data set (e.g. fashion-mnist)")
    p.add_argument("--count", type=int, default=2000, help="with --data: number of test images (default 2000)")
    p.add_argument("--data-root", help="with --data: where the data set's files are")
    p.add_argument("--model", default="unlearned", help="unlearned (default), fused, or classifier (bypass!)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--batch-size", type=int, help="images per request (default: the model's max batch)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_infer)
