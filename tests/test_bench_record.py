"""Results pages describe a vector's settings in one phrasing, from the JSON form a results file stores."""

from __future__ import annotations

import json

from fv_serving.bench.record import vector_settings, vector_terms
from fv_serving.config import VectorConfig


def _stored(config: VectorConfig) -> dict:
    return json.loads(json.dumps(config.to_json(), sort_keys=True))  # as a results file holds it


def test_each_preset_reads_as_what_it_does() -> None:
    epochs = vector_settings(_stored(VectorConfig.preset("epochs")))
    assert epochs.startswith("SGD lr 0.2 momentum 0.9, passes over D_f + D_r in batches of 256, flips,")
    assert "2000 forget + all hold-out images" in epochs
    fast = vector_settings(_stored(VectorConfig.preset("fast")))
    assert fast.startswith("Adam lr 0.01, batches of 128 drawn at random (natural proportion), epochs of 20 steps,")
    assert "flips" not in fast and "1000 hold-out (confirmed on all)" in fast and fast.endswith("retain margin 1.0")
    match = _stored(VectorConfig.preset("match"))
    assert "(25% from D_f)" in vector_settings(match)
    assert vector_terms(match) == "confidence forget term, beta 3.0, alpha 1.0, tau 1.0, lambda 1.0"
