"""Which model a replay asks for when none is given: clear errors for odd servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvrouter.bench.replay import fetch_model
from kvrouter.errors import ConfigError


@pytest.fixture
async def models_server() -> AsyncIterator[tuple[str, list[web.Response]]]:
    answers: list[web.Response] = []

    async def models(request: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", answers
    finally:
        await runner.cleanup()


def _json(body: Any) -> web.Response:
    return web.json_response(body)


async def test_the_first_listed_model_is_used(
    models_server: tuple[str, list[web.Response]],
) -> None:
    url, answers = models_server
    answers.append(_json({"data": [{"id": "llama"}, {"id": "other"}]}))
    async with aiohttp.ClientSession() as session:
        assert await fetch_model(session, url) == "llama"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (web.Response(status=404, text="no"), "answered 404"),
        (web.Response(text="<html>"), "did not answer JSON"),
        (_json({"data": []}), "lists no model"),
        (_json([1, 2]), "lists no model"),
        (_json({"data": [{"name": "x"}]}), "lists no model"),
    ],
)
async def test_servers_without_a_usable_model_are_a_config_error(
    models_server: tuple[str, list[web.Response]], answer: web.Response, message: str
) -> None:
    url, answers = models_server
    answers.append(answer)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ConfigError, match=message) as info:
            await fetch_model(session, url)
    assert "pass --model" in str(info.value)
