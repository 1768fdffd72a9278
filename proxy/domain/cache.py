"""Never pay twice: identical requests share one upstream job (the rules; the policy is :mod:`proxy.pipeline.s6_dedup`).

The fingerprint is the model plus the canonical JSON of the normalized
request (defaults applied, keys sorted, every field), plus the team while the
scope is ``team``. A request whose fingerprint matches

* a COMPLETED job within the TTL is a **HIT**: a new handle of the caller's
  own on that job, answered at once, charged nothing, the saving recorded;
* a job still QUEUED or PROCESSING, or one being submitted right now in this
  process, is **COALESCED**: a new handle on the same job, charged nothing;
* a job whose outcome is unknown (sent, answer lost; or the gateway stopped
  mid-submit) is not sent again while it is so: 409, until the sweeper
  resolves it (or the caller asks for a bypass);
* anything else (and FAILED or ERROR jobs, which are never reused) is a
  **MISS** and goes upstream; ``Cache-Control: no-store`` or
  ``X-Proxy-Cache: bypass`` (and ``no-cache`` when the policy says so) is a
  **BYPASS**.

Concurrent identical arrivals: the first claims the fingerprint
synchronously, before its first ``await``, so exactly one of them submits;
the others wait for its outcome and attach to its job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .policyfile import read_toml
from .validate import canonical_json

CACHE_FILE = "cache.toml"


@dataclass(frozen=True)
class CacheRules:
    """``policies/cache.toml``, checked at start-up."""

    scope: str = "team"
    ttl_seconds: float = 86400.0
    honor_no_cache: bool = False
    idempotency_ttl_seconds: float = 86400.0
    keep_media: bool = False
    media_directory: Path = Path("media")
    media_max_bytes: int = 256 * 1024 * 1024
    media_max_files_per_job: int = 4
    media_concurrency: int = 2


def load_cache_rules(policies_dir: Path) -> CacheRules:
    root = read_toml(policies_dir / CACHE_FILE)
    dedup, idempotency, media = root.table("dedup"), root.table("idempotency"), root.table("media")
    directory = Path(media.string("directory", "media"))
    rules = CacheRules(
        scope=dedup.choice("scope", ("team", "global"), "team"),
        ttl_seconds=dedup.number("ttl_seconds", 86400.0),
        honor_no_cache=dedup.boolean("honor_no_cache", False),
        idempotency_ttl_seconds=idempotency.number("ttl_seconds", 86400.0),
        keep_media=media.boolean("keep_copies", False),
        media_directory=directory if directory.is_absolute() else policies_dir.parent / directory,
        media_max_bytes=media.integer("max_bytes", 256 * 1024 * 1024, minimum=1024),
        media_max_files_per_job=media.integer("max_files_per_job", 4, minimum=1),
        media_concurrency=media.integer("concurrency", 2, minimum=1),
    )
    for section in (dedup, idempotency, media, root):
        section.done()
    return rules


def fingerprint(model_id: str, params: dict[str, Any], team: str | None) -> str:
    """Equal for equivalent requests (same normalized params), different for any difference."""
    text = "\n".join((model_id, canonical_json(params), team or ""))
    return hashlib.sha256(text.encode()).hexdigest()
