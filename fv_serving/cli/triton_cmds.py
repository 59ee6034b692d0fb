"""`fv triton build | serve | stop | switch | status | infer`: the serving side.

A server started by `fv serve` (foreground or --detach) writes its state (pid,
ports, log, repository) to a run folder, by default `<repository>.server/` beside
the repository. Every other command finds the server and its repository from
there (`--repository R` or `--run-dir D`), or from an explicit `--url` (plus
`--repository` where the repository's records are needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fv_serving.errors import InvalidInputError, ServerError

if TYPE_CHECKING:  # imported lazily at run time: `fv --help` should not pay for tritonclient
    from fv_serving.triton.deploy import VectorChoice
    from fv_serving.triton.server import ServerState


@dataclass(frozen=True)
class Target:
    """Where a running deployment is: its URL, its repository and (for servers we started) its state."""

    url: str | None
    repository: Path | None
    state: ServerState | None


def default_run_dir(repository: str | Path) -> Path:
    """`<repository>.server`: beside the repository, never inside it (Triton would take it for a model)."""
    repo = Path(repository).absolute()
    return repo.parent / f"{repo.name}.server"


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if args.repository:
        return default_run_dir(args.repository)
    raise InvalidInputError("say which server: --repository R (its run folder is R.server), --run-dir D or --url U")


def resolve_target(args: argparse.Namespace, need_repository: bool) -> Target:
    """The server URL and repository from --url / --repository / --run-dir (state file of `fv serve`)."""
    from fv_serving.triton.server import STATE_FILENAME, read_state

    state = None
    if args.run_dir or not args.url:
        run_dir = _run_dir(args)
        if not (run_dir / STATE_FILENAME).is_file():
            raise ServerError(f"no server state in {run_dir}: start one with `fv serve` (or give --url)")
        state = read_state(run_dir)
    url = args.url
    if url is None and state is not None:
        url = state.grpc_url if getattr(args, "protocol", "http") == "grpc" else state.http_url
    repository = Path(args.repository) if args.repository else (Path(state.repository) if state else None)
    if need_repository and repository is None:
        raise InvalidInputError("this command needs the repository's records: add --repository R")
    return Target(url, repository, state)


# -- fv triton build ----------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    from fv_serving.triton.deploy import build_deployment
    from fv_serving.triton.server import STATE_FILENAME, read_state, state_is_running

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InvalidInputError(f"{out} exists and is not empty; pass --overwrite to replace it")
    state_file = default_run_dir(out) / STATE_FILENAME
    if state_file.is_file() and state_is_running(read_state(state_file)):
        raise ServerError(f"a server is serving {out} (state {state_file}); `fv stop --repository {out}` first")
    report = build_deployment(
        args.out,
        vector_choice(args),
        classifier=args.classifier,
        classifier_onnx=args.classifier_onnx,
        fused=args.fused,
        runtime=args.runtime,
        device=args.device,
        max_batch_size=args.max_batch_size,
        instance_count=args.instances,
        intra_op_threads=args.threads,
        force=args.force,
        overwrite=args.overwrite,
    )
    print(f"wrote Triton repository {report.repository} (runtime {args.runtime}, device {args.device})")
    print(f"  models: {', '.join(report.models)} (+ classifier, forget_step); forget vector {report.vector_id}")
    for check in report.checks:
        print(f"  verified: {check}")
    print(f"  serve it: fv serve --repository {args.out} --detach")
    return 0


# -- fv serve / stop ----------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    from fv_serving.atomic import write_json_atomic
    from fv_serving.triton.repository import ENSEMBLE_MODEL, FUSED_MODEL
    from fv_serving.triton.server import (
        STATE_FILENAME,
        TritonServer,
        read_state,
        start_detached,
        state_is_running,
        stop_from_state,
    )

    repo = Path(args.repository).absolute()
    run_dir = Path(args.run_dir).absolute() if args.run_dir else default_run_dir(repo)
    state_file = run_dir / STATE_FILENAME
    if state_file.is_file():
        old = read_state(state_file)
        if state_is_running(old):
            raise ServerError(
                f"a server is already running from {run_dir} (pid {old.pid}, {old.http_url}); "
                f"`fv stop --run-dir {run_dir}` first"
            )
        stop_from_state(state_file)  # a crashed or killed one: clear its state and shm
    models = args.models or [ENSEMBLE_MODEL, *([FUSED_MODEL] if (repo / FUSED_MODEL).is_dir() else [])]
    options: dict[str, Any] = {
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "ready_timeout_s": args.ready_timeout,
        "use_gpu": args.gpu,
    }
    if args.detach:
        state = start_detached(repo, run_dir, models, **options)
        _print_urls(state, models)
        print(f"detached; stop it with: fv stop --run-dir {run_dir}")
        return 0

    # Foreground: SIGTERM and SIGINT both end in the same clean stop below. SIGINT is set
    # explicitly because a process started in the background by a shell script inherits it
    # ignored, and Python then never raises KeyboardInterrupt.
    server = TritonServer(repo, models, run_dir=run_dir, **options)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        write_json_atomic(state_file, server.state.to_json())
        _print_urls(server.state, models)
        print("serving in the foreground; Ctrl-C or SIGTERM stops it", flush=True)
        while server.is_running():
            time.sleep(0.5)
        print(f"fv serve: error: tritonserver exited unexpectedly; log {server.log_path}:\n{server.log_tail(20)}")
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()
        state_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", flush=True)


def _print_urls(state: ServerState, models: list[str]) -> None:
    print(f"tritonserver pid {state.pid} ready, models {', '.join(models)}")
    print(f"  HTTP    {state.http_url}")
    print(f"  gRPC    {state.grpc_url}")
    print(f"  metrics {state.metrics_url}")
    print(f"  log     {state.log_path}")
    print(f"  state   {Path(state.run_dir) / 'server.json'}", flush=True)


def cmd_stop(args: argparse.Namespace) -> int:
    from fv_serving.triton.server import STATE_FILENAME, read_state, stop_from_state

    run_dir = _run_dir(args)
    state_file = run_dir / STATE_FILENAME
    if not state_file.is_file():
        print(f"no server running from {run_dir}")
        return 0
    state = read_state(state_file)
    if stop_from_state(state_file):
        print(f"stopped tritonserver pid {state.pid} ({state.http_url}); log kept at {state.log_path}")
    else:
        print(f"tritonserver pid {state.pid} was not running any more; cleared its state")
    return 0


# -- fv switch / status -------------------------------------------------------------------------------


def cmd_switch(args: argparse.Namespace) -> int:
    from fv_serving.triton.switch import switch_vector

    target = resolve_target(args, need_repository=True)
    assert target.url is not None and target.repository is not None
    result = switch_vector(
        target.repository,
        target.url,
        vector_choice(args),
        force=args.force,
        timeout_s=args.timeout,
        keep_versions=args.keep_versions,
        log_path=target.state.log_path if target.state else None,
    )
    for check in result.checks:
        print(f"validated: {check}")
    print(
        f"switched forget_step v{result.previous_version} -> v{result.version}: "
        f"vector {result.previous_vector_id} -> {result.vector_id}" + (" (FORCED)" if result.forced else "")
    )
    print(
        f"  new vector serving {result.serving_s:.2f} s after the request "
        f"(validation {result.validate_s:.2f} s, Triton load_model {result.load_s:.2f} s)"
    )
    if result.pruned:
        print(f"  removed old version folders {list(result.pruned)}")
    if result.classifier.reloaded:
        print(f"WARNING: the classifier WAS reloaded during the switch: {result.classifier.describe()}")
        return 1
    print(f"  classifier not reloaded: {result.classifier.describe()}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fv_serving.cli.common import print_json
    from fv_serving.triton.server import STATE_FILENAME, read_state
    from fv_serving.triton.status import collect_status, render_status

    state = None
    if not args.url:
        state_file = _run_dir(args) / STATE_FILENAME
        state = read_state(state_file) if state_file.is_file() else None
    url = args.url or (state.http_url if state else None)
    repository = args.repository or (state.repository if state else None)
    status = collect_status(url, repository, state)
    if args.json:
        print_json(status)
    else:
        if url is None:
            print(f"server   none running (no state in {_run_dir(args)}); showing the repository only")
        for line in render_status(status):
            print(line)
    return 0 if url is None or status["server"]["reachable"] else 1


# -- fv infer -----------------------------------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> int:
    from fv_serving.cli.common import print_json
    from fv_serving.triton.client import TritonClient
    from fv_serving.triton.deploy import class_names_of
    from fv_serving.triton.infer import dataset_sample, read_inputs, score, softmax
    from fv_serving.triton.status import forgotten_classes

    if bool(args.files) == bool(args.data):
        raise InvalidInputError("give input files (PNG/.npy) or --data NAME, not both or neither")
    target = resolve_target(args, need_repository=False)
    assert target.url is not None
    names = class_names_of(target.repository) if target.repository else []
    with TritonClient(target.url, protocol=args.protocol) as client:
        io = client.model_io(args.model)
        chw = io.inputs[0].dims[1:]
        if args.data:
            images, labels, data_names = dataset_sample(args.data, args.count, args.data_root)
            names = names or data_names
        else:
            images, files = read_inputs(args.files, chw)
        started = time.perf_counter()
        logits = client.infer(args.model, images, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        forgotten = forgotten_classes(client, target.repository, args.model) if target.repository else []
    predicted = logits.argmax(axis=1)
    rate = f"{len(images)} images in {seconds:.2f} s ({len(images) / seconds:.0f}/s) through {args.model!r}"
    if args.data:
        report = score(predicted, labels, names)
        if args.json:
            print_json({"model": args.model, "forgotten": forgotten, **dataclasses.asdict(report), "seconds": seconds})
            return 0
        print(rate + f" at {target.url}")
        for line in report.lines(highlight=forgotten):
            print(line)
        return 0
    confidence = softmax(logits).max(axis=1)
    rows = [
        {"input": f, "class": int(p), "name": names[p] if p < len(names) else str(p), "confidence": float(c)}
        for f, p, c in zip(files, predicted, confidence, strict=True)
    ]
    if args.json:
        print_json({"model": args.model, "forgotten": forgotten, "predictions": rows})
        return 0
    print(rate)
    for row in rows:
        mark = "  (a forgotten class)" if row["class"] in forgotten else ""
        print(f"  {row['input']:<24} -> {row['class']} {row['name']:<14} p={row['confidence']:.3f}{mark}")
    return 0


# -- arguments ----------------------------------------------------------------------------------------


def add_vector_choice(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("which forget vector (exactly one)")
    src = group.add_mutually_exclusive_group(required=required)
    src.add_argument("--vector", type=Path, help="forget-vector file (.safetensors)")
    src.add_argument("--bank", type=Path, help="vector bank: combined into one vector before serving")
    src.add_argument("--off", action="store_true", help="forgetting off (identity forget step)")
    group.add_argument("--classes", nargs="+", help="with --bank: classes to forget (index or name)")
    group.add_argument("--mode", choices=("sum", "mean"), default="sum", help="with --classes: zero-shot rule")
    group.add_argument("--coefficients", type=float, nargs="+", help="with --bank: one coefficient per bank vector")
    group.add_argument(
        "--force", action="store_true", help="skip the classifier fingerprint check (recorded in the metadata)"
    )


def vector_choice(args: argparse.Namespace) -> VectorChoice:
    from fv_serving.triton.deploy import VectorChoice

    return VectorChoice(
        vector=args.vector,
        bank=args.bank,
        classes=tuple(args.classes or ()),
        mode=args.mode,
        coefficients=tuple(args.coefficients) if args.coefficients is not None else None,
        off=args.off,
    )


def add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which deployment")
    group.add_argument("--repository", help="the model repository (its server's run folder is <repository>.server)")
    group.add_argument("--run-dir", help="run folder of a server started by `fv serve` (holds server.json)")
    group.add_argument("--url", help="server URL (http://host:port or grpc://host:port) instead of a run folder")


def register(sub: argparse._SubParsersAction) -> None:
    from fv_serving.cli.common import OneLineErrorParser
    from fv_serving.triton.model_config import DEVICES, RUNTIMES
    from fv_serving.triton.switch import DEFAULT_KEEP_VERSIONS, DEFAULT_TIMEOUT_S

    triton = sub.add_parser("triton", help="build a Triton model repository (classifier + forget step + ensemble)")
    kinds = triton.add_subparsers(dest="triton_command", required=True, parser_class=OneLineErrorParser)
    p = kinds.add_parser("build", help="export/verify the graphs and write the repository")
    clf = p.add_mutually_exclusive_group(required=True)
    clf.add_argument("--classifier", help="checkpoint written by `fv train` (exported to ONNX here)")
    clf.add_argument("--classifier-onnx", help="an ONNX classifier taking raw pixels [N,C,H,W] in [0,1]")
    add_vector_choice(p)
    p.add_argument("--out", required=True, help="repository folder to write")
    p.add_argument("--fused", action="store_true", help="also add model 'fused' (vector baked in, non-bypassable)")
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

    p = sub.add_parser("serve", help="run tritonserver on a repository (foreground, or --detach)")
    p.add_argument("--repository", required=True)
    p.add_argument("--run-dir", help="state + log folder (default <repository>.server)")
    p.add_argument("--detach", action="store_true", help="return once ready; the server keeps running")
    p.add_argument("--models", nargs="+", help="models to load (default: unlearned, and fused when present)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="default: a free port")
    p.add_argument("--grpc-port", type=int, help="default: a free port")
    p.add_argument("--metrics-port", type=int, help="default: a free port")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness (default 120)")
    p.add_argument("--gpu", action="store_true", help="enable GPU metrics and pinned memory (GPU hosts)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop a server started by `fv serve` (a no-op if none runs)")
    p.add_argument("--repository", help="its repository (run folder <repository>.server)")
    p.add_argument("--run-dir", help="its run folder")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("switch", help="change the served forget vector live (the classifier stays loaded)")
    add_target(p)
    add_vector_choice(p)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for load + confirmation")
    p.add_argument(
        "--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS, help="forget_step version folders kept (>= 2)"
    )
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("status", help="server health, active vector, loaded models, statistics")
    add_target(p)
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
