"""The Store protocol's contract, backend-neutral: every backend the factory can open runs these unchanged.

Each test opens a fresh store through ``store_at`` (the factory the gateway uses) and speaks only the protocol:
no SQL, no backend types; SQLite and PostgreSQL run the same tests. A new backend joins ``BACKENDS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.domain.errors import BudgetExceeded, TooManyRequests
from proxy.domain.values import Estimate, Hold
from proxy.store import (
    Decision,
    EntryRefused,
    IdempotencyRecord,
    JobUpdate,
    Saving,
    SettingProblem,
    Store,
    Submission,
    TeamExists,
    UnknownTeam,
)
from proxy.store.factory import store_at

PERIOD = "2026-11"
NOW = "2026-11-25T12:00:00.000000Z"
LATER = "2999-01-01T00:00:00.000000Z"

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        location, drop = str(tmp_path / "contract.db"), None
    else:
        server, reason = request.getfixturevalue("postgres_server")
        if server is None:
            pytest.skip(f"PostgreSQL: {reason}")
        location = server.create()
        drop = server.drop
    opened = store_at(location)
    await opened.open()
    try:
        yield opened
        assert await opened.ledger_mismatches() == []  # every test leaves the books sound
    finally:
        await opened.close()
        if drop is not None:
            drop(location)


def hold(amount: int, limit: int | None = None) -> Hold:
    return Hold(Estimate(amount, 6, "720p", "params", True), PERIOD, PERIOD, limit)


def submission(handle: str, *, user: str = "alice", team: str = "design", fingerprint: str | None = None,
               key: IdempotencyRecord | None = None, webhook: str | None = None, mode: str | None = None,
               cache: str = "MISS") -> Submission:
    return Submission(handle, team, user, "m", '{"prompt":"p"}', fingerprint=fingerprint, cache=cache,
                      webhook_url=webhook, webhook_mode=mode, idempotency=key)


def update(status: str, checked_at: float = 1.0, output: dict | None = None) -> JobUpdate:
    return JobUpdate(status, output, None, NOW, NOW if status == "COMPLETED" else None, checked_at)


def settle(amount: int) -> Decision:
    return Decision("settle", amount, 6, "720p", "params", "COMPLETED")


async def submitted(store: Store, handle: str, amount: int = 420_000, **kwargs) -> int:
    receipt = await store.begin_submission(submission(handle, **kwargs), hold(amount))
    await store.mark_submitted(receipt.job_id, f"up-{handle}", "QUEUED")
    return receipt.job_id


# teams


async def test_teams_are_created_read_listed_and_updated(store: Store) -> None:
    created = await store.create_team("design", 5_000_000, "month", user_cap_micros=1_000_000)
    await store.create_team("ads", 1_000_000, "week")

    updated = await store.update_team("design", budget_limit_micros=7_000_000, user_cap_micros=None)
    fetched = await store.get_team("design")

    assert (created.name, created.budget_limit_micros, created.period, created.soft_threshold_percent,
            created.user_cap_micros) == ("design", 5_000_000, "month", 80, 1_000_000)
    assert fetched == updated
    assert (updated.budget_limit_micros, updated.user_cap_micros, updated.period) == (7_000_000, None, "month")
    assert [team.name for team in await store.list_teams()] == ["ads", "design"]
    assert await store.get_team("nobody") is None


async def test_bad_team_changes_are_refused_and_change_nothing(store: Store) -> None:
    await store.create_team("design", 5_000_000, "month")

    with pytest.raises(TeamExists):
        await store.create_team("design", 1, "day")
    with pytest.raises(UnknownTeam):
        await store.update_team("nobody", budget_limit_micros=1)
    with pytest.raises(SettingProblem, match="budget_limit_micros must be a whole number of at least 0"):
        await store.update_team("design", budget_limit_micros=-1)
    with pytest.raises(SettingProblem, match="period must be one of month, week, day, total"):
        await store.update_team("design", period="year")

    team = await store.get_team("design")
    assert team is not None and (team.budget_limit_micros, team.period) == (5_000_000, "month")


# reserving money


async def test_a_submission_reserves_its_hold_in_one_step(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")

    receipt = await store.begin_submission(submission("h1"), hold(420_000))

    assert receipt.budget is not None
    assert (receipt.budget.spent_micros, receipt.budget.reserved_micros, receipt.budget.remaining_micros) == (
        0, 420_000, 580_000)
    view = await store.budget_view("design", PERIOD)
    assert (view.limit_micros, view.reserved_micros, view.remaining_micros) == (1_000_000, 420_000, 580_000)
    assert [(e.kind, e.reserved_delta, e.handle) for e in await store.ledger("design")] == [("reserve", 420_000, "h1")]
    assert await store.get_handle("h1") is None  # not shown until the upstream accepts it
    await store.mark_submitted(receipt.job_id, "up-1", "QUEUED")
    handle = await store.get_handle("h1")
    assert handle is not None and (handle.status, handle.team, handle.user, handle.upstream_id) == (
        "QUEUED", "design", "alice", "up-1")


async def test_a_hold_past_a_cap_is_refused_and_records_nothing(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month", user_cap_micros=500_000)
    await store.begin_submission(submission("h1"), hold(420_000))

    with pytest.raises(BudgetExceeded):  # alice's cap: 420k + 420k > 500k
        await store.begin_submission(submission("h2"), hold(420_000))
    with pytest.raises(BudgetExceeded):  # the team: 420k + 600k > 1M
        await store.begin_submission(submission("h3", user="bob"), hold(600_000))
    with pytest.raises(BudgetExceeded):  # the gateway-wide cap
        await store.begin_submission(submission("h4", user="bob"), hold(100_000, limit=500_000))

    assert [await store.get_handle(h) for h in ("h2", "h3", "h4")] == [None, None, None]
    assert (await store.budget_view("design", PERIOD)).reserved_micros == 420_000
    check = await store.check_hold("design", "bob", hold(500_000))
    assert (check.refusal, check.budget.remaining_micros) == (None, 580_000)
    refused = await store.check_hold("design", "bob", hold(500_001))
    assert refused.refusal == ("User 'bob' of team 'design' has $0.50 left of the $0.50 per-user cap (2026-11); "
                               "this request is estimated at $0.500001")
    assert (await store.budget_view("design", PERIOD)).reserved_micros == 420_000  # a check reserves nothing


async def test_concurrent_submissions_never_overspend(store: Store) -> None:
    await store.create_team("design", 2_100_000, "month")

    async def one(i: int) -> bool:
        try:
            await store.begin_submission(submission(f"h{i}", user=f"u{i}"), hold(420_000))
        except BudgetExceeded:
            return False
        return True

    admitted = await asyncio.gather(*(one(i) for i in range(30)))

    assert sum(admitted) == 5
    view = await store.budget_view("design", PERIOD)
    assert (view.reserved_micros, view.remaining_micros) == (2_100_000, 0)


async def test_the_concurrent_job_limit_counts_running_jobs(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month", max_concurrent_jobs=2)
    first = await submitted(store, "h1")
    second = await submitted(store, "h2")

    with pytest.raises(TooManyRequests):
        await store.begin_submission(submission("h3"), hold(420_000))
    await store.update_job(first, update("COMPLETED"), settle(420_000))
    third = await submitted(store, "h3")

    assert sorted(r.job_id for r in await store.open_reservations(LATER)) == [second, third]


# a job's life


async def test_a_completed_job_settles_once(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    job = await submitted(store, "h1")

    assert await store.update_job(job, update("PROCESSING", 2.0)) is True
    assert await store.update_job(job, update("COMPLETED", 3.0, {"media_url": ["u"]}), settle(350_000)) is True
    assert await store.update_job(job, update("FAILED", 4.0), Decision.release("late")) is False

    handle = await store.get_handle("h1")
    assert handle is not None and (handle.status, handle.output, handle.upstream_id) == (
        "COMPLETED", {"media_url": ["u"]}, "up-h1")
    view = await store.budget_view("design", PERIOD)
    assert (view.spent_micros, view.reserved_micros) == (350_000, 0)
    assert [(e.kind, e.reserved_delta, e.spent_delta) for e in await store.ledger("design")][::-1] == [
        ("reserve", 420_000, 0), ("settle", -420_000, 350_000)]
    reservation = await store.reservation(job)
    assert reservation is not None and reservation.state == "settled"


async def test_a_released_job_costs_nothing(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    job = await submitted(store, "h1")

    await store.update_job(job, update("FAILED"), Decision.release("the upstream failed it"))

    view = await store.budget_view("design", PERIOD)
    assert (view.spent_micros, view.reserved_micros) == (0, 0)


async def test_a_refused_submit_is_hidden_and_released(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    receipt = await store.begin_submission(submission("h1", fingerprint="fp"), hold(420_000))

    await store.mark_rejected(receipt.job_id, "400 from upstream")

    assert await store.get_handle("h1") is None
    assert await store.find_reusable("fp", "") is None
    assert (await store.budget_view("design", PERIOD)).reserved_micros == 0


async def test_an_indeterminate_submit_keeps_its_money_and_its_fingerprint(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    receipt = await store.begin_submission(submission("h1", fingerprint="fp"), hold(420_000))

    await store.mark_indeterminate(receipt.job_id, "timeout after sending")

    assert await store.get_handle("h1") is None  # a client learns the outcome once the sweeper resolves it
    found = await store.find_reusable("fp", "")
    assert found is not None and (found.job_id, found.status) == (receipt.job_id, "INDETERMINATE")
    assert (await store.budget_view("design", PERIOD)).reserved_micros == 420_000
    assert [r.job_id for r in await store.open_reservations(LATER)] == [receipt.job_id]
    assert await store.open_reservations("2000-01-01T00:00:00.000000Z") == []


async def test_running_jobs_are_listed_least_recently_checked_first(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month")
    jobs = [await submitted(store, f"h{i}") for i in range(3)]
    for job, checked in zip(jobs, (30.0, 10.0, 20.0), strict=True):
        await store.update_job(job, update("PROCESSING", checked))
    await store.update_job(jobs[2], update("COMPLETED", 40.0), settle(420_000))

    running = await store.active_jobs()

    assert [(r.job_id, r.upstream_id, r.checked_at) for r in running] == [
        (jobs[1], "up-h1", 10.0), (jobs[0], "up-h0", 30.0)]


# sharing jobs: dedup and idempotency


async def test_identical_requests_find_the_job_they_may_share(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month")
    running = await submitted(store, "h1", fingerprint="run")
    done = await submitted(store, "h2", fingerprint="done")
    failed = await submitted(store, "h3", fingerprint="failed")
    await store.update_job(done, update("COMPLETED"), settle(420_000))
    await store.update_job(failed, update("FAILED"), Decision.release("failed"))

    found = await store.find_reusable("run", "")
    completed = await store.find_reusable("done", "2000-01-01T00:00:00.000000Z")
    assert found is not None and (found.job_id, found.status) == (running, "QUEUED")
    assert completed is not None and (completed.job_id, completed.status) == (done, "COMPLETED")
    assert await store.find_reusable("done", LATER) is None  # completed before the TTL's start
    assert await store.find_reusable("failed", "") is None
    assert await store.find_reusable("never", "") is None


async def test_an_attached_handle_records_what_it_saved(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month")
    job = await submitted(store, "h1", fingerprint="fp")

    coalesced = await store.attach_handle(submission("h2", user="bob", cache="COALESCED"), job, Saving(PERIOD, PERIOD))
    await store.update_job(job, update("COMPLETED"), settle(350_000))
    hit = await store.attach_handle(submission("h3", user="carol", cache="HIT"), job, Saving(PERIOD, PERIOD))

    assert (coalesced, hit) == (420_000, 350_000)  # the reservation while running; the charge once settled
    views = [await store.get_handle(h) for h in ("h1", "h2", "h3")]
    assert [(v.job_id, v.status, v.user) for v in views if v is not None] == [
        (job, "COMPLETED", "alice"), (job, "COMPLETED", "bob"), (job, "COMPLETED", "carol")]
    view = await store.budget_view("design", PERIOD)
    assert (view.spent_micros, view.reserved_micros) == (350_000, 0)  # charged once
    report = await store.spend_report({"design": PERIOD})
    assert [(r.spent_micros, r.charged_jobs, r.saved_micros) for r in report] == [(350_000, 1, 770_000)]


async def test_an_idempotency_key_is_remembered_until_it_expires(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month")
    key = IdempotencyRecord("k1", "hash-1", "2026-11-26T00:00:00.000000Z")
    await submitted(store, "h1", key=key)

    remembered = await store.idempotent_handle("design", "alice", "k1", NOW)

    assert remembered is not None and (remembered.request_hash, remembered.handle, remembered.status) == (
        "hash-1", "h1", "QUEUED")
    assert await store.idempotent_handle("design", "bob", "k1", NOW) is None  # scoped to the user
    assert await store.idempotent_handle("design", "alice", "k1", "2026-11-27T00:00:00.000000Z") is None
    assert await store.purge_idempotency("2026-11-25T00:00:00.000000Z") == 0
    assert await store.purge_idempotency("2026-11-27T00:00:00.000000Z") == 1


# manual entries, reports


async def test_adjustments_and_top_ups_move_the_right_totals(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    job = await submitted(store, "h1")
    await store.update_job(job, update("COMPLETED"), settle(420_000))

    topup = await store.add_entry("design", "topup", 500_000, PERIOD, PERIOD, "admin", "extra for the launch")
    refund = await store.add_entry("design", "adjust", -20_000, PERIOD, PERIOD, "admin", "refund")
    with pytest.raises(EntryRefused):
        await store.add_entry("design", "adjust", -500_000, PERIOD, PERIOD, "admin", "more than was spent")

    assert (topup.kind, topup.credit_delta, refund.spent_delta) == ("topup", 500_000, -20_000)
    view = await store.budget_view("design", PERIOD)
    assert (view.credit_micros, view.spent_micros, view.remaining_micros) == (500_000, 400_000, 1_100_000)
    newest = await store.ledger("design", PERIOD, limit=2)
    assert [e.kind for e in newest] == ["adjust", "topup"]
    older = await store.ledger("design", PERIOD, limit=10, before_id=newest[-1].id)
    assert [e.kind for e in older] == ["settle", "reserve"]


async def test_the_spend_report_and_metric_figures_agree_with_the_books(store: Store) -> None:
    await store.create_team("design", 1_000_000, "month")
    await store.create_team("ads", 2_000_000, "month")
    done = await submitted(store, "h1")
    await submitted(store, "h2", team="ads", user="bob", amount=100_000)
    await store.update_job(done, update("COMPLETED"), settle(420_000))

    report = {row.team: row for row in await store.spend_report({"design": PERIOD, "ads": PERIOD})}
    figures = await store.metric_figures({"design": PERIOD, "ads": PERIOD})

    assert (report["design"].spent_micros, report["design"].remaining_micros, report["design"].charged_jobs) == (
        420_000, 580_000, 1)
    assert (report["ads"].reserved_micros, report["ads"].remaining_micros) == (100_000, 1_900_000)
    assert figures["pixazo_proxy_spent_usd"] == [({"team": "design", "model": "m"}, 0.42)]
    assert figures["pixazo_proxy_reserved_usd"] == [({"team": "ads", "model": "m"}, 0.1)]
    assert sorted(figures["pixazo_proxy_budget_remaining_usd"], key=lambda f: f[0]["team"]) == [
        ({"team": "ads"}, 1.9), ({"team": "design"}, 0.58)]
    assert figures["pixazo_proxy_jobs_in_flight"] == [({"model": "m", "status": "QUEUED"}, 1)]
    assert figures["pixazo_proxy_jobs_finished"] == [({"model": "m", "status": "COMPLETED"}, 1)]


# webhooks


async def test_webhook_deliveries_wait_in_the_outbox_until_done(store: Store) -> None:
    await store.create_team("design", 10_000_000, "month")
    secret = await store.webhook_secret("design")
    job = await submitted(store, "h1", webhook="https://hooks.example/a", mode="terminal")
    await store.update_job(job, update("PROCESSING"))
    await store.update_job(job, update("COMPLETED"), settle(420_000))

    due = await store.due_deliveries(LATER)
    assert [(d.handle, d.team, d.url, d.status, d.attempts) for d in due] == [
        ("h1", "design", "https://hooks.example/a", "COMPLETED", 0)]  # terminal mode: the end only
    assert await store.due_deliveries("2000-01-01T00:00:00.000000Z") == []
    await store.delivery_done(due[0].id, delivered=False, attempts=1, next_attempt_at="2026-11-25T12:00:05.000000Z",
                              error="503")
    assert await store.due_deliveries("2026-11-25T12:00:04.000000Z") == []
    retry = await store.due_deliveries("2026-11-25T12:00:05.000000Z")
    assert [(d.message_id, d.attempts) for d in retry] == [(due[0].message_id, 1)]  # the same webhook-id
    await store.delivery_done(due[0].id, delivered=True, attempts=2, next_attempt_at=None, error=None)
    assert await store.due_deliveries(LATER) == []

    assert secret.startswith("whsec_") and await store.webhook_secret("design") == secret
    rotated = await store.webhook_secret("design", rotate=True)
    assert rotated.startswith("whsec_") and rotated != secret
