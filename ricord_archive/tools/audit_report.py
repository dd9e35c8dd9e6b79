"""`ricord-archive audit`: the audit trail, filtered, as a table or JSON lines. Reading it is
itself recorded (Audit Log Used, by the operating-system user)."""

from __future__ import annotations

import datetime as dt
from typing import Any, TextIO

import orjson

from ricord_archive.archive import open_index
from ricord_archive.audit_trail import (
    EVENT_IDS,
    EVENT_TYPES,
    Action,
    Outcome,
    audit_log_used,
)
from ricord_archive.config import Config
from ricord_archive.index.audit_rows import AuditFilter
from ricord_archive.index.facade import Index
from ricord_archive.tools import ToolError
from ricord_archive.tools.services import operator

_OUTCOMES = {"success": 0, "minor": 4, "serious": 8, "major": 12}
_TABLE = (("at", 32), ("event", 34), ("type", 26), ("action", 6), ("outcome", 7), ("who", 16),
          ("role", 10), ("site", 10), ("source", 15), ("protocol", 8), ("resource", 0))


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 date or date-time; without a time zone, the local one."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ToolError(f"not an ISO 8601 date or time: {text!r}") from exc
    return value if value.tzinfo else value.astimezone()


def parse_action(text: str) -> dict[str, str]:
    """--action: an EventActionCode (C R U D E), an EventID code (110112) or its meaning
    ("Query", case-insensitive)."""
    if text.upper() in {a.value for a in Action}:
        return {"action": text.upper()}
    if text in EVENT_IDS:
        return {"event_id": text}
    for code, event in EVENT_IDS.items():
        if event.meaning.lower() == text.lower():
            return {"event_id": code}
    names = ", ".join(f'"{e.meaning}"' for e in EVENT_IDS.values())
    raise ToolError(f"--action is C, R, U, D, E, an EventID code or one of {names}")


def parse_outcome(text: str) -> int:
    """--outcome: 0, 4, 8, 12 or success, minor, serious, major."""
    value = _OUTCOMES.get(text.lower(), text)
    try:
        return Outcome(int(value)).value
    except ValueError as exc:
        raise ToolError("--outcome is 0, 4, 8, 12 or success, minor, serious, major") from exc


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    event_type = EVENT_TYPES.get(row["event_type"]) if row["event_type"] else None
    return {
        "id": row["id"], "at": row["at"].isoformat(),
        "event_id": row["event_id"], "event": EVENT_IDS[row["event_id"]].meaning,
        "event_type": row["event_type"], "type": event_type.meaning if event_type else None,
        **{k: row[k] for k in ("action", "outcome", "who", "role", "site", "source", "protocol",
                                "resource", "study_uid", "series_uid", "sop_uid", "detail")},
    }


def _table_line(row: dict[str, Any]) -> str:
    cells = [str(row[name] if row[name] is not None else "-").ljust(width)
             for name, width in _TABLE]
    uids = " ".join(f"{k}={row[k]}" for k in ("study_uid", "series_uid", "sop_uid") if row[k])
    detail = orjson.dumps(row["detail"]).decode() if row["detail"] else ""
    return " ".join([*cells, uids, detail]).rstrip()


async def print_audit(config: Config, wanted: AuditFilter, as_json: bool, out: TextIO) -> None:
    """Print the events that pass the filter, oldest first, then record this reading."""
    async with open_index(config, create=False) as pool:
        audit = Index(pool).audit
        rows = [_readable(r) for r in await audit.read_events(wanted)]
        if config.audit:
            used = {k: v for k, v in vars(wanted).items() if v is not None and k != "limit"}
            await audit.insert_events([audit_log_used(operator(), used, len(rows))])
    if as_json:
        for row in rows:
            out.write(orjson.dumps(row).decode() + "\n")
        return
    print(" ".join(name.ljust(width) for name, width in _TABLE).rstrip() + " uids detail",
          file=out)
    for row in rows:
        print(_table_line(row), file=out)
