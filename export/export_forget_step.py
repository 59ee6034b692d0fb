#!/usr/bin/env python
"""Write the forget step alone (`image` -> `image_fv`) for a Triton ensemble: same code as `fv export forget`.

python export/export_forget_step.py --vector v.safetensors --out step.onnx [--classifier-onnx clf.onnx]
python export/export_forget_step.py --bank bank.safetensors --classes 2 5 [--mode mean] --out step.onnx
python export/export_forget_step.py --bank bank.safetensors --coefficients 1 0 0.5 ... --out step.onnx
python export/export_forget_step.py --off --shape 1 28 28 --out step.onnx
"""

import sys

from fv_serving.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", "forget", *sys.argv[1:]]))
