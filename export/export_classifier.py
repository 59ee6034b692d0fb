#!/usr/bin/env python
"""Export an fv-serving classifier checkpoint to one ONNX file: same code as `fv export classifier`.

python export/export_classifier.py --classifier clf.safetensors --out clf.onnx [--opset 18] [--exporter dynamo]
"""

import sys

from fv_serving.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", "classifier", *sys.argv[1:]]))
