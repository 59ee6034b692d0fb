"""The fleet layout of a repository: two pinned ensembles (blue, green) and `fleet.json`, the one route decision.

Made from a repository `fv triton build` wrote (`make_fleet_layout`), then published
to its store (`publish`). The public model name stays `unlearned`: the gateway routes
it to `unlearned_<live colour>`. A colour's ensemble is the build's ensemble with its
forget_step step pinned to one version (`model_version`), so a replica serves exactly
that vector through it, whatever other forget_step versions it has loaded.

`fleet.json` is the confirmed state of the fleet: the live colour and the version
each colour pins. A fleet switch writes it at its flip, after every replica proved it
serves the new vector; a replica or gateway that starts later reads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from tritonclient.grpc.model_config_pb2 import ModelConfig

from fv_serving.errors import FileFormatError, FVError, InvalidInputError, OnnxGraphError
from fv_serving.fleet.store import LocalStore, Store
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.deployment import DEPLOYMENT_FILENAME
from fv_serving.triton.journal import JOURNAL_FILENAME
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    METADATA_FILENAME,
    ONNX_FILENAME,
    confirmed_version,
)

FLEET_FILENAME = "fleet.json"
COLOURS = ("blue", "green")
CONFIG = mcfg.CONFIG_FILENAME


def colour_model(colour: str) -> str:
    """The Triton name of a colour's ensemble."""
    if colour not in COLOURS:
        raise InvalidInputError(f"colour must be one of {COLOURS}, got {colour!r}")
    return f"{ENSEMBLE_MODEL}_{colour}"


@dataclass(frozen=True)
class FleetState:
    """The live colour and the forget_step version each colour's ensemble pins."""

    live: str
    versions: dict[str, int]

    def __post_init__(self) -> None:
        if self.live not in COLOURS or set(self.versions) != set(COLOURS):
            raise FileFormatError(f"{FLEET_FILENAME}: live must be one of {COLOURS} with a version per colour")

    @property
    def idle(self) -> str:
        return next(c for c in COLOURS if c != self.live)

    @property
    def live_version(self) -> int:
        return self.versions[self.live]

    def flipped(self, version: int) -> FleetState:
        """The state after a flip to `version` on the idle colour."""
        return FleetState(self.idle, {**self.versions, self.idle: version})

    def to_json(self) -> dict[str, object]:
        return {"live": self.live, "versions": dict(self.versions), "public_model": ENSEMBLE_MODEL}


def read_state(store: Store) -> FleetState:
    try:
        data = json.loads(store.read(FLEET_FILENAME))
        return FleetState(str(data["live"]), {c: int(data["versions"][c]) for c in COLOURS})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{store.url}/{FLEET_FILENAME} is not a fleet state: {exc}") from exc


def write_state(store: Store, state: FleetState) -> None:
    store.write(FLEET_FILENAME, (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode())


def is_fleet(store: Store) -> bool:
    return store.exists(FLEET_FILENAME)


def read_model_config(store: Store, model: str) -> ModelConfig:
    try:
        return mcfg.parse_config(store.read(f"{model}/{CONFIG}").decode())
    except InvalidInputError as exc:
        raise InvalidInputError(f"{store.url}/{model}/{CONFIG}: {exc}") from exc


def write_model_config(store: Store, model: str, config: ModelConfig) -> None:
    store.write(f"{model}/{CONFIG}", mcfg.render_config(config).encode())


def colour_config(ensemble: ModelConfig, colour: str, version: int) -> ModelConfig:
    """The build's ensemble, renamed for `colour`, its forget_step step pinned to `version`."""
    config = ModelConfig()
    config.CopyFrom(ensemble)
    config.name = colour_model(colour)
    steps = [s for s in config.ensemble_scheduling.step if s.model_name == FORGET_STEP_MODEL]
    if len(steps) != 1:
        raise InvalidInputError(f"ensemble {ensemble.name!r} must have one {FORGET_STEP_MODEL} step")
    steps[0].model_version = version
    return config


def pinned_forget_step(store: Store) -> tuple[int, ...]:
    return mcfg.pinned_versions(read_model_config(store, FORGET_STEP_MODEL))


def pin_forget_step(store: Store, versions: Iterable[int]) -> None:
    """forget_step's config with exactly these versions loadable (the fleet's served set)."""
    config = mcfg.pin_versions(read_model_config(store, FORGET_STEP_MODEL), list(versions))
    write_model_config(store, FORGET_STEP_MODEL, config)


# -- reading a repository through its store -------------------------------------------------------


def read_classifier(store: Store) -> onnx.ModelProto:
    return _read_graph(store, f"{CLASSIFIER_MODEL}/1/{ONNX_FILENAME}")


def read_step(store: Store, version: int) -> onnx.ModelProto:
    return _read_graph(store, f"{FORGET_STEP_MODEL}/{version}/{ONNX_FILENAME}")


def read_sidecar(store: Store, version: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(store.read(f"{FORGET_STEP_MODEL}/{version}/{METADATA_FILENAME}"))
    return data


def image_shape(store: Store) -> tuple[int, int, int]:
    dims = mcfg.tensor_specs(read_model_config(store, FORGET_STEP_MODEL).input)[0].dims
    return (dims[0], dims[1], dims[2])


def class_names(store: Store) -> list[str]:
    if not store.exists(DEPLOYMENT_FILENAME):
        return []
    return list(json.loads(store.read(DEPLOYMENT_FILENAME)).get("classifier", {}).get("class_names") or [])


def step_folders(store: Store) -> list[str]:
    """Names of the folders under forget_step/ (versions and set-aside ones)."""
    keys = store.keys(f"{FORGET_STEP_MODEL}/")
    return sorted({k.split("/")[1] for k in keys if k.count("/") >= 2})


def _read_graph(store: Store, key: str) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(store.read(key))
    except FVError:
        raise
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxGraphError(f"{store.url}/{key} is not a readable ONNX graph: {exc}") from exc


def make_fleet_layout(repository: Path) -> FleetState:
    """Turn a repository `fv triton build` wrote into the fleet layout (both colours on its confirmed version)."""
    store = LocalStore(repository)
    version = confirmed_version(repository)
    ensemble = read_model_config(store, ENSEMBLE_MODEL)
    for colour in COLOURS:
        (repository / colour_model(colour) / "1").mkdir(parents=True, exist_ok=True)
        write_model_config(store, colour_model(colour), colour_config(ensemble, colour, version))
    # The floating ensemble would answer with whatever versions a fleet switch has loaded: a fleet has none.
    shutil.rmtree(repository / ENSEMBLE_MODEL)
    state = FleetState("blue", {c: version for c in COLOURS})
    write_state(store, state)
    return state


def publish(repository: Path, target: Store) -> list[str]:
    """Upload a local repository so that Triton never sees a half-written one; returns the keys written.

    Order: every model file and version folder first, then the configs (a config is
    what makes Triton load anything), fleet.json last (what makes a fleet route to it).
    Empty folders (an ensemble's `1/`) become zero-byte keys ending in "/" (S3 has no folders).
    """
    files = sorted(p for p in repository.rglob("*") if "__pycache__" not in p.parts)
    rest = [p for p in files if p.is_file() and p.name not in (CONFIG, FLEET_FILENAME, JOURNAL_FILENAME)]
    folders = [p for p in files if p.is_dir() and not any(p.iterdir())]
    configs = [p for p in files if p.is_file() and p.name == CONFIG]
    last = [p for p in files if p.is_file() and p.name == FLEET_FILENAME]
    written = []
    for path in [*rest, *folders, *configs, *last]:
        key = str(path.relative_to(repository)) + ("/" if path.is_dir() else "")
        target.write(key, b"" if path.is_dir() else path.read_bytes())
        written.append(key)
    target.append_journal("published", source=str(repository.absolute()), keys=len(written))
    return written
