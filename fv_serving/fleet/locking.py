"""One fleet switch at a time, per repository.

A local repository is locked like any other (`fv_serving.triton.locking`). S3 has no
lock: the lock is a file on the machine that runs the switch, keyed by the
repository's URL, so two switches from one operator machine (or one Kubernetes Job)
never interleave. Two machines switching the same S3 fleet at once are not
prevented: run fleet switches from one place (the README says so).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from fv_serving.fleet.store import LocalStore, Store
from fv_serving.triton.install import cache_root
from fv_serving.triton.locking import switch_lock


@contextmanager
def fleet_lock(store: Store, timeout_s: float, purpose: str) -> Iterator[None]:
    if isinstance(store, LocalStore):
        folder = store.root
    else:
        folder = cache_root() / "locks" / hashlib.sha256(store.url.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
    with switch_lock(folder, timeout_s, f"{purpose} ({store.url})"):
        yield
