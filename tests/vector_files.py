"""Crafting vector files that `save_vector` would never write, to test what loading refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fv_serving.vectors import METADATA_KEY, content_digest


def craft(
    source: Path, target: Path, *, tensors: dict[str, np.ndarray] | None = None, meta: dict[str, Any] | None = None
) -> Path:
    """A copy of a vector file with tensors replaced and metadata edited (None deletes a key); digest kept valid."""
    with safe_open(str(source), framework="numpy") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = json.loads(f.metadata()[METADATA_KEY])
    original.update(tensors or {})
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    metadata["content_sha256"] = content_digest(original)
    save_file(original, str(target), metadata={METADATA_KEY: json.dumps(metadata)})
    return target
