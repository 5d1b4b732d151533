"""Read W&B run folders (offline or synced) without the network.

W&B's public API only reads runs from the server, so offline runs are invisible to it (wandb
issues #1308, #9448). Recent wandb versions (wandb-core) no longer write ``files/config.yaml``
and ``files/wandb-summary.json`` for offline runs either: everything lives in the run's
transaction log ``run-<id>.wandb``. That log uses the LevelDB log framing around
``wandb_internal_pb2.Record`` protobufs; wandb ships the protobufs but no Python reader any more,
so the few lines of framing are read here. Where the ``files/`` JSON/YAML exist (older wandb,
online runs) they are used instead.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# LevelDB log framing (github.com/google/leveldb/blob/main/doc/log_format.md), as used by wandb:
# a 7-byte file header, then 32 KiB blocks of records with a 7-byte header (crc32, length, type).
_FILE_HEADER = 7
_BLOCK = 32768
_REC_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """What one W&B run folder says about a run."""

    path: Path
    run_id: str | None = None
    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    synced: bool = False
    offline: bool = True
    problem: str | None = None


def _records(data: bytes):
    """Yield the payload of each complete record; a truncated tail (killed writer) is skipped."""
    pos, pending = _FILE_HEADER, b""
    while pos + _REC_HEADER <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < _REC_HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _REC_HEADER])
        pos += _REC_HEADER
        chunk = data[pos:pos + length]
        pos += length
        if len(chunk) < length or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            return
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        child = target.get(k)
        if not isinstance(child, dict):
            child = target[k] = {}
        target = child
    target[keys[-1]] = value


def _keys(item) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _read_log(run: WandbRun, log: Path) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _records(log.read_bytes()):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # a damaged record: keep what was read before it
            run.problem = f"{log.name} is damaged; showing the records before the damage"
            return
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id = r.run_id or run.run_id
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            for item in r.config.update:
                _set_nested(run.config, _keys(item), json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(run.config, _keys(item), json.loads(item.value_json))
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(run.summary, _keys(item), json.loads(item.value_json))
            for item in rec.summary.remove:
                run.summary.pop(_keys(item)[0], None)
        elif kind == "exit":
            run.finished = True


def _plain_config(raw: dict[str, Any]) -> dict[str, Any]:
    # files/config.yaml stores every key as {"value": ..., "desc": ...}
    return {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}


def read_wandb_run(path: str | Path) -> WandbRun:
    """Read one ``offline-run-*`` or ``run-*`` folder; problems are recorded, never raised."""
    path = Path(path)
    run = WandbRun(path=path, offline=path.name.startswith("offline-run-"))
    logs = sorted(path.glob("run-*.wandb"))
    run.synced = any(Path(str(p) + ".synced").exists() for p in logs)
    try:
        if logs:
            _read_log(run, logs[0])
    except (OSError, ImportError) as exc:
        run.problem = f"could not read {logs[0]}: {exc}"
    files = path / "files"
    try:
        if (files / "config.yaml").is_file():
            raw = yaml.safe_load((files / "config.yaml").read_text()) or {}
            run.config = {k: v for k, v in _plain_config(raw).items() if k != "_wandb"} or run.config
        if (files / "wandb-summary.json").is_file():
            run.summary = json.loads((files / "wandb-summary.json").read_text()) or run.summary
    except (OSError, ValueError, yaml.YAMLError) as exc:
        run.problem = f"could not read {files}: {exc}"
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)
    if run.run_id is None and "-" in path.name:
        run.run_id = path.name.rsplit("-", 1)[-1]
    return run


def find_wandb_runs(run_root: str | Path) -> list[WandbRun]:
    """Every W&B run folder under ``runs/<experiment>/wandb/``, oldest first."""
    base = Path(run_root) / "wandb"
    if not base.is_dir():
        return []
    folders = sorted((p for p in base.iterdir() if p.is_dir() and p.name.startswith(("offline-run-", "run-"))),
                     key=lambda p: p.name.removeprefix("offline-"))
    return [read_wandb_run(p) for p in folders]
