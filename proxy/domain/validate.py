"""Request validation against the model catalog, before any money or upstream call.

:func:`read_json_body` checks the envelope (content type, size, JSON object);
:func:`normalize` checks every field against the catalog and applies defaults.
The normalized params it returns are what gets priced, fingerprinted and
forwarded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import BadRequest
from .values import FieldSpec, ModelSpec

MAX_URL_LENGTH = 2048


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def url_problem(value: Any) -> str | None:
    """Why ``value`` is not an absolute http(s) URL, or None if it is one."""
    if not isinstance(value, str) or not value:
        return "must be a URL string"
    if len(value) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    if any(ch.isspace() or ord(ch) < 32 or 127 <= ord(ch) <= 159 for ch in value):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not host:
        return "must name a host"
    try:
        host.encode("idna")
    except UnicodeError:
        return "must name a valid host"
    return None


def check_value(spec: FieldSpec, value: Any) -> str | None:
    """Why ``value`` breaks ``spec``'s rules, or None when it is fine."""
    if spec.kind == "integer":
        if not _is_int(value):
            return "must be an integer"
        between = f"must be between {spec.minimum} and {spec.maximum}"
        if spec.minimum is not None and value < spec.minimum:
            return between if spec.maximum is not None else f"must be at least {spec.minimum}"
        if spec.maximum is not None and value > spec.maximum:
            return between if spec.minimum is not None else f"must be at most {spec.maximum}"
        return None
    if spec.kind == "enum":
        if not isinstance(value, str) or value not in spec.values:
            return "must be one of " + ", ".join(f'"{v}"' for v in spec.values)
        return None
    if spec.kind == "string":
        if not isinstance(value, str):
            return "must be a string"
        if not value.strip():
            return "must not be empty"
        if spec.max_length is not None and len(value) > spec.max_length:
            return f"must be at most {spec.max_length} characters"
        return None
    if spec.kind == "url":
        return url_problem(value)
    if spec.kind == "url_list":
        if not isinstance(value, list):
            return "must be an array of URLs"
        if len(value) < spec.min_items or (spec.max_items is not None and len(value) > spec.max_items):
            upper = spec.max_items if spec.max_items is not None else "any number of"
            return f"must hold {spec.min_items} to {upper} URLs (got {len(value)})"
        for index, item in enumerate(value):
            problem = url_problem(item)
            if problem:
                return f"item {index} {problem}"
        return None
    return f"has an unsupported type {spec.kind!r}"


def normalize(model: ModelSpec, body: Any) -> dict[str, Any]:
    """Check ``body`` against ``model``; return it with defaults applied, in catalog order.

    Raises :class:`BadRequest` naming every problem found, not just the first.
    A JSON ``null`` for an optional field means "not given".
    """
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    problems: list[str] = []
    unknown = sorted(name for name in body if name not in model.fields)
    if unknown:
        problems.append("unknown field(s): " + ", ".join(f"'{name}'" for name in unknown))
    params: dict[str, Any] = {}
    for name, spec in model.fields.items():
        value = body.get(name)
        if value is None:
            if spec.required:
                problems.append(f"'{name}' is required")
            elif spec.default is not None:
                params[name] = spec.default
            continue
        problem = check_value(spec, value)
        if problem:
            problems.append(f"'{name}' {problem}")
        else:
            params[name] = value
    if problems:
        raise BadRequest(f"Invalid request for {model.id}: " + "; ".join(problems))
    return params


def canonical_json(params: dict[str, Any]) -> str:
    """One spelling per meaning: keys sorted, no spaces; what is stored and later fingerprinted."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: A JSON escape of a UTF-16 surrogate (``\\ud800``-``\\udfff``): the only way a lone one can reach a str.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes, *, parse_float: Callable[[str], Any] | None = None) -> Any:
    """The JSON value in ``raw`` (UTF-8, as RFC 8259 requires); :class:`BadRequest` for anything else.

    Refused with 400 rather than failing later: an empty body, bytes that are not UTF-8, broken JSON,
    nesting too deep for the parser, and strings holding a lone surrogate (``"\\ud800"``), which no
    UTF-8 encoder (the fingerprint, the store, the upstream call) can write.
    """
    if not raw.strip():
        raise BadRequest("The request body is empty; a JSON object is expected")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_float=parse_float)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The request body is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")  # default: Decimals
        except UnicodeEncodeError:
            raise BadRequest("The request body holds a string with a lone UTF-16 surrogate") from None
    return value
