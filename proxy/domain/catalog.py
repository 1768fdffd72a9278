"""The model catalog: which models exist, their request fields and their prices.

Loaded from ``policies/models.toml`` (the upstream document's parameter and
price tables, written down as data), never hard-coded in handlers. Every
mistake in the file stops start-up with a :class:`~proxy.policyfile.PolicyError`
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .money import MICROS_PER_USD
from .policyfile import PolicyError, Section, read_toml
from .validate import check_value
from .values import FieldSpec, ModelSpec, Pricing

MODELS_FILE = "models.toml"

FIELD_KINDS = ("string", "integer", "enum", "url", "url_list")


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]



def default_path(model_id: str) -> str:
    return f"/{model_id}/v1/{model_id}-request"


def load_catalog(policies_dir: Path) -> Catalog:
    """Read and check ``models.toml`` in ``policies_dir``."""
    root = read_toml(policies_dir / MODELS_FILE)
    models_table = root.table("models")
    models: dict[str, ModelSpec] = {}
    for model_id in models_table.names():
        models[model_id] = _read_model(model_id, models_table.table(model_id))
    if not models:
        raise models_table.error("", "no models defined")
    root.done()
    models_table.done()
    paths = [model.path for model in models.values()]
    duplicates = {path for path in paths if paths.count(path) > 1}
    if duplicates:
        raise PolicyError(root.file, "models", f"two models share the path {sorted(duplicates)[0]}")
    return Catalog(models)


def _read_model(model_id: str, table: Section) -> ModelSpec:
    if not model_id.replace("-", "").isalnum():
        raise table.error("", "a model id may hold only letters, digits and '-'")
    title = table.string("title", model_id)
    path = table.string("path", default_path(model_id))
    if not path.startswith("/"):
        raise table.error("path", "must start with '/'")
    fields_table = table.table("fields")
    fields = {name: _read_field(name, fields_table.table(name)) for name in fields_table.names()}
    if not fields:
        raise fields_table.error("", "a model needs at least one field")
    fields_table.done()
    pricing = _read_pricing(table.table("pricing"), fields)
    table.done()
    return ModelSpec(model_id, title, path, fields, pricing)


def _read_field(name: str, table: Section) -> FieldSpec:
    kind = table.string("type")
    if kind not in FIELD_KINDS:
        raise table.error("type", f"must be one of {', '.join(FIELD_KINDS)}")
    required = table.boolean("required", False)
    spec = FieldSpec(
        name=name,
        kind=kind,
        required=required,
        minimum=table.integer("min", None) if kind == "integer" else None,
        maximum=table.integer("max", None) if kind == "integer" else None,
        values=tuple(table.string_list("values")) if kind == "enum" else (),
        min_items=table.integer("min_items", 1, minimum=0) if kind == "url_list" else 1,
        max_items=table.integer("max_items", None, minimum=1) if kind == "url_list" else None,
        max_length=table.integer("max_length", None, minimum=1),
    )
    if spec.minimum is not None and spec.maximum is not None and spec.minimum > spec.maximum:
        raise table.error("min", "is greater than max")
    if spec.max_items is not None and spec.min_items > spec.max_items:
        raise table.error("min_items", "is greater than max_items")
    if kind == "enum" and not spec.values:
        raise table.error("values", "must list at least one value")
    if table.has("default"):
        if required:
            raise table.error("default", "a required field cannot have a default")
        default = table.raw("default")
        problem = check_value(spec, default)
        if problem:
            raise table.error("default", problem)
        spec = FieldSpec(**{**spec.__dict__, "default": default})
    table.done()
    return spec


def _read_pricing(table: Section, fields: dict[str, FieldSpec]) -> Pricing:
    prices = _read_rates(table.table("per_second_usd"), fields.get("resolution"))
    from_video = table.string("seconds_from_video", None)
    if from_video is not None:
        if fields.get(from_video) is None or fields[from_video].kind != "url":
            raise table.error("seconds_from_video", "must name a url field of this model")
        max_seconds = table.integer("max_seconds", minimum=1)
        table.done()
        return Pricing(prices, seconds_field=None, seconds_from_video=from_video, max_seconds=max_seconds)
    duration = fields.get("duration")
    if duration is None or duration.kind != "integer" or duration.default is None and not duration.required:
        raise table.error("seconds_from_video", "is needed: the model has no integer 'duration' field with a default")
    table.done()
    return Pricing(prices)


def _read_rates(rates: Section, resolution: FieldSpec | None) -> dict[str, int]:
    prices: dict[str, int] = {}
    for name in rates.names():
        micros = rates.decimal(name) * MICROS_PER_USD
        if micros != micros.to_integral_value():
            raise rates.error(name, "is more precise than a micro-dollar")
        prices[name] = int(micros)
    rates.done()
    if not prices:
        raise rates.error("", "needs a price for at least one resolution")
    if resolution is not None and resolution.kind == "enum":
        missing = [value for value in resolution.values if value != "auto" and value not in prices]
        if missing:
            raise rates.error(missing[0], "has no price, but the resolution field allows it")
    return prices
