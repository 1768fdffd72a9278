"""/metrics after a known sequence of requests: every family there, with the right values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.simulator.server import Simulator
from tests.conftest import Gateway
from tests.scenario import SCENARIO_TEAM, run_scenario

T2V = "grok-imagine-video-text-to-video"
SUBMIT_ROUTE = f"/{T2V}/v1/{T2V}-request"


async def scrape(gateway: Gateway) -> dict[tuple[str, frozenset], float]:
    async with gateway.http.get(gateway.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_after_a_known_sequence(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams=SCENARIO_TEAM, webhook_allow_private=True)
    await run_scenario(gateway, simulator)

    samples = await scrape(gateway)
    settled = sum(row[0] for row in gateway.ledger_rows("spent_delta")) / 1_000_000

    assert value(samples, "pixazo_proxy_spent_usd_total", team="design", model=T2V) == settled == 0.42
    assert value(samples, "pixazo_proxy_reserved_usd", team="design", model=T2V) == 0.42
    assert value(samples, "pixazo_proxy_budget_limit_usd", team="design") == 1.0
    assert value(samples, "pixazo_proxy_budget_used_usd", team="design") == 0.84
    assert round(value(samples, "pixazo_proxy_budget_remaining_usd", team="design"), 6) == 0.16
    assert value(samples, "pixazo_proxy_budget_rejections_total", team="design") == 1
    assert value(samples, "pixazo_proxy_budget_soft_limit_alerts_total", team="design") == 1
    assert value(samples, "pixazo_proxy_cache_saved_usd_total", team="design") == 0.42
    assert value(samples, "pixazo_proxy_cache_events_total", result="hit") == 1
    assert value(samples, "pixazo_proxy_cache_events_total", result="miss") == 5
    assert value(samples, "pixazo_proxy_jobs_in_flight", model=T2V, status="PROCESSING") == 1
    assert value(samples, "pixazo_proxy_jobs_finished_total", model=T2V, status="COMPLETED") == 1
    assert value(samples, "pixazo_proxy_jobs_finished_total", model=T2V, status="ERROR") == 2  # B, and E cancelled
    assert value(samples, "pixazo_proxy_job_duration_seconds_count", model=T2V) == 2
    assert value(samples, "pixazo_proxy_upstream_requests_total", operation="submit", status_class="2xx") == 3
    assert value(samples, "pixazo_proxy_upstream_requests_total", operation="submit", status_class="4xx") == 1
    assert value(samples, "pixazo_proxy_upstream_errors_total", operation="submit", kind="429") == 1
    assert value(samples, "pixazo_proxy_upstream_request_duration_seconds_count", operation="submit") == 4
    assert value(samples, "pixazo_proxy_webhook_deliveries_total", outcome="delivered") == 1
    assert value(samples, "pixazo_proxy_webhook_outbox_depth") == 0
    assert value(samples, "pixazo_proxy_requests_total", route=SUBMIT_ROUTE, model=T2V, team="design", status_class="2xx") == 5
    assert value(samples, "pixazo_proxy_requests_total", route=SUBMIT_ROUTE, model=T2V, team="design", status_class="4xx") == 1
    assert value(samples, "pixazo_proxy_upstream_throttled_total") == 1  # E's 429: absorbed, no client saw it
    assert value(samples, "pixazo_proxy_queue_admitted_total", team="design") == 2  # E, and C during E's pause
    assert value(samples, "pixazo_proxy_queue_dispatches_total", team="design") == 1  # C
    assert value(samples, "pixazo_proxy_queue_wait_seconds_count", team="design") == 1
    assert value(samples, "pixazo_proxy_queue_ended_total", team="design", reason="cancelled") == 1
    assert value(samples, "pixazo_proxy_upstream_slots_in_use") == 0
    assert value(samples, "pixazo_proxy_request_duration_seconds_count", route=SUBMIT_ROUTE) == 6
    assert value(samples, "pixazo_proxy_gateway_overhead_seconds_count", route=SUBMIT_ROUTE) == 6
    assert ("pixazo_proxy_tracker_lag_seconds", frozenset()) in samples
    assert value(samples, "pixazo_proxy_build_info", version="0.1.0", python=next(
        dict(labels)["python"] for name, labels in samples if name == "pixazo_proxy_build_info")) == 1
    assert value(samples, "pixazo_proxy_policy_models") == 4
    assert value(samples, "pixazo_proxy_policy_load_timestamp_seconds") > 1.7e9


async def test_labels_never_carry_user_or_request_ids(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams=SCENARIO_TEAM, webhook_allow_private=True)
    stuck = await run_scenario(gateway, simulator)
    await gateway.status(stuck)

    samples = await scrape(gateway)
    label_values = {value for _, labels in samples for _, value in labels}

    assert "alice" not in label_values
    assert not any("_01" in value for value in label_values)  # no handles or upstream ids
    assert {name for name, _ in samples}.isdisjoint({"user", "request_id"})
