"""A fleet member and running one step on all of them at once.

A replica is a handle, not a client: tritonclient's HTTP client runs on gevent, whose
connections belong to the thread that made them, so every thread of a fleet step
connects for itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fv_serving.errors import FVError
from fv_serving.triton.client import TritonClient

#: A route flip: set the public model's route to this Triton model (one per gateway).
RouteFlip = Callable[[str], None]


@dataclass(frozen=True)
class Replica:
    """How to reach one replica's Triton with the deployment's key."""

    url: str
    key: str | None
    timeout_s: float

    def connect(self) -> TritonClient:
        return TritonClient(self.url, timeout_s=self.timeout_s, admin_key=self.key)


def run_on_all(members: Sequence[Any], work: Callable[[Any], None]) -> list[str]:
    """`work` on every member in parallel (a Replica is given its own client); the failures, one line each."""

    def run(member: Any) -> str | None:
        try:
            if isinstance(member, Replica):
                with member.connect() as client:
                    work(client)
            else:
                work(member)
            return None
        except FVError as exc:
            text = str(exc).strip().splitlines()
            return f"{getattr(member, 'url', member)}: {text[0] if text else type(exc).__name__}"

    with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        return [failure for failure in pool.map(run, members) if failure is not None]
