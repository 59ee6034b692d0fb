#!/usr/bin/env python
"""Fuse a forget vector into an ONNX classifier graph (yours or ours): same code as `fv export fused`.

    python export/fuse_forget_vector.py --onnx in.onnx --vector v.safetensors --out out.onnx \
        [--input-name NAME] [--normalized-input --mean M.. --std S..] [--force] [--provider cpu|cuda]

The result has the same inputs and outputs as in.onnx (a drop-in replacement) and is
written only after the classifier check and the parity check pass.
"""

import sys

from fv_serving.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", "fused", *sys.argv[1:]]))
