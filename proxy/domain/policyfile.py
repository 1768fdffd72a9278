"""Reading declarative policy files strictly, so a mistake fails start-up naming file and key.

A :class:`Section` wraps one TOML table and remembers where it came from.
Every accessor checks the type of what it reads; :meth:`Section.done`
refuses keys nobody asked for, so a typo (``defualt = 6``) is an error, not a
silently ignored line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any


class PolicyError(ValueError):
    """A policy file is malformed. ``str()`` reads ``file: key: problem``."""

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.file}: {key}: {problem}" if key else f"{self.file}: {problem}")


def read_toml(path: Path) -> Section:
    """Parse ``path`` as TOML; a syntax error becomes a :class:`PolicyError`."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise PolicyError(path, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(path, "", f"not valid TOML ({exc})") from None
    return Section(path, "", data)


_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Section:
    """One table of a policy file, read key by key."""

    def __init__(self, file: Path, prefix: str, data: dict[str, Any]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> PolicyError:
        return PolicyError(self.file, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def names(self) -> list[str]:
        return list(self.data)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._read.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default
        return self.data[name]

    def _typed(self, name: str, default: Any, accept: Callable[[Any], bool], wanted: str) -> Any:
        """The value at ``name`` if present and accepted; ``default`` (unchecked) if absent."""
        value = self.raw(name, default)
        if name in self.data and not accept(value):
            raise self.error(name, wanted)
        return value

    def table(self, name: str, *, required: bool = True) -> Section:
        value = self._typed(name, _MISSING if required else {}, lambda v: isinstance(v, dict), "must be a table")
        return Section(self.file, self.key(name), value)

    def string(self, name: str, default: Any = _MISSING) -> str:
        return self._typed(name, default, lambda v: isinstance(v, str) and bool(v), "must be a non-empty string")

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        return self._typed(name, default, lambda v: isinstance(v, bool), "must be true or false")

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        value = self._typed(name, default, _is_int, "must be an integer")
        if name in self.data and minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}")
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        """A positive number of seconds, bytes...: an integer or a float, greater than 0."""
        value = self._typed(
            name, default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "must be a number"
        )
        if name in self.data and not value > 0:
            raise self.error(name, "must be greater than 0")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise self.error(name, "must be one of " + ", ".join(f'"{c}"' for c in choices))
        return value

    def string_list(self, name: str, default: Any = _MISSING) -> list[str]:
        return self._typed(
            name,
            default,
            lambda v: isinstance(v, list) and all(isinstance(item, str) and item for item in v),
            "must be a list of non-empty strings",
        )

    def decimal(self, name: str, default: Any = _MISSING) -> Decimal:
        """An exact amount, written as a string (``"0.05"``) so TOML never makes it a float."""
        value = self._typed(name, default, lambda v: isinstance(v, str), 'must be a decimal written as a string, e.g. "0.05"')
        if name not in self.data:
            return value
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise self.error(name, f"{value!r} is not a decimal number") from None
        if not amount.is_finite() or amount < 0:
            raise self.error(name, "must be a finite amount of at least 0")
        return amount

    def done(self) -> None:
        """Refuse any key of this table that no accessor read."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown key")
