"""Benchmarks as library code: the CLI (`fv bench ...`) and the scripts in benchmarks/ call these."""
