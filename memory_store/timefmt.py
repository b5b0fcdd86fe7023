"""Times of traces: ISO 8601 parsing, canonical epoch seconds, and formatting.

Every time the store keeps (``recorded_at``, ``happened_at``) and every time a search filters
by (``since``, ``until``) is a float of seconds since the Unix epoch (UTC), rounded to whole
microseconds so that writing it as ISO 8601 and reading it back gives the same float (export
and import keep times exactly).

Accepted inputs: an ISO 8601 date or date-time string (``2023``, ``2023-05``,
``2023-05-08``, ``2023-05-08T13:56``, ``2023-05-08 13:56:00Z``, ``2023-05-08T13:56:00+02:00``;
a year or month means its first day; a time without a zone is UTC), a ``datetime`` /
``date``, or a finite int/float of epoch seconds. Anything else raises
:class:`TimeFormatError` naming the field.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from .errors import TimeFormatError

EXAMPLE = "e.g. 2023-05-08, 2023-05-08T13:56:00Z or 2023-05-08T13:56:00+02:00"
_YEAR_MONTH = re.compile(r"^(\d{4})(?:-(\d{2}))?$")


def canonical(ts: float) -> float:
    """``ts`` rounded to whole microseconds (the store's time resolution)."""
    return round(ts * 1_000_000) / 1_000_000


def parse_time(value: Any, field: str) -> float | None:
    """Epoch seconds (UTC, microsecond resolution) of ``value``; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TimeFormatError(f"{field}: expected an ISO 8601 time or epoch seconds, got "
                              f"{value!r}", field)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise TimeFormatError(f"{field}: {value!r} is not a finite time", field)
        return canonical(float(value))
    if isinstance(value, dt.datetime):
        when = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return canonical(when.timestamp())
    if isinstance(value, dt.date):
        return canonical(dt.datetime(value.year, value.month, value.day,
                                     tzinfo=dt.timezone.utc).timestamp())
    if isinstance(value, str):
        text = value.strip()
        try:
            m = _YEAR_MONTH.match(text)
            when = (dt.datetime(int(m.group(1)), int(m.group(2) or 1), 1) if m
                    else dt.datetime.fromisoformat(text))
        except ValueError:
            raise TimeFormatError(f"{field}: {value!r} is not an ISO 8601 date or date-time "
                                  f"({EXAMPLE})", field) from None
        return parse_time(when, field)
    raise TimeFormatError(f"{field}: expected an ISO 8601 string, datetime or epoch seconds, "
                          f"got {type(value).__name__}", field)


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC text of epoch seconds (``2023-05-08T13:56:00+00:00``), None for None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()
