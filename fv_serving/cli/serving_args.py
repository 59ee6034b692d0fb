"""Arguments shared by the serving commands: which vector, what may be served, which deployment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fv_serving.admission import DEFAULT_MAX_ABS, AdmissionPolicy
from fv_serving.errors import InvalidInputError
from fv_serving.vector_choice import VectorChoice

if TYPE_CHECKING:
    from fv_serving.triton.supervisor import RunState


def add_vector_choice(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which forget vector (exactly one)")
    src = group.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", type=Path, help="forget-vector file (.safetensors)")
    src.add_argument("--bank", type=Path, help="vector bank: combined into one vector before serving")
    src.add_argument("--off", action="store_true", help="forgetting off (identity forget step)")
    group.add_argument("--classes", nargs="+", help="with --bank: classes to forget (index or name)")
    group.add_argument("--mode", choices=("sum", "mean"), default="sum", help="with --classes: zero-shot rule")
    group.add_argument("--coefficients", type=float, nargs="+", help="with --bank: one coefficient per bank vector")
    add_admission(parser)


def add_admission(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what may be served (fv_serving/admission.py)")
    group.add_argument(
        "--force", action="store_true", help="skip the classifier fingerprint check (recorded in the metadata)"
    )
    group.add_argument(
        "--max-abs",
        type=float,
        default=DEFAULT_MAX_ABS,
        help=f"refuse vectors with |entries| beyond this (default {DEFAULT_MAX_ABS:g}; pixels are in [0,1]; inf: none)",
    )
    group.add_argument(
        "--allow-noop", action="store_true", help="serve a vector that changes nothing (use --off to serve none)"
    )


def vector_choice(args: argparse.Namespace) -> VectorChoice:
    return VectorChoice(
        vector=args.vector,
        bank=args.bank,
        classes=tuple(args.classes or ()),
        mode=args.mode,
        coefficients=tuple(args.coefficients) if args.coefficients is not None else None,
        off=args.off,
    )


def admission_policy(args: argparse.Namespace) -> AdmissionPolicy:
    return AdmissionPolicy(max_abs=args.max_abs, allow_noop=args.allow_noop)


def print_warnings(warnings: tuple[str, ...] | list[str]) -> None:
    for warning in warnings:
        print(f"WARNING: {warning}")


# -- which deployment ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a running deployment is: its URL, repository, run folder and model-control key."""

    url: str | None
    repository: str | None  # a folder, or s3://bucket/prefix for a fleet in object storage
    run_dir: Path | None
    admin_key: str | None
    log_path: Path | None
    state: RunState | None  # the run state of a deployment `fv serve` runs (None for --url alone)


def add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which deployment")
    group.add_argument("--repository", help="the model repository (its server's run folder is <repository>.server)")
    group.add_argument("--run-dir", help="run folder of a server started by `fv serve` (holds server.json)")
    group.add_argument("--url", help="server URL (http://host:port or grpc://host:port) instead of a run folder")
    group.add_argument("--admin-key-file", help="the model-control key of a server not started here ($FV_ADMIN_KEY)")


def default_run_dir(repository: str | Path) -> Path:
    """`<repository>.server`: beside the repository, never inside it (Triton would take it for a model)."""
    repo = Path(repository).absolute()
    return repo.parent / f"{repo.name}.server"


def run_dir_of(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).absolute()
    if args.repository and not str(args.repository).startswith("s3://"):
        return default_run_dir(args.repository)
    raise InvalidInputError("say which server: --repository R (its run folder is R.server), --run-dir D or --url U")


def resolve_target(args: argparse.Namespace, need_repository: bool, need_server: bool = True) -> Target:
    """URL, repository and key from --url / --repository / --run-dir (the state `fv serve` writes)."""
    from fv_serving.triton.control import find_key
    from fv_serving.triton.supervisor import STATE_FILENAME, read_run_state

    local_repository = args.repository and not str(args.repository).startswith("s3://")
    run_dir = run_dir_of(args) if (args.run_dir or local_repository) else None
    state = None
    if run_dir is not None and (run_dir / STATE_FILENAME).is_file():
        state = read_run_state(run_dir)
    elif args.url is None and need_server:
        raise InvalidInputError(f"no server state in {run_dir}: start one with `fv serve` (or give --url)")
    url = args.url
    if url is None and state is not None:
        url = state.server.grpc_url if getattr(args, "protocol", "http") == "grpc" else state.server.http_url
    repository = args.repository or (state.server.repository if state else None)
    if repository is not None and not repository.startswith("s3://"):
        repository = str(Path(repository).absolute())
    if need_repository and repository is None:
        raise InvalidInputError("this command needs the repository's records: add --repository R")
    key = find_key(run_dir, args.admin_key_file)
    log = Path(state.server.log_path) if state is not None else None
    return Target(url, repository, run_dir, key, log, state)
