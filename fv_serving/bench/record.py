"""What a benchmark script records with its figures, and how it writes them: one json and one md per run.

Every results file says when it was made, by which command, on which machine and
under what load (the cores are shared: a figure measured at load 3 is marked so).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.bench.machine import load_average, machine_info


def provenance(load_start: list[float], **versions: str) -> dict[str, Any]:
    """date (now: call it when the report is written), command and machine (the load average at the start
    and now, and the given package versions)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine_info(), **versions, "loadavg_start": load_start, "loadavg_end": load_average()},
    }


def torch_provenance(load_start: list[float]) -> dict[str, Any]:
    """`provenance` with torch's version and intra-op threads (a learning figure depends on both).

    torch is imported here, not at the top: serving benchmarks record through this module without it.
    """
    import torch

    return provenance(load_start, torch=torch.__version__, torch_threads=str(torch.get_num_threads()))


def write_report(
    out_dir: Path, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str], name: str = "results"
) -> None:
    """<name>.json and <name>.md in `out_dir`, written atomically; the markdown is printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_json_atomic(json_path, report)
    text = markdown(report)
    write_bytes_atomic(md_path, text.encode())
    print(text)
    print(f"wrote {json_path} and {md_path}")
