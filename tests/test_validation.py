"""Validation before any upstream call: every bad input gets a clear 400/413 in the upstream shape."""

from __future__ import annotations

import pytest

from proxy.simulator.server import Simulator
from tests.conftest import EDIT_PATH, IMAGE_PATH, REFERENCE_PATH, TEXT_PATH, Gateway, auth

TEXT = "Invalid request for grok-imagine-video-text-to-video: "
IMAGE = "Invalid request for grok-imagine-video-image-to-video: "
EDIT = "Invalid request for grok-imagine-video-edit-video: "
REFERENCE = "Invalid request for grok-imagine-video-reference-to-video: "
RATIOS = '"16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16"'
IMG = "https://img.example.com/a.png"

BAD_BODIES = [
    ("text: no prompt", TEXT_PATH, {}, TEXT + "'prompt' is required"),
    ("text: blank prompt", TEXT_PATH, {"prompt": "   "}, TEXT + "'prompt' must not be empty"),
    ("text: prompt not a string", TEXT_PATH, {"prompt": 5}, TEXT + "'prompt' must be a string"),
    ("text: duration too short", TEXT_PATH, {"prompt": "p", "duration": 2}, TEXT + "'duration' must be between 3 and 10"),
    ("text: duration too long", TEXT_PATH, {"prompt": "p", "duration": 11}, TEXT + "'duration' must be between 3 and 10"),
    ("text: duration a string", TEXT_PATH, {"prompt": "p", "duration": "6"}, TEXT + "'duration' must be an integer"),
    ("text: duration a float", TEXT_PATH, {"prompt": "p", "duration": 6.0}, TEXT + "'duration' must be an integer"),
    ("text: duration a bool", TEXT_PATH, {"prompt": "p", "duration": True}, TEXT + "'duration' must be an integer"),
    ("text: no auto ratio", TEXT_PATH, {"prompt": "p", "aspect_ratio": "auto"}, TEXT + f"'aspect_ratio' must be one of {RATIOS}"),
    ("text: 1080p", TEXT_PATH, {"prompt": "p", "resolution": "1080p"}, TEXT + "'resolution' must be one of \"480p\", \"720p\""),
    ("text: unknown fields", TEXT_PATH, {"prompt": "p", "seed": 1, "fps": 24}, TEXT + "unknown field(s): 'fps', 'seed'"),
    ("text: several problems", TEXT_PATH, {"duration": 99, "colour": "red"},
     TEXT + "unknown field(s): 'colour'; 'prompt' is required; 'duration' must be between 3 and 10"),
    ("image: no image_url", IMAGE_PATH, {"prompt": "p"}, IMAGE + "'image_url' is required"),
    ("image: ftp url", IMAGE_PATH, {"prompt": "p", "image_url": "ftp://host/a.png"},
     IMAGE + "'image_url' must be an http:// or https:// URL"),
    ("image: javascript url", IMAGE_PATH, {"prompt": "p", "image_url": "javascript:alert(1)"},
     IMAGE + "'image_url' must be an http:// or https:// URL"),
    ("image: no host", IMAGE_PATH, {"prompt": "p", "image_url": "https://"}, IMAGE + "'image_url' must name a host"),
    ("image: spaces", IMAGE_PATH, {"prompt": "p", "image_url": "https://a.com/x y.png"},
     IMAGE + "'image_url' must not contain whitespace or control characters"),
    ("image: crlf", IMAGE_PATH, {"prompt": "p", "image_url": "https://a.com/x\r\nX-Evil: 1"},
     IMAGE + "'image_url' must not contain whitespace or control characters"),
    ("image: bad port", IMAGE_PATH, {"prompt": "p", "image_url": "https://a.com:99999/x.png"},
     IMAGE + "'image_url' is not a valid URL"),
    ("image: duration 11", IMAGE_PATH, {"prompt": "p", "image_url": IMG, "duration": 11},
     IMAGE + "'duration' must be between 3 and 10"),
    ("edit: no video_url", EDIT_PATH, {"prompt": "p"}, EDIT + "'video_url' is required"),
    ("edit: 1080p", EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/a.mp4", "resolution": "1080p"},
     EDIT + "'resolution' must be one of \"auto\", \"480p\", \"720p\""),
    ("edit: no duration field", EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/a.mp4", "duration": 5},
     EDIT + "unknown field(s): 'duration'"),
    ("reference: none", REFERENCE_PATH, {"prompt": "p", "reference_image_urls": []},
     REFERENCE + "'reference_image_urls' must hold 1 to 7 URLs (got 0)"),
    ("reference: eight", REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG] * 8},
     REFERENCE + "'reference_image_urls' must hold 1 to 7 URLs (got 8)"),
    ("reference: a string", REFERENCE_PATH, {"prompt": "p", "reference_image_urls": IMG},
     REFERENCE + "'reference_image_urls' must be an array of URLs"),
    ("reference: bad item", REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG, "file:///etc/passwd"]},
     REFERENCE + "'reference_image_urls' item 1 must be an http:// or https:// URL"),
    ("reference: duration 16", REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG], "duration": 16},
     REFERENCE + "'duration' must be between 3 and 15"),
    ("not an object", TEXT_PATH, ["prompt"], "The request body must be a JSON object"),
]


@pytest.mark.parametrize(("case", "path", "body", "message"), BAD_BODIES, ids=[case for case, *_ in BAD_BODIES])
async def test_bad_bodies_are_refused_before_upstream(
    gateway: Gateway, simulator: Simulator, case: str, path: str, body: object, message: str
) -> None:
    code, answer, _ = await gateway.submit(path, body)

    assert (code, answer) == (400, {"error": "Bad Request", "message": message})
    assert simulator.calls == []


async def test_allowed_edges_pass(gateway: Gateway, simulator: Simulator) -> None:
    accepted = [
        (TEXT_PATH, {"prompt": "p", "duration": 3, "aspect_ratio": "9:16", "resolution": "480p"}),
        (TEXT_PATH, {"prompt": "p", "duration": 10}),
        (IMAGE_PATH, {"prompt": "p", "image_url": "http://img.example.com/a.webp", "aspect_ratio": "auto"}),
        (EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/a.mp4", "resolution": "720p"}),
        (REFERENCE_PATH, {"prompt": "p", "reference_image_urls": [IMG] * 7, "duration": 15}),
    ]
    for path, body in accepted:
        code, answer, _ = await gateway.submit(path, body)
        assert code == 202, answer
    assert len(simulator.calls_of("submit")) == len(accepted)


async def test_null_for_an_optional_field_means_its_default(gateway: Gateway, simulator: Simulator) -> None:
    code, _, _ = await gateway.submit(TEXT_PATH, {"prompt": "p", "duration": None, "resolution": None})

    assert code == 202
    assert simulator.calls_of("submit")[0].body == {"prompt": "p", "duration": 6, "aspect_ratio": "16:9", "resolution": "720p"}


async def _post_raw(gateway: Gateway, data: bytes | str, content_type: str | None, path: str = TEXT_PATH) -> tuple[int, dict]:
    headers = auth()
    if content_type is None:
        headers.pop("Content-Type")
    else:
        headers["Content-Type"] = content_type
    async with gateway.http.post(gateway.url + path, data=data, headers=headers) as response:
        return response.status, await response.json()


ENVELOPES = [
    ("not json", b"{prompt: cat}", "application/json", 400, "Bad Request", "The request body is not valid JSON"),
    ("not utf-8", b'{"prompt": "\xff\xfe"}', "application/json", 400, "Bad Request", "The request body is not valid JSON"),
    ("empty", b"", "application/json", 400, "Bad Request", "The request body is empty; a JSON object is expected"),
    ("text/plain", b'{"prompt": "p"}', "text/plain", 400, "Bad Request", "Content-Type must be application/json, not 'text/plain'"),
    ("form", b"prompt=p", "application/x-www-form-urlencoded", 400, "Bad Request",
     "Content-Type must be application/json, not 'application/x-www-form-urlencoded'"),
    ("too large", b'{"prompt": "' + b"a" * (1024 * 1024) + b'"}', "application/json", 413, "Payload Too Large",
     "The request body is larger than 1048576 bytes"),
]


@pytest.mark.parametrize(("case", "data", "content_type", "code", "title", "message"), ENVELOPES,
                         ids=[case for case, *_ in ENVELOPES])
async def test_bad_envelopes(gateway: Gateway, simulator: Simulator, case: str, data: bytes, content_type: str,
                             code: int, title: str, message: str) -> None:
    assert await _post_raw(gateway, data, content_type) == (code, {"error": title, "message": message})
    assert simulator.calls == []


async def test_a_chunked_body_over_the_configured_limit_is_413(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(max_body_bytes=2048)

    async def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1024
        yield b'"}'

    async with gateway.http.post(gateway.url + TEXT_PATH, data=chunks(), headers=auth()) as response:
        assert response.status == 413
        assert await response.json() == {"error": "Payload Too Large", "message": "The request body is larger than 2048 bytes"}
    assert simulator.calls == []


async def test_unknown_model_is_the_upstreams_model_not_found(gateway: Gateway, simulator: Simulator) -> None:
    path = "/grok-imagine-video-foo/v1/grok-imagine-video-foo-request"

    code, body, _ = await gateway.submit(path, {"prompt": "p"})

    assert (code, body) == (400, {"error": "Model not found", "message": "Model 'grok-imagine-video-foo' not found or is disabled"})
    assert simulator.calls == []


async def test_unknown_model_still_needs_a_token(gateway: Gateway) -> None:
    code, body, _ = await gateway.submit("/grok-imagine-video-foo/v1/x", {"prompt": "p"}, headers={})

    assert code == 401
    assert body["error"] == "Unauthorized"


async def test_wrong_method_and_unknown_route_answer_in_the_upstream_shape(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + TEXT_PATH, headers=auth()) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert await response.json() == {"error": "Method Not Allowed", "message": "Method not allowed on this route"}
    async with gateway.http.get(gateway.url + "/v3/nothing", headers=auth()) as response:
        assert response.status == 404
        assert await response.json() == {"error": "Not Found", "message": "No such route"}
