"""Templates copied into Triton model repositories (not imported by fv_serving at run time).

`ort_runner/model.py` is a Triton python-backend model; `fv_serving.triton.repository`
reads it with importlib.resources and copies it into each version folder.
"""
