"""The ORT runner: a generic Triton python-backend model that runs `model.onnx` with onnxruntime."""
