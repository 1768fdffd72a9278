"""Value types several layers share: the catalog's model specs, who is calling, what a job is estimated at, what
to hold back for it.

A leaf module: it imports nothing of the gateway's, so domain logic, the store
and the request pipeline can all use these without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Principal:
    """The caller a valid token names."""

    user: str
    team: str
    admin: bool = False


@dataclass(frozen=True)
class Estimate:
    """What a job costs (or is expected to), in micro-dollars, and what the figure rests on."""

    amount_micros: int
    seconds: int
    resolution: str
    basis: str
    exact: bool  # known from the request alone: no need to look at the output to settle


@dataclass(frozen=True)
class Hold:
    """What the store is asked to reserve for one job, and against which caps."""

    estimate: Estimate
    period_key: str
    global_period_key: str
    global_limit_micros: int | None


@dataclass(frozen=True)
class FieldSpec:
    """One request field as the upstream's parameter table gives it."""

    name: str
    kind: str
    required: bool = False
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    values: tuple[str, ...] = ()
    min_items: int = 1
    max_items: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Pricing:
    """How a model's cost is known: seconds x rate[resolution], in micro-dollars."""

    per_second_micros: dict[str, int]
    seconds_field: str | None = "duration"
    seconds_from_video: str | None = None
    max_seconds: int | None = None

    @property
    def top_resolution(self) -> str:
        """The resolution with the highest rate: what an unknown resolution reserves."""
        return max(self.per_second_micros, key=lambda name: (self.per_second_micros[name], name))


@dataclass(frozen=True)
class ModelSpec:
    """One upstream model: its submit path, fields, and pricing."""

    id: str
    title: str
    path: str
    fields: dict[str, FieldSpec]
    pricing: Pricing
