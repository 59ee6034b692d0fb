"""fv-serving: forget vectors as an inference-time unlearning plugin for model serving.

Learn a forget vector against a frozen classifier (PyTorch), fuse it into ONNX
graphs, and switch it live in a Triton ensemble. See README.md for the map.
"""

__version__ = "0.1.0"
