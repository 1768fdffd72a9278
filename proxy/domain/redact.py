"""Blanking a secret out of text that came from elsewhere, whole or in pieces.

The upstream could echo the subscription key back (in an error message, a
status field, a header), whole or cut short. :class:`Redactor` replaces every
run of at least :data:`MIN_RUN` characters that also appears in the secret, so
a partial echo is caught as well as a whole one. Pure functions of strings:
no I/O, no HTTP types.
"""

from __future__ import annotations

from typing import Any

#: The shortest piece of the secret that is blanked out: long enough that random text does not match by chance.
MIN_RUN = 8
REDACTED = "[redacted]"


class Redactor:
    def __init__(self, secret: str, min_run: int = MIN_RUN) -> None:
        self._run = min(min_run, len(secret))
        self._pieces = frozenset(secret[i:i + self._run] for i in range(len(secret) - self._run + 1)) if secret else frozenset()
        # A first look, at a stride: any run of ``run`` characters holds a whole window of ``half`` characters that
        # starts at a multiple of ``half``, so text none of whose aligned windows is a piece of the secret holds no
        # run, and is passed after len(text) / half look-ups instead of one per position.
        self._half = max(1, self._run // 2)
        half = self._half
        self._halves = frozenset(secret[i:i + half] for i in range(len(secret) - half + 1)) if secret else frozenset()

    def text(self, text: str) -> str:
        """``text`` with every run of the secret's characters of :data:`MIN_RUN` or more replaced."""
        run, pieces = self._run, self._pieces
        if not pieces or len(text) < run:
            return text
        half, halves = self._half, self._halves
        if not any(text[i:i + half] in halves for i in range(0, len(text) - half + 1, half)):
            return text
        covered_to = -1  # the end (exclusive) of the last covered span
        spans: list[list[int]] = []
        for start in range(len(text) - run + 1):
            if text[start:start + run] in pieces:
                if spans and start <= covered_to:
                    spans[-1][1] = covered_to = start + run
                else:
                    spans.append([start, start + run])
                    covered_to = start + run
        if not spans:
            return text
        parts: list[str] = []
        position = 0
        for start, end in spans:
            parts.extend((text[position:start], REDACTED))
            position = end
        parts.append(text[position:])
        return "".join(parts)

    def value(self, value: Any) -> Any:
        """A JSON value with every string in it (object keys included) passed through :meth:`text`."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(key): self.value(item) for key, item in value.items()}
        return value
