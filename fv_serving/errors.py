"""The errors fv_serving raises on purpose.

Every one of them carries a message meant for an operator: it names the thing that
is wrong, what was expected and what was found. The CLI prints them as one line and
exits non-zero; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class FVError(Exception):
    """Base class: an expected failure with an operator-facing message."""


class InvalidInputError(FVError, ValueError):
    """An argument, tensor or request that does not fit (shape, dtype, range, NaN...)."""


class DataNotFoundError(FVError, FileNotFoundError):
    """A data set, checkpoint or file the user pointed at is missing."""


class FileFormatError(FVError):
    """A vector, bank or checkpoint file that cannot be trusted: corrupt, truncated, non-finite, wrong shape."""


class ModelMismatchError(FVError):
    """A vector (or bank) used with a classifier other than the one it was learned against."""


class OnnxGraphError(FVError):
    """An ONNX graph that cannot be exported, fused or checked as asked."""


class ServerError(FVError):
    """The Triton server could not be started, reached or stopped cleanly."""


class SwitchError(FVError):
    """A forget-vector switch on a running deployment failed; the previous vector keeps serving."""


class StopRequested(FVError):
    """SIGINT or SIGTERM asked a long-running command to stop; it stops at the next safe point."""
