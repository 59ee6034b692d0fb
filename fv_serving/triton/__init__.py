"""Serving forget vectors with NVIDIA Triton: repository, configs, server process, client.

- `model_config`: Triton configs built and validated through Triton's own protobuf.
- `repository`: the model repository (classifier, forget_step, the `unlearned`
  ensemble, optionally `fused`) and publishing new forget-step versions.
- `topology`: the ensemble's two topologies (plain forget step -> classifier, or the
  gated step) and what a switch between them needs.
- `server`: the lifecycle of a real tritonserver process (attached or detached).
- `client`: inference, model control, readiness and statistics over HTTP or gRPC.

Submodules are imported on demand: `from fv_serving.triton.server import TritonServer`.
"""
