"""Put this folder on PYTHONPATH to run an interpreter in which the [learn] extra does not exist.

Every import of torch, torchvision, scikit-learn, matplotlib or onnxscript fails as
on a serving-only install, and is recorded (one name per line) in the file named by
$FV_BLOCKED_IMPORTS_LOG, so a test can show that nothing even tried.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

BLOCKED = ("torch", "torchvision", "sklearn", "matplotlib", "onnxscript")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname.split(".")[0] in BLOCKED:
            log = os.environ.get("FV_BLOCKED_IMPORTS_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(f"{fullname} (pid {os.getpid()}, {sys.argv[:3]})\n")
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: serving-only install)", name=fullname)
        return None


sys.meta_path.insert(0, _Blocker())
