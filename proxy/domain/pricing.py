"""What a job costs: ``seconds x rate[resolution]``, in integer micro-dollars.

Before the job (:meth:`Pricer.estimate`) seconds come from the request's
``duration``; for a model whose output is as long as its input video, from
the policy's ``max_seconds`` (what the upstream can charge at most: a client
controls what a probe of its input would see), or, where the budget policy
trusts the input probe, from a probe of that video. ``resolution: auto``
reserves at the highest rate. After the job (:meth:`Pricer.actual`) an
estimate that was exact stands; otherwise the output is probed, and where
that fails the reserved figure is charged, with the basis saying so.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from .probe import MediaInfo, Prober, read_media_file
from .values import Estimate, ModelSpec, Pricing

logger = logging.getLogger(__name__)

# Bases, as the ledger records them.
FROM_PARAMS = "params"
FROM_INPUT_PROBE = "input-probe"
FROM_POLICY_MAX = "policy-max"
FROM_OUTPUT_PROBE = "output-probe"
FROM_RESERVATION = "reserved-figure"


def price(pricing: Pricing, seconds: int, resolution: str) -> int:
    return seconds * pricing.per_second_micros[resolution]


def resolution_for(info: MediaInfo, pricing: Pricing) -> str | None:
    """The priced resolution whose height fits the video's short side (``480p`` for 854x480)."""
    if info.width is None or info.height is None:
        return None
    short_side = min(info.width, info.height)
    tiers = sorted((int(m.group(1)), name) for name in pricing.per_second_micros if (m := re.fullmatch(r"(\d+)p", name)))
    for height, name in tiers:
        if short_side <= height:
            return name
    return pricing.top_resolution


class Pricer:
    def __init__(self, prober: Prober | None, *, trust_input_probe: bool = False) -> None:
        self.prober = prober
        self.trust_input_probe = trust_input_probe

    async def estimate(self, model: ModelSpec, params: dict[str, Any]) -> Estimate:
        pricing = model.pricing
        requested = params.get("resolution")
        resolution = requested if requested in pricing.per_second_micros else pricing.top_resolution
        exact = requested == resolution
        basis = FROM_PARAMS if exact else FROM_POLICY_MAX
        if pricing.seconds_field is not None:
            seconds = params[pricing.seconds_field]
        else:
            assert pricing.seconds_from_video is not None and pricing.max_seconds is not None
            trusted = self.prober if self.trust_input_probe else None
            info = await trusted.probe(params[pricing.seconds_from_video]) if trusted is not None else None
            exact = False
            if info is not None:  # the real length, even above max_seconds, which is only the fallback
                seconds, basis = info.seconds, FROM_INPUT_PROBE if basis == FROM_PARAMS else FROM_POLICY_MAX
            else:
                seconds, basis = pricing.max_seconds, FROM_POLICY_MAX
        return Estimate(price(pricing, seconds, resolution), seconds, resolution, basis, exact)

    async def actual(self, model: ModelSpec, reserved: Estimate, output: dict[str, Any] | None,
                     output_file: Path | None = None) -> Estimate:
        """The cost of a COMPLETED job (``output_file``: its first file, when already kept locally)."""
        if reserved.exact:
            return reserved
        urls = (output or {}).get("media_url") or []
        if output_file is not None:
            info = await asyncio.to_thread(read_media_file, output_file)
        elif self.prober and urls and isinstance(urls[0], str):
            info = await self.prober.probe(urls[0])
        else:
            info = None
        if info is None:
            logger.warning("output of a %s job could not be read; charging the reserved figure", model.id)
            return Estimate(reserved.amount_micros, reserved.seconds, reserved.resolution, FROM_RESERVATION, False)
        resolution = resolution_for(info, model.pricing) or reserved.resolution
        return Estimate(price(model.pricing, info.seconds, resolution), info.seconds, resolution, FROM_OUTPUT_PROBE, True)
