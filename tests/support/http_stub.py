"""Serve ChatClient's POSTs in process from an httpx-style handler, for unit tests.

The handler sees an `httpx.Request` (headers, URL, body) and returns an `httpx.Response`, or
raises the aiohttp error or TimeoutError a real connection would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import httpx

from consumer.llm.client import HttpReply, Post


def stub_post(handler: Callable[[httpx.Request], httpx.Response]) -> Post:
    async def post(url: str, payload: bytes, headers: Mapping[str, str]) -> HttpReply:
        response = handler(httpx.Request("POST", url, content=payload, headers=dict(headers)))
        return HttpReply(response.status_code, response.headers, response.content)

    return post
