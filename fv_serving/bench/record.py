"""What a benchmark script records with its figures, and how it writes them: one json and one md per run.

Every results file says when it was made, by which command, on which machine and
under what load (the cores are shared: a figure measured at load 3 is marked so),
and describes its vectors' settings in the same words as every other page.
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


def torch_machine_line(machine: dict[str, Any]) -> str:
    """The "Machine:" sentence of a page recorded with `torch_provenance`: what its seconds were measured on."""
    m = machine
    return (
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} thread(s)), "
        f"{m['platform']}, load average {m['loadavg_start']} at start, {m['loadavg_end']} at end"
    )


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


def vector_terms(config: dict[str, Any]) -> str:
    """A `VectorConfig`'s loss (from its JSON form) in one phrase: forget term and weights."""
    c = config
    return f"{c['objective']} forget term, beta {c['beta']}, alpha {c['alpha']}, tau {c['tau']}, lambda {c['lam']}"


def vector_settings(config: dict[str, Any]) -> str:
    """How a `VectorConfig` (JSON form) optimises and stops, in one phrase: every results page describes
    its vectors with this one, so that two pages' settings lines can be compared word for word."""
    c = config
    optimiser = f"SGD lr {c['lr']} momentum {c['momentum']}" if c["optimizer"] == "sgd" else f"Adam lr {c['lr']}"
    if c["steps_per_epoch"] is None:
        batches = f"passes over D_f + D_r in batches of {c['batch_size']}"
    else:
        share = "natural proportion" if c["forget_fraction"] is None else f"{c['forget_fraction']:.0%} from D_f"
        if c.get("at_risk_share"):  # pages older than the option have no such key
            share += f", {c['at_risk_share']:.0%} from at-risk D_r"
        batches = f"batches of {c['batch_size']} drawn at random ({share}), epochs of {c['steps_per_epoch']} steps"
    holdout = "all hold-out" if c["holdout_size"] is None else f"{c['holdout_size']} hold-out (confirmed on all)"
    return (
        f"{optimiser}, {batches}{', flips' if c['augment'] else ''}, at most {c['max_epochs']} epochs, "
        f"lr x{c['gamma']} per epoch, {c['checks_per_epoch']} checks per epoch on {c['monitor_size']} forget + "
        f"{holdout} images, retain margin {c['retain_margin']}"
    )
