"""A person's browser, as far as the console's handler tests need one: cookies kept, forms posted with their CSRF token."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import aiohttp

from proxy.console.signin import new_link
from proxy.store import ConsoleIdentity
from tests.conftest import Gateway, RecordingResponse

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class _TextOf(HTMLParser):
    VOID = {"input", "br", "img", "meta", "link", "hr", "source"}

    def __init__(self, element_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.element_id, self.depth, self.found, self.parts = element_id, 0, False, []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.depth += tag not in self.VOID
        elif dict(attrs).get("id") == self.element_id and not self.found:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.parts.append(data)


class Page:
    def __init__(self, status: int, text: str, headers: Any, url: str) -> None:
        self.status, self.text, self.headers, self.url = status, text, headers, url

    def by_id(self, element_id: str) -> str:
        """The text inside the element with ``id``, nested elements included (tags stripped, entities decoded)."""
        finder = _TextOf(element_id)
        finder.feed(self.text)
        assert finder.found, f"no element #{element_id} on {self.url}"
        return " ".join("".join(finder.parts).split())

    @property
    def csrf(self) -> str:
        match = _CSRF.search(self.text)
        assert match, f"no CSRF token on {self.url}"
        return match.group(1)


class ConsoleClient:
    """One person: their own cookie jar (loopback addresses allowed), and every response scanned for secrets."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), response_class=RecordingResponse)

    async def __aenter__(self) -> ConsoleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def link(self, team: str = "design", user: str = "root", admin: bool = True, seconds: int = 600) -> str:
        token = await new_link(self.gateway.services.store, ConsoleIdentity(team, user, admin), seconds)
        return f"{self.gateway.url}/console/login?token={token}"

    async def sign_in(self, team: str = "design", user: str = "root", admin: bool = True) -> Page:
        return await self.get(await self.link(team, user, admin))

    async def get(self, path: str, **kwargs: Any) -> Page:
        url = path if path.startswith("http") else self.gateway.url + path
        async with self.http.get(url, **kwargs) as response:
            return Page(response.status, await response.text(), response.headers, str(response.url))

    async def post(self, path: str, form: dict[str, str], csrf: str | None = None, **kwargs: Any) -> Page:
        data = dict(form)
        if csrf is not None:
            data["csrf"] = csrf
        async with self.http.post(self.gateway.url + path, data=data, **kwargs) as response:
            return Page(response.status, await response.text(), response.headers, str(response.url))

    def cookie(self, name: str) -> str | None:
        found = [c.value for c in self.http.cookie_jar if c.key == name]
        return found[0] if found else None
