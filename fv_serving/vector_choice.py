"""What a served forget step should add: a vector file, a composition from a bank, or nothing (off).

The same choice is made by `fv export forget`, `fv triton build` and `fv switch`, so it
is one type with one way to turn it into a vector (`resolve`), torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fv_serving.arithmetic import ZERO_SHOT_RULES, compose
from fv_serving.errors import InvalidInputError
from fv_serving.vectors import ForgetVector, load_bank, load_vector


@dataclass(frozen=True)
class VectorChoice:
    """One of: a vector file, a bank (zero-shot `classes` with `mode`, or explicit `coefficients`), or off.

    Bank compositions are baked into one delta at export (see `fv_serving.onnx.fuse.forget_step_graph`).
    """

    vector: Path | None = None
    bank: Path | None = None
    classes: tuple[str, ...] = ()
    mode: str = "sum"
    coefficients: tuple[float, ...] | None = None
    off: bool = False

    def __post_init__(self) -> None:
        given = [name for name, on in (("vector", self.vector), ("bank", self.bank), ("off", self.off)) if on]
        if len(given) != 1:
            raise InvalidInputError(
                f"choose exactly one of a vector file, a bank or off; got {', '.join(given) or 'none'}"
            )
        if self.bank is None and (self.classes or self.coefficients is not None):
            raise InvalidInputError("classes and coefficients only apply to a bank")
        if self.bank is not None and bool(self.classes) == (self.coefficients is not None):
            raise InvalidInputError("with a bank give either classes (zero-shot sum/mean) or coefficients")
        if self.mode not in ZERO_SHOT_RULES:
            raise InvalidInputError(f"mode must be one of {', '.join(ZERO_SHOT_RULES)}, got {self.mode!r}")

    def resolve(self, class_names: Sequence[str] = ()) -> ForgetVector | None:
        """Load the chosen vector (None for off); a bank composition becomes one vector here."""
        if self.off:
            return None
        if self.vector is not None:
            return load_vector(self.vector)
        assert self.bank is not None
        return compose(
            load_bank(self.bank),
            classes=self.classes,
            mode=self.mode,
            coefficients=self.coefficients,
            class_names=class_names,
        )

    def describe(self) -> dict[str, Any]:
        """How the vector was chosen, for the version's metadata (paths made absolute)."""
        if self.off:
            return {"kind": "off"}
        if self.vector is not None:
            return {"kind": "vector", "file": str(Path(self.vector).absolute())}
        out: dict[str, Any] = {"kind": "bank", "file": str(Path(str(self.bank)).absolute())}
        if self.coefficients is not None:
            out["coefficients"] = list(self.coefficients)
        else:
            out.update(classes=list(self.classes), mode=self.mode)
        return out
