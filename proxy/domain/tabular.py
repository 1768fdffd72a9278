"""Rows for spreadsheets: CSV cells a spreadsheet will not run as formulas (OWASP's CSV injection advice).

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is
read as a formula by Excel, LibreOffice and Sheets; such a cell is written with a
leading ``'``, which they show as text. Plain numbers (``-0.42``) stay numbers.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any, TextIO

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell that cannot start a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv(out: TextIO, columns: list[str], rows: Iterable[dict[str, Any]], *, header: bool = True) -> None:
    """``rows`` as CSV, after a header line unless ``header`` is false (a later batch of the same file)."""
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({name: safe_cell(row[name]) for name in columns} for row in rows)
