"""The console's handlers over HTTP: sign-in, every page for admin and team sessions, isolation, CSRF, escaping,
and forms that change money through the same code paths as the admin API."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from decimal import Decimal

import pytest

from proxy.console.signin import LOGIN_COOKIE, SESSION_COOKIE
from proxy.simulator.server import Simulator
from proxy.store.factory import store_at
from tests.conftest import JWT_SECRET, ROOT, TEXT_PATH, Gateway, auth, ledger_mismatches, make_token, wait_for_status
from tests.console_client import ConsoleClient

PRICE = 420_000  # the default text-to-video submit: 6 s at 720p
PAGES = ("/console/", "/console/teams/design", "/console/jobs", "/console/gallery")


async def _finished(gateway: Gateway, prompt: str, **kwargs) -> str:
    code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": prompt}, headers=auth(**kwargs))
    assert code == 202, body
    await wait_for_status(gateway, body["request_id"], {"COMPLETED"}, headers=auth(**kwargs))
    return body["request_id"]


async def test_a_one_time_link_signs_in_once_with_a_strict_cookie(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as person, ConsoleClient(gateway) as other:
        link = await person.link()
        first = await person.get(link, allow_redirects=False)
        again = await other.get(link)

        assert first.status == 303 and first.headers["Location"] == "/console/"
        cookie = first.headers.getall("Set-Cookie")
        [session] = [c for c in cookie if c.startswith(SESSION_COOKIE + "=")]
        assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/console/" in session
        assert "Secure" not in session  # the public URL is http here
        assert (again.status, "sign-in link is not valid" in again.text) == (401, True)
        assert (await person.get("/console/")).status == 200
        stored = gateway.sql("SELECT id_hash FROM console_sessions")
        assert len(stored) == 1 and person.cookie(SESSION_COOKIE) not in stored[0]  # only its hash is kept


async def test_an_expired_link_and_an_expired_session_send_the_person_to_sign_in(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as person:
        link = await person.link()
        gateway.execute("UPDATE console_links SET expires_at = '2020-01-01T00:00:00.000Z'")
        assert (await person.get(link)).status == 401

        await person.sign_in()
        gateway.execute("UPDATE console_sessions SET expires_at = '2020-01-01T00:00:00.000Z'")
        page = await person.get("/console/teams/design", allow_redirects=False)
        assert (page.status, page.headers["Location"]) == (303, "/console/login")


async def test_secure_cookies_when_the_public_url_is_https(start_gateway, backend) -> None:
    gateway = await start_gateway(public_url="https://gateway.example.com")
    async with ConsoleClient(gateway) as person:
        page = await person.get(await person.link(), allow_redirects=False)
        [session] = [c for c in page.headers.getall("Set-Cookie") if c.startswith(SESSION_COOKIE + "=")]
        assert "Secure" in session


async def test_signing_in_with_a_pasted_token_needs_the_forms_own_cookie(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as person, ConsoleClient(gateway) as forger:
        form = await person.get("/console/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
        assert person.cookie(LOGIN_COOKIE) == nonce

        forged = await forger.post("/console/login", {"nonce": nonce, "token": make_token(role="admin")})
        bad = await person.post("/console/login", {"nonce": nonce, "token": "not.a.token"})
        assert forged.status == 403 and "expired" in forged.text
        assert bad.status == 401 and 'id="login-error"' in bad.text

        form = await person.get("/console/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
        page = await person.post("/console/login", {"nonce": nonce, "token": make_token(user="bob")})
        assert page.status == 200 and page.url.endswith("/console/")
        assert "read-only" in page.text and "<bdi>bob</bdi>" in page.text


async def test_every_page_for_an_admin_and_for_a_team_session(gateway: Gateway) -> None:
    await _finished(gateway, "a lighthouse for design")
    await _finished(gateway, "a harbour for research", team="research", user="rhea")
    async with ConsoleClient(gateway) as admin, ConsoleClient(gateway) as member:
        await admin.sign_in(admin=True)
        await member.sign_in(team="design", user="alice", admin=False)
        for path in PAGES:
            for person in (admin, member):
                page = await person.get(path)
                assert page.status == 200, (path, page.text[:500])
                assert page.headers["X-Frame-Options"] == "DENY"
                csp = page.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        overview_admin, overview_member = await admin.get("/console/"), await member.get("/console/")
        assert 'data-team="research"' in overview_admin.text and 'data-team="design"' in overview_admin.text
        assert 'data-team="research"' not in overview_member.text  # a team session sees its own team only
        jobs_admin, jobs_member = await admin.get("/console/jobs"), await member.get("/console/jobs")
        assert "a harbour for research" in jobs_admin.text and "a harbour for research" not in jobs_member.text
        team = await member.get("/console/teams/design")
        assert 'id="settings"' not in team.text and 'id="topup"' not in team.text  # read-only
        assert team.by_id("spent") == "$0.42" and team.by_id("remaining") == "$49.58"


async def test_a_team_session_gets_404_for_another_teams_pages_and_data(gateway: Gateway) -> None:
    await _finished(gateway, "research's own video", team="research", user="rhea")
    async with ConsoleClient(gateway) as member:
        await member.sign_in(team="design", user="alice", admin=False)
        for path in ("/console/teams/research", "/console/teams/research/ledger.csv", "/console/jobs?team=research",
                     "/console/gallery?team=research", "/console/teams/nobody"):
            page = await member.get(path)
            assert page.status == 404, path
            assert "research's own video" not in page.text
        gallery = await member.get("/console/gallery")
        assert "research's own video" not in gallery.text
        refused = await member.post("/console/teams/design/topups", {"amount_usd": "5", "reason": "more"},
                                    csrf=(await member.get("/console/teams/design")).csrf)
        assert refused.status == 403
    assert [kind for (kind,) in gateway.ledger_rows("kind")] == ["reserve", "settle"]


async def test_a_form_without_the_sessions_csrf_token_changes_nothing(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        for csrf in (None, "forged-token-value"):
            page = await admin.post("/console/teams/design/settings", {"budget_usd": "999"}, csrf=csrf)
            assert page.status == 403 and "did not come from the console" in page.text
        page = await admin.post("/console/logout", {}, csrf=None)
        assert page.status == 403
    assert gateway.sql("SELECT budget_limit_micros FROM teams WHERE name = 'design'") == [(50_000_000,)]


async def test_hostile_prompts_and_names_are_escaped_and_isolated(gateway: Gateway) -> None:
    prompt = "<script>alert('p')</script> \"quoted\" \u202eevil\u202c done"
    user = "<img src=x onerror=alert(1)>\u202e"
    await _finished(gateway, prompt, user=user)
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        for path in ("/console/jobs", "/console/gallery", "/console/teams/design"):
            page = await admin.get(path)
            assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
            if path != "/console/gallery":  # tiles name the team, not the user
                assert "&lt;img src=x onerror=alert(1)&gt;" in page.text, path  # shown, as text
        jobs = await admin.get("/console/jobs")
        assert "<bdi>&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt; &#34;quoted&#34; \u202eevil\u202c done</bdi>" in jobs.text
        missing = await admin.get("/console/teams/%3Cscript%3Ex")
        assert missing.status == 404 and "<script>x" not in missing.text and "&lt;script&gt;x" in missing.text


async def test_limits_saved_in_the_console_are_what_the_api_and_the_next_submit_see(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as admin:
        page = await admin.sign_in()
        page = await admin.post("/console/teams/design/settings", {
            "budget_usd": "0.50", "period": "month", "soft_threshold_percent": "70", "user_cap_usd": "",
            "max_concurrent_jobs": "3", "max_submits_per_minute": ""}, csrf=page.csrf)
        assert page.status == 200 and page.by_id("notice") == "Settings saved." and page.by_id("limit") == "$0.50"
        async with gateway.http.get(gateway.url + "/admin/teams/design", headers=auth(role="admin")) as response:
            shown = await response.json()
        assert (shown["budget_usd"], shown["soft_threshold_percent"], shown["max_concurrent_jobs"]) == ("0.50", 70, 3)
        assert (await gateway.submit())[0] == 202
        assert (await gateway.submit())[0] == 402  # 0.42 + 0.42 > 0.50

        bad = await admin.post("/console/teams/design/settings", {"budget_usd": "ten", "soft_threshold_percent": "500"},
                               csrf=page.csrf)
        assert bad.status == 400
        assert "is not an amount in USD" in bad.by_id("e-budget_usd")
        assert gateway.sql("SELECT budget_limit_micros FROM teams WHERE name = 'design'") == [(500_000,)]
        team = await admin.get("/console/teams/design")
        assert "Team 'design' has $0.08 left" in team.by_id("refusals")  # the 402 the team was given


async def test_topups_and_adjustments_need_a_reason_and_name_the_person(gateway: Gateway) -> None:
    await _finished(gateway, "a video to refund")
    async with ConsoleClient(gateway) as admin:
        page = await admin.sign_in(user="finance-fiona")
        missing = await admin.post("/console/teams/design/topups", {"amount_usd": "5"}, csrf=page.csrf)
        assert missing.status == 400 and "'reason' is required" in missing.by_id("e-topup_reason")
        over = await admin.post("/console/teams/design/adjustments", {"amount_usd": "-9", "reason": "too much"},
                                csrf=page.csrf)
        assert over.status == 400 and "below zero" in over.by_id("e-adjust_amount_usd")
        topup = await admin.post("/console/teams/design/topups", {"amount_usd": "5", "reason": "launch week"},
                                 csrf=page.csrf)
        refund = await admin.post("/console/teams/design/adjustments", {"amount_usd": "-0.42", "reason": "bad take"},
                                  csrf=page.csrf)
        assert "Top-up of $5.00 recorded" in topup.by_id("notice") and topup.by_id("credit") == "$5.00"
        assert refund.by_id("spent") == "$0.00" and refund.by_id("remaining") == "$55.00"
    assert gateway.ledger_rows("kind", "credit_delta", "spent_delta", "actor", "note")[-2:] == [
        ("topup", 5_000_000, 0, "finance-fiona", "launch week"), ("adjust", 0, -420_000, "finance-fiona", "bad take")]
    assert await ledger_mismatches(gateway.db_path) == []


async def test_the_csv_export_holds_exactly_what_the_filters_show(gateway: Gateway) -> None:
    for n in range(3):
        await _finished(gateway, f"take {n}", user="alice" if n < 2 else "bob")
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        page = await admin.get("/console/teams/design?kind=settle&user=alice")
        link = re.search(r'id="csv" href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
        exported = await admin.get(link)
    assert exported.headers["Content-Type"].startswith("text/csv")
    assert 'attachment; filename="ledger-design-' in exported.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    expected = gateway.sql("SELECT id, spent_delta FROM ledger WHERE kind = 'settle' AND user_id = 'alice' ORDER BY id DESC")
    assert [(int(r["id"]), r["kind"], r["user"], r["spent_delta_usd"]) for r in rows] == [
        (entry_id, "settle", "alice", "0.42") for entry_id, _ in expected]
    assert len(rows) == 2


async def test_rotating_the_webhook_secret_needs_the_team_name_typed(gateway: Gateway) -> None:
    before = await gateway.services.store.webhook_secret("design")
    async with ConsoleClient(gateway) as admin:
        page = await admin.sign_in()
        unconfirmed = await admin.post("/console/teams/design/webhook-secret", {"confirm": "yes"}, csrf=page.csrf)
        assert unconfirmed.status == 400 and "Type the team" in unconfirmed.by_id("e-confirm")
        assert await gateway.services.store.webhook_secret("design") == before
        rotated = await admin.post("/console/teams/design/webhook-secret", {"confirm": "design"}, csrf=page.csrf)
        after = await gateway.services.store.webhook_secret("design")
        assert after != before and rotated.by_id("new-secret") == after
        assert after not in (await admin.get("/console/teams/design")).text  # shown once, never again


async def test_jobs_filters_stay_in_the_url_and_rows_show_money_and_cache(gateway: Gateway) -> None:
    first = await _finished(gateway, "the same shot")
    code, hit, headers = await gateway.submit(TEXT_PATH, {"prompt": "the same shot"})
    assert (code, headers["X-Proxy-Cache"]) == (202, "HIT")
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        misses = await admin.get("/console/jobs?cache=MISS&status=COMPLETED")
        hits = await admin.get("/console/jobs?cache=HIT")
        wrong = await admin.get("/console/jobs?status=DONE")
    assert f'data-handle="{first}"' in misses.text and hit["request_id"] not in misses.text
    row = misses.text[misses.text.index(f'data-handle="{first}"'):].split("</tr>")[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[7:12] == ["$0.42", "$0.42", "params", "MISS", "COMPLETED"]  # estimate, charged, basis, cache, status
    assert f'data-handle="{hit["request_id"]}"' in hits.text and first not in hits.text
    assert '<option selected>HIT</option>' in hits.text  # the filter shows what is chosen
    assert wrong.status == 400 and "&#39;status&#39; must be one of QUEUED" in wrong.text


async def test_the_gallery_plays_the_videos_of_completed_jobs(gateway: Gateway) -> None:
    handle = await _finished(gateway, "a gallery piece")
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        page = await admin.get("/console/gallery")
    code, status = await gateway.status(handle)
    [url] = status["output"]["media_url"]
    tile = page.text[page.text.index(f'data-handle="{handle}"'):].split("</li>")[0]
    assert f'<video controls preload="metadata" src="{url}">' in tile and "$0.42" in tile


async def test_signing_out_ends_the_session_in_the_store(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as admin:
        page = await admin.sign_in()
        cookie = admin.cookie(SESSION_COOKIE)
        out = await admin.post("/console/logout", {}, csrf=page.csrf)
        assert out.url.endswith("/console/login")
        assert gateway.sql("SELECT COUNT(*) FROM console_sessions") == [(0,)]
        admin.http.cookie_jar.update_cookies({SESSION_COOKIE: cookie})  # the old cookie, replayed
        replay = await admin.get("/console/", allow_redirects=False)
        assert replay.status == 303


async def test_the_cli_prints_a_one_time_link_that_signs_in(gateway: Gateway) -> None:
    env = {**os.environ, "PROXY_DB": gateway.db_path, "PROXY_PUBLIC_URL": gateway.url, "PROXY_JWT_SECRET": JWT_SECRET}
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "console", "link", "--team", "design", "--user", "ops",
                           "--admin", "--ttl", "2m"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(gateway.url + "/console/login?token=")
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "console", "link", "--team", "nobody", "--user", "x"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no team named 'nobody'" in bad.stderr
    async with ConsoleClient(gateway) as person:
        page = await person.get(link)
    assert page.status == 200 and "<bdi>ops</bdi>" in page.text and "admin" in page.text


async def test_the_day_rollup_equals_the_ledger_and_rebuilds_from_it(gateway: Gateway) -> None:
    await _finished(gateway, "rolled up")
    assert await ledger_mismatches(gateway.db_path) == []
    gateway.execute("UPDATE day_rollup SET charged_micros = charged_micros + 1")
    [mismatch] = await ledger_mismatches(gateway.db_path)
    assert mismatch.startswith("day rollup design ")

    env = {**os.environ, "PROXY_DB": gateway.db_path}
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "rollup", "rebuild"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "day rollup rebuilt from the ledger: 1 rows"
    assert await ledger_mismatches(gateway.db_path) == []
    store = store_at(gateway.db_path)
    await store.open()
    try:
        [line] = await store.daily_spend("design", "2000-01-01", "2100-01-01")
    finally:
        await store.close()
    assert (line.jobs, line.seconds, line.charged_micros, line.model) == (1, 6, PRICE, "grok-imagine-video-text-to-video")


@pytest.mark.parametrize("path", ["/console/", "/console/teams/design", "/console/jobs", "/console/gallery"])
async def test_pages_without_a_session_redirect_to_sign_in(gateway: Gateway, path: str) -> None:
    async with ConsoleClient(gateway) as stranger:
        page = await stranger.get(path, allow_redirects=False)
        forged = await stranger.get(path, allow_redirects=False, headers={"Cookie": f"{SESSION_COOKIE}=" + "A" * 43})
    assert (page.status, page.headers["Location"]) == (303, "/console/login")
    assert forged.status == 303


async def test_a_session_begun_with_a_pasted_token_ends_when_the_token_does(gateway: Gateway) -> None:
    async with ConsoleClient(gateway) as person:
        form = await person.get("/console/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
        page = await person.post("/console/login", {"nonce": nonce, "token": make_token(ttl=60)}, allow_redirects=False)
    [session] = [c for c in page.headers.getall("Set-Cookie") if c.startswith(SESSION_COOKIE + "=")]
    max_age = int(re.search(r"Max-Age=(\d+)", session).group(1))
    assert 50 <= max_age <= 60  # not the 8 hours a link's session lasts
    [(expires,)] = gateway.sql("SELECT expires_at FROM console_sessions")
    [(created,)] = gateway.sql("SELECT created_at FROM console_sessions")
    gap = datetime.fromisoformat(expires.replace("Z", "+00:00")) - datetime.fromisoformat(created.replace("Z", "+00:00"))
    assert 50 <= gap.total_seconds() <= 60


async def test_a_csv_longer_than_one_batch_is_streamed_whole(gateway: Gateway) -> None:
    store = gateway.services.store
    for n in range(1003):  # more than one batch of 1000
        await store.add_entry("design", "topup", 1_000 + n, "2026-12", "2026-12", "seed", f"top-up {n}")
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        exported = await admin.get("/console/teams/design/ledger.csv?period=2026-12&kind=topup")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 1003 and exported.text.count("id,at,kind") == 1  # one header
    assert [row["note"] for row in rows[:2]] == ["top-up 1002", "top-up 1001"] and rows[-1]["note"] == "top-up 0"
    assert sum(Decimal(row["credit_delta_usd"]) for row in rows) == Decimal(sum(1_000 + n for n in range(1003))) / 10**6
    assert [row["credit_delta_usd"] for row in rows[-2:]] == ["0.001001", "0.001"]


async def test_a_total_budget_charts_from_its_first_day_of_spend(start_gateway) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": 50_000_000, "period": "total"}})
    await _finished(gateway, "spent once, forever")
    async with ConsoleClient(gateway) as admin:
        await admin.sign_in()
        page = await admin.get("/console/teams/design")
    [chart] = re.findall(r"data-chart='([^']*)'", page.text)  # one period, so one chart
    figures = json.loads(html.unescape(chart))
    assert figures["period"] == "total" and len(figures["days"]) == 1  # today, not every day since 2000
    assert figures["series"] == [{"label": "text-to-video", "micros": [PRICE]}]


async def test_the_team_page_shows_its_queue_and_sets_its_share(gateway: Gateway, simulator: Simulator) -> None:
    simulator.settings.processing_seconds = 30  # the first job holds the team's one slot while the test looks
    async with ConsoleClient(gateway) as admin:
        page = await admin.sign_in()
        page = await admin.post("/console/teams/design/settings", {
            "budget_usd": "50", "period": "month", "soft_threshold_percent": "80", "user_cap_usd": "",
            "max_concurrent_jobs": "1", "max_submits_per_minute": "", "weight": "3", "on_limit": "queue"},
            csrf=page.csrf)
        assert page.status == 200 and page.by_id("notice") == "Settings saved."
        assert gateway.sql("SELECT weight, on_limit FROM teams WHERE name = 'design'") == [(3, "queue")]
        handles = []
        for n in range(3):  # the first runs (the simulator keeps it running), the other two wait
            code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": f"queued {n}"},
                                                 headers=auth() | {"X-Proxy-Priority": str(n)})
            assert code == 202
            handles.append(body["request_id"])
        team = await admin.get("/console/teams/design")
        assert team.by_id("queue-summary").startswith("2 waiting; the oldest for ")
        rows = team.by_id("queue")
        assert rows.index(handles[2]) < rows.index(handles[1])  # the higher priority first
        bad = await admin.post("/console/teams/design/settings", {"weight": "0", "on_limit": "drop"}, csrf=page.csrf)
        assert bad.status == 400 and "between 1 and 1000" in bad.by_id("e-weight")
