"""Run the unlearning benchmark: a thin wrapper over `fv bench unlearning` (same code, same flags).

    python benchmarks/unlearning.py                 # full default run (Fashion-MNIST, small-cnn, CPU)
    python benchmarks/unlearning.py --quick --out-dir /tmp/bench   # smoke run
    python benchmarks/unlearning.py --data cifar10 --data-root DIR --arch resnet18 --device cuda

Results: benchmarks/results/unlearning/unlearning.{json,md,png}.
"""

from __future__ import annotations

import shlex
import sys

from fv_serving.cli.main import main

if __name__ == "__main__":
    command = "python benchmarks/unlearning.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sys.exit(main(["bench", "unlearning", *sys.argv[1:], "--command-line", command.strip()]))
