"""Local copies of output media: cached answers outlive the upstream's links."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.simulator.mp4 import build_mp4
from proxy.simulator.server import Fault, Simulator
from tests.conftest import EDIT_PATH, TEXT_PATH, loopback_server, policies_with, wait_for_status


async def test_outputs_are_kept_and_served_by_the_gateway_after_upstream_links_expire(
    start_gateway, simulator: Simulator, tmp_path
) -> None:
    media_dir = tmp_path / "kept"
    gateway = await start_gateway(policies_dir=policies_with(
        tmp_path, cache=f'media: keep_copies = true\nmedia: directory = "{media_dir}"'))
    body = {"prompt": "a heron", "duration": 4, "resolution": "480p"}
    _, first, _ = await gateway.submit(TEXT_PATH, body)
    done = await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
    expected = build_mp4(4, "480p")
    name = f"{hashlib.sha256(expected).hexdigest()}.mp4"

    assert done["output"] == {"media_url": [f"{gateway.url}/media/{name}"], "media_type": "video/mp4"}
    assert (media_dir / name[:2] / name).read_bytes() == expected

    simulator.settings.media_available = False  # the upstream's links have expired
    _, hit, headers = await gateway.submit(TEXT_PATH, body)
    answer = (await gateway.status(hit["request_id"]))[1]
    async with gateway.http.get(answer["output"]["media_url"][0]) as response:
        assert (response.status, response.content_type, await response.read()) == (200, "video/mp4", expected)
    assert headers["X-Proxy-Cache"] == "HIT"
    async with gateway.http.get(f"{gateway.url}/media/{'0' * 64}.mp4") as response:
        assert response.status == 404
    async with gateway.http.get(f"{gateway.url}/media/..%2Fgateway.db") as response:
        assert response.status == 404


async def test_a_kept_copy_is_what_settles_an_edit(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(
        tmp_path, cache=f'media: keep_copies = true\nmedia: directory = "{tmp_path / "kept"}"'))
    simulator.settings.edit_video_seconds = 5
    _, body, _ = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/in.mp4"})

    await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert gateway.ledger_rows("kind", "spent_delta", "seconds", "basis")[-1] == ("settle", 400_000, 5, "output-probe")
    assert len(simulator.calls_of("submit")) == 1


async def test_without_the_policy_upstream_links_are_passed_on(gateway) -> None:
    _, body, _ = await gateway.submit()
    done = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert done["output"]["media_url"][0].startswith(gateway.upstream_url + "/media/")


class Files:
    """A loopback file server that counts what it is asked for."""

    def __init__(self) -> None:
        self.gets: list[str] = []
        self.server: TestServer | None = None

    async def serve(self, request: web.Request) -> web.Response:
        self.gets.append(request.path)
        size = int(request.match_info["size"])
        return web.Response(body=build_mp4(3, "480p") if size == 0 else bytes(size), content_type="video/mp4")

    def url(self, size: int = 0) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{size}.mp4"))


@pytest.fixture
async def files() -> AsyncIterator[Files]:
    state = Files()
    async with loopback_server(("GET", "/{size}.mp4", state.serve)) as state.server:
        yield state


async def kept_output(start_gateway, simulator: Simulator, tmp_path, media_url: list[str], **overrides) -> dict:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, cache=(
        f'media: keep_copies = true\nmedia: directory = "{tmp_path / "kept"}"\nmedia: max_bytes = 65536')),
        **overrides)
    simulator.add_fault(Fault(op="status", kind="patch", times=1000, patch={
        "output": {"media_url": media_url, "media_type": "video/mp4"}}))
    _, body, _ = await gateway.submit()
    return (await wait_for_status(gateway, body["request_id"], {"COMPLETED"}))["output"]


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "[::ffff:127.0.0.1]", "localhost"])
async def test_media_copies_never_fetch_private_addresses_unless_allowed(start_gateway, simulator: Simulator, tmp_path,
                                                                        files: Files, host: str) -> None:
    url = files.url().replace("127.0.0.1", host)

    output = await kept_output(start_gateway, simulator, tmp_path, [url], probe_allow_private=False)

    assert output["media_url"] == [url] and files.gets == []


async def test_a_copy_over_the_size_cap_is_left_upstream_and_nothing_stays_on_disk(start_gateway, simulator: Simulator,
                                                                                   tmp_path, files: Files) -> None:
    big = files.url(200_000)

    output = await kept_output(start_gateway, simulator, tmp_path, [files.url(), big])

    assert output["media_url"] == [files.url(), big]
    assert files.gets == ["/0.mp4", "/200000.mp4"]
    assert [path.name for path in (tmp_path / "kept").rglob("*") if path.is_file() and "download" in path.name] == []


async def test_a_job_listing_too_many_files_is_not_copied(start_gateway, simulator: Simulator, tmp_path,
                                                          files: Files) -> None:
    urls = [files.url() + f"?n={n}" for n in range(5)]

    output = await kept_output(start_gateway, simulator, tmp_path, urls)

    assert output["media_url"] == urls and files.gets == []
