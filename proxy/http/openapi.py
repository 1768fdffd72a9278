"""The OpenAPI 3 document of the gateway's whole API, served at ``GET /openapi.json``.

Submit bodies are generated from the model catalog (the same data validation
uses), so the document cannot drift from what the gateway accepts; a test
checks that every route the app serves is documented and nothing else is.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..domain.budget import PERIOD_KEY, PERIODS
from ..domain.catalog import Catalog
from ..domain.queueing import MAX_WEIGHT, ON_LIMIT
from ..domain.values import FieldSpec, ModelSpec
from ..jobs.upstream import UPSTREAM_STATUSES
from ..store import TEAM_NAME as TEAM_NAME_RE
from .admin import MAX_PAGE

ERROR = {"$ref": "#/components/schemas/Error"}
MONEY = {"type": "string", "pattern": r"^-?\d+\.\d{2,6}$"}
TEAM_NAME = {"type": "string", "pattern": f"^(?:{TEAM_NAME_RE.pattern})$"}  # JSON Schema patterns are not anchored
STATUSES = list(UPSTREAM_STATUSES)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {400: "Bad request", 401: "No valid gateway token", 402: "A budget or cost cap would be passed",
               403: "Not allowed", 404: "Not found", 405: "Method not allowed", 409: "Conflict",
               413: "Body too large", 422: "Idempotency-Key reused with another body",
               429: "Too many requests", 500: "Upstream or gateway failure", 502: "Upstream unreachable",
               503: "Upstream unavailable", 504: "Upstream timed out"}
    return {str(code): _json(ERROR, meaning[code]) for code in codes}


def field_schema(spec: FieldSpec) -> dict[str, Any]:
    url = {"type": "string", "format": "uri", "pattern": "^https?://", "maxLength": 2048}
    if spec.kind == "integer":
        schema: dict[str, Any] = {"type": "integer"}
        if spec.minimum is not None:
            schema["minimum"] = spec.minimum
        if spec.maximum is not None:
            schema["maximum"] = spec.maximum
    elif spec.kind == "enum":
        schema = {"type": "string", "enum": list(spec.values)}
    elif spec.kind == "url":
        schema = url
    elif spec.kind == "url_list":
        schema = {"type": "array", "items": url, "minItems": spec.min_items}
        if spec.max_items is not None:
            schema["maxItems"] = spec.max_items
    else:
        schema = {"type": "string", "minLength": 1, "pattern": r"\S"}
        if spec.max_length is not None:
            schema["maxLength"] = spec.max_length
    if spec.default is not None:
        schema["default"] = spec.default
    return schema


def request_schema(model: ModelSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: field_schema(spec) for name, spec in model.fields.items()},
        "required": [name for name, spec in model.fields.items() if spec.required],
        "additionalProperties": False,
    }


def _header(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


SUBMIT_HEADERS = [
    _header("X-Webhook-URL", "https URL the gateway POSTs the status to; its host must resolve to public addresses",
            {"type": "string", "format": "uri", "pattern": "^https://"}),
    _header("X-Webhook-Mode", "terminal (default) or sync", {"type": "string", "enum": ["terminal", "sync"]}),
    _header("Idempotency-Key", "1-255 printable ASCII characters", {"type": "string", "minLength": 1, "maxLength": 255}),
    _header("X-Max-Cost-USD", "refuse if the estimate is above this", {"type": "string", "pattern": r"^\d+(\.\d+)?$"}),
    _header("X-Proxy-Dry-Run", "1: price it and answer the quote, reserve nothing",
            {"type": "string", "enum": ["1", "true", "yes", "0", "false", "no"]}),
    _header("X-Proxy-Cache", "bypass: a fresh generation", {"type": "string", "enum": ["bypass"]}),
]


def _submit(model: ModelSpec) -> dict[str, Any]:
    return {"post": {
        "operationId": f"submit-{model.id}",
        "summary": f"Submit a {model.title} job",
        "tags": ["generate"],
        "parameters": SUBMIT_HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(model)}}},
        "responses": {
            "200": _json({"$ref": "#/components/schemas/Quote"}, "Dry run: the quote"),
            "202": _json({"$ref": "#/components/schemas/Accepted"}, "Accepted"),
            **_errors(400, 401, 402, 403, 409, 413, 422, 429, 500, 502, 503, 504),
        },
    }}


def _admin(operation_id: str, summary: str, response: dict[str, Any], *, body: dict[str, Any] | None = None,
           query: list[dict[str, Any]] | None = None, created: bool = False, codes: tuple[int, ...] = ()) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id, "summary": summary, "tags": ["admin"], "parameters": query or [],
        "responses": {"201" if created else "200": _json(response, "OK"), **_errors(400, 401, 403, 404, *codes)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


TEAM_PARAMETER = {"name": "team", "in": "path", "required": True, "schema": TEAM_NAME}
PERIOD = _query("period", {"type": "string", "pattern": f"^(?:{PERIOD_KEY.pattern})$"})
LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE})
TEAM_SETTINGS = {
    "budget_usd": {"type": "string", "pattern": r"^\d{1,12}(\.\d{1,6})?$"},
    "period": {"type": "string", "enum": list(PERIODS)},
    "soft_threshold_percent": {"type": "integer", "minimum": 1, "maximum": 100},
    "user_cap_usd": {"type": ["string", "null"], "pattern": r"^\d{1,12}(\.\d{1,6})?$"},
    "max_concurrent_jobs": {"type": ["integer", "null"], "minimum": 1},
    "max_submits_per_minute": {"type": ["integer", "null"], "minimum": 1},
    "weight": {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT},
    "on_limit": {"type": "string", "enum": list(ON_LIMIT)},
}
def _money_entry(amount_pattern: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["amount_usd", "reason"],
            "properties": {"amount_usd": {"type": "string", "pattern": amount_pattern},
                           "reason": {"type": "string", "minLength": 1, "maxLength": 500, "pattern": r"\S"},
                           "period": PERIOD["schema"]}}


ADJUSTMENT = _money_entry(r"^-?\d{1,12}(\.\d{1,6})?$")
TOPUP = _money_entry(r"^(?!0+(\.0+)?$)\d{1,12}(\.\d{1,6})?$")  # more than 0, at most a trillion


def build_openapi(catalog: Catalog, *, media: bool = False) -> dict[str, Any]:
    """The whole API; ``media``: include ``/media/{name}`` (served when media copies are kept)."""
    team_ref = {"$ref": "#/components/schemas/Team"}
    paths: dict[str, Any] = {model.path: _submit(model) for model in catalog.models.values()}
    paths["/v2/requests/status/{request_id}"] = {"get": {
        "operationId": "status", "summary": "Status of one of your handles", "tags": ["generate"],
        "parameters": [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json({"$ref": "#/components/schemas/Status"}, "The status"), **_errors(401, 403, 404)},
    }, "delete": {
        "operationId": "cancel", "tags": ["generate"],
        "summary": "Cancel a job still waiting in the gateway's queue (its reservation is released at once)",
        "parameters": [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json({"$ref": "#/components/schemas/Status"}, "The status it ended with (ERROR)"),
                      **_errors(401, 403, 404, 409)},
    }}
    public: dict[str, Any] = {"security": []}
    paths["/healthz"] = {"get": {"operationId": "healthz", "tags": ["operations"], **public,
                                 "responses": {"200": _json({"type": "object"}, "Up")}}}
    paths["/readyz"] = {"get": {"operationId": "readyz", "tags": ["operations"], **public, "responses": {
        "200": _json({"type": "object"}, "Ready"), "503": _json({"type": "object"}, "Not ready")}}}
    paths["/metrics"] = {"get": {"operationId": "metrics", "tags": ["operations"], **public, "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "tags": ["operations"], **public,
                                      "responses": {"200": _json({"type": "object"}, "This document")}}}
    paths["/admin/teams"] = {
        "get": _admin("list-teams", "Teams with this period's spend", {"type": "array", "items": team_ref}),
        "post": _admin("create-team", "Create a team", team_ref, created=True, codes=(409,), body={
            "type": "object", "additionalProperties": False, "required": ["name", "budget_usd"],
            "properties": {"name": TEAM_NAME, **TEAM_SETTINGS}}),
    }
    paths["/admin/teams/{team}"] = {
        "parameters": [TEAM_PARAMETER],
        "get": _admin("show-team", "One team", team_ref),
        "patch": _admin("update-team", "Change a team's budget or limits", team_ref, body={
            "type": "object", "additionalProperties": False, "properties": TEAM_SETTINGS}),
    }
    spend_ref = {"$ref": "#/components/schemas/Spend"}
    paths["/admin/teams/{team}/spend"] = {"parameters": [TEAM_PARAMETER], "get": _admin(
        "team-spend", "A team's spend for a period", spend_ref, query=[PERIOD])}
    paths["/admin/spend"] = {"get": _admin("spend", "Every team's spend", {"type": "array", "items": spend_ref},
                                           query=[PERIOD])}
    entry_ref = {"$ref": "#/components/schemas/LedgerEntry"}
    paths["/admin/teams/{team}/ledger"] = {"parameters": [TEAM_PARAMETER], "get": _admin(
        "team-ledger", "A team's ledger, newest first", {"type": "array", "items": entry_ref},
        query=[PERIOD, LIMIT, _query("before", {"type": "string", "pattern": r"^\d+$"})])}
    paths["/admin/teams/{team}/requests"] = {"parameters": [TEAM_PARAMETER], "get": _admin(
        "team-requests", "A team's handles, newest first", {"type": "array", "items": {"type": "object"}},
        query=[LIMIT, _query("before", {"type": "string"})])}
    paths["/admin/teams/{team}/topups"] = {"parameters": [TEAM_PARAMETER], "post": _admin(
        "topup", "More allowance for a period", entry_ref, body=TOPUP, created=True)}
    paths["/admin/teams/{team}/adjustments"] = {"parameters": [TEAM_PARAMETER], "post": _admin(
        "adjust", "A signed change of spend", entry_ref, body=ADJUSTMENT, created=True)}
    secret = {"type": "object", "required": ["team", "secret"],
              "properties": {"team": {"type": "string"}, "secret": {"type": "string", "pattern": "^whsec_"}}}
    paths["/admin/teams/{team}/webhook-secret"] = {
        "parameters": [TEAM_PARAMETER],
        "get": _admin("webhook-secret", "The team's webhook signing secret", secret),
        "post": _admin("rotate-webhook-secret", "Rotate it", secret, created=True),
    }
    if media:
        paths["/media/{name}"] = {"get": {
            "operationId": "media", "tags": ["generate"], **public,
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "A kept output", "content": {"video/mp4": {"schema": {
                "type": "string", "format": "binary"}}}}, **_errors(404)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pixazo-proxy", "version": __version__,
                 "description": "A gateway in front of Pixazo's Grok Imagine Video API, with the upstream's paths and shapes."},
        "security": [{"subscriptionKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": {
            "subscriptionKey": {"type": "apiKey", "in": "header", "name": "Ocp-Apim-Subscription-Key",
                                "description": "The gateway token (a JWT), where the Pixazo key used to go"},
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        }, "schemas": SCHEMAS},
    }


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "message"], "additionalProperties": False,
              "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
    "Accepted": {"type": "object", "required": ["request_id", "status", "polling_url"], "additionalProperties": False,
                 "properties": {"request_id": {"type": "string"}, "status": {"type": "string", "enum": STATUSES},
                                "polling_url": {"type": "string", "format": "uri"}}},
    "Status": {"type": "object", "additionalProperties": False,
               "required": ["request_id", "status", "model_id", "error", "output", "created_at", "updated_at",
                            "completed_at"],
               "properties": {"request_id": {"type": "string"}, "status": {"type": "string", "enum": STATUSES},
                              "model_id": {"type": "string"}, "error": {"type": ["string", "null"]},
                              "output": {"type": ["object", "null"], "properties": {
                                  "media_url": {"type": "array", "items": {"type": "string"}},
                                  "media_type": {"type": "string"}}},
                              "created_at": {"type": "string"}, "updated_at": {"type": "string"},
                              "completed_at": {"type": ["string", "null"]}}},
    "Quote": {"type": "object", "required": ["dry_run", "estimate_usd", "admitted"], "properties": {
        "dry_run": {"const": True}, "model_id": {"type": "string"}, "estimate_usd": MONEY,
        "seconds": {"type": "integer"}, "resolution": {"type": "string"}, "basis": {"type": "string"},
        "team": {"type": "string"}, "period": {"type": "string"}, "budget_limit_usd": MONEY,
        "budget_spent_usd": MONEY, "budget_reserved_usd": MONEY, "budget_remaining_usd": MONEY,
        "admitted": {"type": "boolean"}, "reason": {"type": ["string", "null"]}}},
    "Team": {"type": "object", "required": ["name", "budget_usd", "period", "current"], "properties": {
        "name": {"type": "string"}, "budget_usd": MONEY, "period": {"type": "string"},
        "soft_threshold_percent": {"type": "integer"}, "user_cap_usd": {"oneOf": [MONEY, {"type": "null"}]},
        "max_concurrent_jobs": {"type": ["integer", "null"]}, "max_submits_per_minute": {"type": ["integer", "null"]},
        "weight": {"type": "integer"}, "on_limit": {"type": "string"},
        "created_at": {"type": "string"}, "updated_at": {"type": ["string", "null"]}, "current": {"type": "object"}}},
    "Spend": {"type": "object", "required": ["team", "period", "spent_usd", "reserved_usd", "remaining_usd"],
              "properties": {"team": {"type": "string"}, "period": {"type": "string"}, "limit_usd": MONEY,
                             "credit_usd": MONEY, "spent_usd": MONEY, "reserved_usd": MONEY,
                             "remaining_usd": MONEY, "charged_jobs": {"type": "integer"}, "saved_usd": MONEY}},
    "LedgerEntry": {"type": "object", "required": ["id", "at", "kind", "team"], "properties": {
        "id": {"type": "integer"}, "at": {"type": "string"},
        "kind": {"type": "string", "enum": ["reserve", "settle", "release", "adjust", "topup", "saving"]},
        "team": {"type": "string"}}},
}
