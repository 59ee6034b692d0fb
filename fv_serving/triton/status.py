"""What a deployment serves right now, from the server's own answers plus the repository's records.

The server says which forget_step version is READY (the active vector), which model
versions are loaded and how often each ran; the repository says which version is
confirmed and what it holds (its sidecar JSON: vector id, forget spec, metrics, who
published it, whether the classifier check was forced, an unmet stopping rule).
Reading both is the only way to tell an operator "this exact vector is live": the
repository alone may hold a version the server never loaded, and the server alone
knows no vector ids. `problems` lists what must make `fv status` fail: a public or
composing model that is not READY, or a served version that was never confirmed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fv_serving.errors import FVError, InvalidInputError
from fv_serving.triton import journal
from fv_serving.triton.client import TritonClient
from fv_serving.triton.deployment import read_deployment
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    confirmed_version,
    list_forget_step_versions,
    read_forget_step_metadata,
)
from fv_serving.triton.server import ServerState, state_is_running

#: States worth showing; UNAVAILABLE rows with reason "unloaded" are versions replaced by earlier switches.
LIVE_STATES = ("READY", "LOADING", "UNLOADING")
UNLOADED_REASON = "unloaded"


def collect_status(
    url: str | None,
    repository: str | Path | None,
    state: ServerState | None = None,
    admin_key: str | None = None,
) -> dict[str, Any]:
    """Server health, active vector, loaded models, statistics and problems as one JSON-able dict.

    Works with a server only (no repository records), a repository only (what is
    confirmed, nothing about what is served), or both. Index and statistics are
    locked APIs: without the deployment's key they are reported as refused.
    """
    if url is None and repository is None:
        raise InvalidInputError("status needs a server URL, a repository, or a server run folder")
    repo = Path(repository) if repository is not None else None
    out: dict[str, Any] = {"server": _server_part(url, state), "repository": None, "active": None, "problems": []}
    versions: list[int] = []
    confirmed: int | None = None
    if repo is not None:
        versions = list_forget_step_versions(repo)
        confirmed = confirmed_version(repo)
        out["repository"] = {
            "path": str(repo.absolute()),
            "published_versions": versions,
            "confirmed_version": confirmed,
            "deployment": read_deployment(repo),
        }
    if url is None or not out["server"]["reachable"]:
        if url is not None:
            out["problems"].append(f"the server at {url} is not reachable")
        if repo is not None and confirmed is not None:  # what a start serves: the confirmed version
            out["active"] = {"version": confirmed, "served": None, **read_forget_step_metadata(repo, confirmed)}
        return out
    try:
        with TritonClient(url, admin_key=admin_key) as client:
            index = client.repository_index()
            stats = client.model_statistics()
    except FVError as exc:
        out["server"]["error"] = str(exc)
        out["problems"].append(f"cannot read the server's model index and statistics: {exc}")
        return out
    shown = [e for e in index if e.state in LIVE_STATES or e.reason not in ("", UNLOADED_REASON)]
    out["models"] = [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in shown]
    out["hidden_unloaded_versions"] = len(index) - len(shown)
    out["statistics"] = [
        {
            "name": s.name,
            "version": s.version,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "success": s.success_count,
            "fail": s.fail_count,
            "last_inference": _iso(s.last_inference_ms),
        }
        for s in stats
    ]
    expected = (
        [ENSEMBLE_MODEL, CLASSIFIER_MODEL, FORGET_STEP_MODEL]
        if state is None
        else sorted({*state.models, CLASSIFIER_MODEL, *([FORGET_STEP_MODEL] if ENSEMBLE_MODEL in state.models else [])})
    )
    ready_models = {e.name for e in index if e.state == "READY"}
    out["problems"] += [f"model {name!r} is not READY" for name in expected if name not in ready_models]
    ready = [
        int(e.version) for e in index if e.name == FORGET_STEP_MODEL and e.state == "READY" and e.version.isdigit()
    ]
    if ready:
        version = max(ready)
        records = read_forget_step_metadata(repo, version) if repo is not None and version in versions else {}
        out["active"] = {"version": version, "served": True, "confirmed_version": confirmed, **records}
        if confirmed is not None and version != confirmed:
            out["problems"].append(
                f"forget_step version {version} is served but version {confirmed} is the confirmed one (an "
                "interrupted switch): the next switch or restart puts the confirmed version back"
            )
    return out


def history_lines(repository: str | Path, limit: int = 20) -> list[str]:
    """The newest journal entries, one line each, for `fv status --history`."""
    lines = []
    for e in journal.read(repository)[-limit:]:
        origin, target = e.get("from") or {}, e.get("to") or {}
        parts = [f"{e.get('at', '?')}  {e.get('event', '?'):<11}", f"by {e.get('by', '?')}"]
        if origin or target:
            parts.append(
                f"{origin.get('vector_id', '-')} (v{origin.get('version', '-')}) -> "
                f"{target.get('vector_id', '-')} (v{target.get('version', '-')})"
            )
        if e.get("switch"):
            parts.append(f"switch {e['switch']}")
        if e.get("reason"):
            parts.append(f"reason: {e['reason']}")
        if e.get("confirmed"):
            parts.append(f"confirmed now: {e['confirmed'].get('vector_id')} (v{e['confirmed'].get('version')})")
        lines.append("  ".join(parts))
    return lines


def render_status(status: dict[str, Any]) -> list[str]:
    """Human-readable lines for `fv status`."""
    server = status["server"]
    lines = []
    if server.get("url"):
        health = "live and ready" if server.get("ready") else ("live" if server.get("reachable") else "NOT reachable")
        lines.append(f"server   {server['url']}: {health}")
        if not server.get("ready") and server.get("reachable"):
            lines.append("         (strict readiness: not ready while an old forget_step version is still unloading)")
        for key in ("pid", "log", "grpc_url", "metrics_url"):
            if server.get(key):
                lines.append(f"         {key} {server[key]}")
        if server.get("error"):
            lines.append(f"         error: {server['error']}")
    repo = status.get("repository")
    if repo:
        deployment = repo.get("deployment") or {}
        lines.append(
            f"repo     {repo['path']} (confirmed forget_step version {repo['confirmed_version']}; on disk: "
            f"{repo['published_versions']})"
        )
        if deployment:
            lines.append(
                f"         runtime {deployment.get('runtime')} on {deployment.get('device')}, max batch "
                f"{deployment.get('max_batch_size')}, fused model: "
                + (f"vector {deployment['fused']['vector_id']} (fixed at build)" if deployment.get("fused") else "none")
            )
    active = status.get("active")
    if active:
        lines += _active_lines(active, class_names(status))
    for row in status.get("models", []):
        reason = f" ({row['reason'][:160]})" if row["reason"] else ""
        lines.append(f"model    {row['name']:<12} v{row['version']:<4} {row['state']}{reason}")
    if status.get("hidden_unloaded_versions"):
        lines.append(
            f"         ({status['hidden_unloaded_versions']} forget_step versions unloaded by earlier switches)"
        )
    for s in status.get("statistics", []):
        marker = "  <- the classifier" if s["name"] == CLASSIFIER_MODEL else ""
        lines.append(
            f"stats    {s['name']:<12} v{s['version']:<4} inferences {s['inference_count']:>8}  executions "
            f"{s['execution_count']:>7}  ok {s['success']:>7}  failed {s['fail']:>4}  "
            f"last {s['last_inference']}{marker}"
        )
    lines += [f"PROBLEM  {p}" for p in status.get("problems", [])]
    return lines


def forgotten_classes(repository: str | Path, vector_ids: list[str]) -> list[int]:
    """Classes that answers naming these vectors should have forgotten (from the versions' sidecars)."""
    classes: set[int] = set()
    for version in list_forget_step_versions(repository):
        record = read_forget_step_metadata(repository, version)
        if record.get("vector_id") in vector_ids:
            classes |= {int(c) for c in (record.get("forget") or {}).get("classes", [])}
    initial = read_deployment(repository).get("initial_vector") or {}
    if initial.get("vector_id") in vector_ids:  # the fused model's vector, fixed at build time
        classes |= {int(c) for c in (initial.get("forget") or {}).get("classes", [])}
    return sorted(classes)


def class_names(status: dict[str, Any]) -> list[str]:
    repo = status.get("repository") or {}
    return list((repo.get("deployment") or {}).get("classifier", {}).get("class_names") or [])


def _active_lines(active: dict[str, Any], names: list[str]) -> list[str]:
    served = {True: "served", None: "latest published (server not queried)"}.get(active.get("served"), "?")
    lines = [f"vector   {active.get('vector_id', '?')} = forget_step version {active['version']} ({served})"]
    confirmed = active.get("confirmed_version")
    if confirmed is not None and confirmed != active["version"]:
        lines.append(f"         WARNING: version {confirmed} is the confirmed one; this one was never confirmed")
    if active.get("rule_met") is False:
        lines.append("         WARNING: this vector did NOT meet its stopping rule when it was learned")
    forget = active.get("forget")
    if forget:
        classes = forget.get("classes")
        what = (
            ", ".join(names[c] if c < len(names) else str(c) for c in classes)
            if classes
            else f"{forget.get('percent')}% random"
        )
        lines.append(f"         forgets {what}" + (f" ({forget['composed']})" if "composed" in forget else ""))
    elif active.get("vector_id") == "off":
        lines.append("         forgetting OFF (identity forget step)")
    metrics = active.get("metrics") or {}
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        lines.append("         metrics at creation: " + "  ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    if active.get("forced"):
        lines.append(
            f"         FORCED: classifier check skipped ({active['forced'].get('by')}, {active['forced'].get('at')})"
        )
    source = active.get("source") or {}
    if source:
        lines.append(
            f"         source {source.get('kind')} {source.get('file', '')}".rstrip()
            + f"; published {active.get('published_at')} by {active.get('published_by')}"
        )
    return lines


def _server_part(url: str | None, state: ServerState | None) -> dict[str, Any]:
    part: dict[str, Any] = {"url": url, "reachable": False, "ready": False}
    if state is not None:
        part.update(
            pid=state.pid,
            log=state.log_path,
            grpc_url=state.grpc_url,
            metrics_url=state.metrics_url,
            process_running=state_is_running(state),
        )
    if url is None:
        return part
    try:
        with TritonClient(url, timeout_s=5.0) as client:
            part["ready"] = client.is_server_ready()
            part["reachable"] = True
    except FVError as exc:
        part["error"] = str(exc)
    return part


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
