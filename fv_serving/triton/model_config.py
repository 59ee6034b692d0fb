"""Triton model configurations, built and checked through Triton's own protobuf.

A config.pbtxt that Triton rejects is only discovered when a model fails to load,
often minutes later and on another machine. So every config this project writes is
built as a `ModelConfig` message (the schema shipped in tritonclient), rendered with
protobuf's text format and parsed back by `parse_config`, which also checks the
rules the schema alone cannot express (an ensemble has no instance group, every
tensor it routes is produced somewhere, its batch limit fits its steps...).

Tensor data types are named with Triton's wire names ("FP32", "INT64", "BYTES"): the
names tritonclient and the model metadata endpoint use. The config enum is "TYPE_" +
name, except for strings: wire "BYTES" is config TYPE_STRING.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fv_serving.atomic import write_bytes_atomic
from fv_serving.errors import InvalidInputError

Runtime = Literal["python", "onnxruntime"]
Device = Literal["cpu", "gpu"]

RUNTIMES: tuple[Runtime, ...] = ("python", "onnxruntime")
DEVICES: tuple[Device, ...] = ("cpu", "gpu")
CONFIG_FILENAME = "config.pbtxt"
ONNX_FILENAME = "model.onnx"

#: Wire names whose config enum is not "TYPE_" + name.
_CONFIG_TYPE_EXCEPTIONS = {"BYTES": "TYPE_STRING"}


def config_type(datatype: str) -> int:
    """The config enum value (mc.TYPE_FP32...) of a wire type name ("FP32", "BYTES"...)."""
    return int(mc.DataType.Value(_CONFIG_TYPE_EXCEPTIONS.get(datatype, f"TYPE_{datatype}")))


def wire_type(data_type: int) -> str:
    """The wire name of a config enum value (the inverse of `config_type`)."""
    name = mc.DataType.Name(data_type)
    return next((wire for wire, enum in _CONFIG_TYPE_EXCEPTIONS.items() if enum == name), name.removeprefix("TYPE_"))


#: The parameter keys the ORT runner (triton_models/ort_runner/model.py) reads.
RUNNER_ONNX_FILE_KEY = "onnx_file"
RUNNER_THREADS_KEY = "intra_op_threads"


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type ("FP32") and dims without the batch dim.

    A dim of -1 means variable size.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInputError("tensor name must not be empty")
        try:
            known = config_type(self.datatype) != mc.TYPE_INVALID
        except ValueError:
            known = False
        if not known:
            raise InvalidInputError(
                f"tensor {self.name!r}: unknown Triton data type {self.datatype!r}; "
                f"expected one of {', '.join(wire_type(v) for v in mc.DataType.values()[1:])}"
            )
        if any(d == 0 or d < -1 for d in self.dims):
            raise InvalidInputError(f"tensor {self.name!r}: dims must be positive or -1, got {self.dims}")


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble.

    In both maps the KEY is the composing model's tensor name and the VALUE is the
    ensemble-wide tensor name (Triton's convention; the reverse is a classic mistake).
    """

    model_name: str
    input_map: Mapping[str, str]
    output_map: Mapping[str, str]
    model_version: int = -1


def onnx_step_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    runtime: Runtime = "python",
    device: Device = "cpu",
    max_batch_size: int = 64,
    instance_count: int = 1,
    intra_op_threads: int = 1,
    served_versions: Sequence[int] | None = None,
) -> mc.ModelConfig:
    """Config of one ONNX graph served either by Triton's onnxruntime backend or by the ORT runner.

    Both forms share the IO, batching and instance settings, so an ensemble over them
    is identical. Dynamic batching without queue delay: on a few cores waiting for a
    fuller batch costs more latency than it saves. `served_versions` pins the versions
    Triton may load (version_policy specific): a version folder that is not listed is
    never served, however new, which is what makes an unconfirmed switch harmless.
    """
    _check_choice("runtime", runtime, RUNTIMES)
    _check_choice("device", device, DEVICES)
    _check_positive("max_batch_size", max_batch_size)
    _check_positive("instance_count", instance_count)
    if intra_op_threads < 0:
        raise InvalidInputError(f"intra_op_threads must be >= 0 (0 = one per core), got {intra_op_threads}")

    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    config.input.extend(_tensor(t, mc.ModelInput) for t in inputs)
    config.output.extend(_tensor(t, mc.ModelOutput) for t in outputs)
    config.dynamic_batching.max_queue_delay_microseconds = 0
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=instance_count)
    if served_versions is not None:
        pin_versions(config, served_versions)

    if runtime == "onnxruntime":
        config.backend = "onnxruntime"
        config.default_model_filename = ONNX_FILENAME
        _set_parameter(config, "intra_op_thread_count", str(intra_op_threads))
        _set_parameter(config, "inter_op_thread_count", "1")
    else:
        config.backend = "python"
        _set_parameter(config, RUNNER_ONNX_FILE_KEY, ONNX_FILENAME)
        _set_parameter(config, RUNNER_THREADS_KEY, str(intra_op_threads))
    return config


def pin_versions(config: mc.ModelConfig, versions: Sequence[int]) -> mc.ModelConfig:
    """Set version_policy specific {versions} in place (and return the config)."""
    if not versions or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in versions):
        raise InvalidInputError(f"served versions must be positive integers, got {list(versions)}")
    config.version_policy.specific.versions[:] = sorted(set(versions))
    return config


def pinned_versions(config: mc.ModelConfig) -> tuple[int, ...]:
    """The versions of a version_policy specific config (empty for latest/all policies)."""
    if config.version_policy.WhichOneof("policy_choice") != "specific":
        return ()
    return tuple(int(v) for v in config.version_policy.specific.versions)


def ensemble_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    steps: Sequence[EnsembleStep],
    *,
    max_batch_size: int,
) -> mc.ModelConfig:
    """Config of an ensemble (`platform: "ensemble"`); it takes no instance group and no model file."""
    _check_positive("max_batch_size", max_batch_size)
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    config.input.extend(_tensor(t, mc.ModelInput) for t in inputs)
    config.output.extend(_tensor(t, mc.ModelOutput) for t in outputs)
    for step in steps:
        proto = config.ensemble_scheduling.step.add(model_name=step.model_name, model_version=step.model_version)
        proto.input_map.update(step.input_map)
        proto.output_map.update(step.output_map)
    return config


def render_config(config: mc.ModelConfig) -> str:
    """The config as config.pbtxt text, validated by parsing it back."""
    text = text_format.MessageToString(config)
    parse_config(text)
    return text


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text into Triton's ModelConfig and check what the schema cannot.

    Raises InvalidInputError naming the model and the problem.
    """
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise InvalidInputError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc
    _validate(config)
    return config


def read_config(model_dir: str | Path) -> mc.ModelConfig:
    """Parse and validate `<model_dir>/config.pbtxt`."""
    path = Path(model_dir) / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{path} is missing: not a Triton model folder") from exc
    try:
        return parse_config(text)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from exc


def write_config(model_dir: str | Path, config: mc.ModelConfig) -> Path:
    """Validate, then write `<model_dir>/config.pbtxt` atomically."""
    return write_bytes_atomic(Path(model_dir) / CONFIG_FILENAME, render_config(config).encode())


def check_ensemble_steps(ensemble: mc.ModelConfig, composing: Mapping[str, mc.ModelConfig]) -> None:
    """Check an ensemble against the configs of the models it calls.

    Every mapped tensor must exist in the composing model with the data type the
    ensemble gives it, and the ensemble's max_batch_size must not exceed any step's.
    """
    ensemble_types = _ensemble_tensor_types(ensemble, composing)
    for step in ensemble.ensemble_scheduling.step:
        model = composing.get(step.model_name)
        if model is None:
            raise InvalidInputError(f"ensemble {ensemble.name!r}: no config for step model {step.model_name!r}")
        if ensemble.max_batch_size > model.max_batch_size:
            raise InvalidInputError(
                f"ensemble {ensemble.name!r}: max_batch_size {ensemble.max_batch_size} exceeds "
                f"{model.name!r}'s {model.max_batch_size}"
            )
        for kind, mapping, tensors in (
            ("input", step.input_map, model.input),
            ("output", step.output_map, model.output),
        ):
            types = {t.name: t.data_type for t in tensors}
            for model_tensor, ensemble_tensor in mapping.items():
                if model_tensor not in types:
                    raise InvalidInputError(
                        f"ensemble {ensemble.name!r}: step {model.name!r} has no {kind} {model_tensor!r} "
                        f"(it has {sorted(types)})"
                    )
                expected = ensemble_types.get(ensemble_tensor)
                if expected is not None and expected != types[model_tensor]:
                    raise InvalidInputError(
                        f"ensemble {ensemble.name!r}: tensor {ensemble_tensor!r} is "
                        f"{mc.DataType.Name(expected)} but {model.name!r} {kind} {model_tensor!r} is "
                        f"{mc.DataType.Name(types[model_tensor])}"
                    )


def tensor_specs(tensors: Iterable[mc.ModelInput] | Iterable[mc.ModelOutput]) -> tuple[TensorSpec, ...]:
    """Config inputs or outputs back as TensorSpecs."""
    return tuple(TensorSpec(t.name, wire_type(t.data_type), tuple(t.dims)) for t in tensors)


# -- helpers -----------------------------------------------------------------------------------------


def _tensor(spec: TensorSpec, cls: type[mc.ModelInput] | type[mc.ModelOutput]) -> mc.ModelInput:
    return cls(name=spec.name, data_type=config_type(spec.datatype), dims=list(spec.dims))


def _set_parameter(config: mc.ModelConfig, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _validate(config: mc.ModelConfig) -> None:
    where = f"model {config.name!r}" if config.name else "model config"
    if not config.name:
        raise InvalidInputError("model config has no name")
    if bool(config.platform) == bool(config.backend):
        raise InvalidInputError(f"{where}: set exactly one of platform and backend")
    if config.max_batch_size < 0:
        raise InvalidInputError(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            raise InvalidInputError(f"{where}: no {kind}s")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names) or not all(names):
            raise InvalidInputError(f"{where}: {kind} names must be unique and non-empty, got {names}")
        for t in tensors:
            if t.data_type == mc.TYPE_INVALID:
                raise InvalidInputError(f"{where}: {kind} {t.name!r} has no data_type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise InvalidInputError(f"{where}: {kind} {t.name!r} dims must be positive or -1, got {t.dims}")
    if config.platform == "ensemble":
        _validate_ensemble(config, where)
    elif config.HasField("ensemble_scheduling"):
        raise InvalidInputError(f"{where}: ensemble_scheduling is only valid with platform 'ensemble'")


def _validate_ensemble(config: mc.ModelConfig, where: str) -> None:
    if config.instance_group:
        raise InvalidInputError(f"{where}: an ensemble takes no instance_group")
    steps = config.ensemble_scheduling.step
    if not steps:
        raise InvalidInputError(f"{where}: ensemble has no steps")
    available = {t.name for t in config.input}
    for step in steps:
        if not step.model_name or not step.input_map or not step.output_map:
            raise InvalidInputError(f"{where}: every step needs a model_name, an input_map and an output_map")
        missing = set(step.input_map.values()) - available
        if missing:
            raise InvalidInputError(
                f"{where}: step {step.model_name!r} reads {sorted(missing)}, which no ensemble input or "
                "earlier step provides (input_map is {model tensor: ensemble tensor})"
            )
        available |= set(step.output_map.values())
    unproduced = {t.name for t in config.output} - available
    if unproduced:
        raise InvalidInputError(f"{where}: no step produces the ensemble output(s) {sorted(unproduced)}")


def _ensemble_tensor_types(ensemble: mc.ModelConfig, composing: Mapping[str, mc.ModelConfig]) -> dict[str, int]:
    """Data type of every ensemble-wide tensor: declared ones, then those produced by steps."""
    types = {t.name: t.data_type for t in (*ensemble.input, *ensemble.output)}
    for step in ensemble.ensemble_scheduling.step:
        model = composing.get(step.model_name)
        if model is None:
            continue
        outputs = {t.name: t.data_type for t in model.output}
        for model_tensor, ensemble_tensor in step.output_map.items():
            if model_tensor in outputs:
                types.setdefault(ensemble_tensor, outputs[model_tensor])
    return types
