"""HTTP client overhead: requests/s at 64 concurrent against the fake LLM at 0 ms latency.

Variants, run one after another in this process, against one fake LLM server in its own process:
  aiohttp     plain aiohttp.ClientSession, connector limit 72, post + json parse
  ChatClient  consumer.llm.client.ChatClient (aiohttp called directly), the real class with
              `complete(messages)`, i.e. body building, orjson, parsing
  httpx+aiohttp  httpx.AsyncClient over httpx_aiohttp.AiohttpTransport: ChatClient's stack
              until it moved to aiohttp, kept here as the measurement behind that move
  httpx       plain httpx.AsyncClient with its default transport, limits 72/72
Every variant sends the same JSON body and parses the JSON answer. Each runs for --seconds after
a short warm-up; the whole sequence is repeated --repeats times. Ratios are to aiohttp of the
same repeat. CPU% of this process and of the server over each variant is shown, so a saturated
server (which caps every variant alike) is visible.

Run:  .venv/bin/python bench/client_overhead.py [--seconds 5] [--repeats 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
from httpx_aiohttp import AiohttpTransport  # noqa: E402

from consumer.config import LLMSettings  # noqa: E402
from consumer.llm.client import ChatClient  # noqa: E402
from tests.support.fake_llm_process import fake_llm_process  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
MESSAGES = [{"role": "user", "content": "Review: the product was fine, delivery was slow"}]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def drive(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float, warmup: float
) -> tuple[int, int, float]:
    """`concurrency` workers call in a loop; counts completions after the warm-up."""
    done = 0
    errors = 0
    counting = False
    stop = False

    async def worker() -> None:
        nonlocal done, errors
        while not stop:
            try:
                await call()
            except Exception:
                if counting:
                    errors += 1
                continue
            if counting:
                done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    counting = True
    started = time.monotonic()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.monotonic() - started
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return done, errors, elapsed


def settings(base_url: str, concurrency: int) -> LLMSettings:
    return LLMSettings.model_validate(
        {
            "provider": "openai",
            "model": "fake-model",
            "base_url": f"{base_url}/v1",
            "api_key": "bench-key",
            "template": "{{ row.text }}",
            "concurrency": {"initial": concurrency, "min": 1, "max": concurrency},
        }
    )


async def run_variant(
    name: str, base_url: str, concurrency: int, seconds: float, warmup: float
) -> tuple[int, int, float]:
    llm = settings(base_url, concurrency)
    url = f"{base_url}/v1/chat/completions"
    headers = {
        "content-type": "application/json",
        "accept": "application/json",
        "authorization": "Bearer bench-key",
    }
    pool = concurrency + 8
    chat = ChatClient(llm)  # also builds the identical request body for the other variants
    payload = orjson.dumps(chat.request_body(MESSAGES))
    if name != "ChatClient":
        await chat.aclose()
    if name == "aiohttp":
        connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call_aiohttp() -> object:
                async with session.post(url, data=payload, headers=headers) as response:
                    body = orjson.loads(await response.read())
                    response.raise_for_status()
                    return body

            return await drive(call_aiohttp, concurrency, seconds, warmup)
    if name == "ChatClient":
        try:
            return await drive(lambda: chat.complete(MESSAGES), concurrency, seconds, warmup)
        finally:
            await chat.aclose()
    if name in ("httpx", "httpx+aiohttp"):
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        transport = AiohttpTransport(limits=limits) if name == "httpx+aiohttp" else None
        async with httpx.AsyncClient(limits=limits, timeout=30.0, transport=transport) as http:

            async def call_httpx() -> object:
                response = await http.post(url, content=payload, headers=headers)
                response.raise_for_status()
                return orjson.loads(response.content)

            return await drive(call_httpx, concurrency, seconds, warmup)
    raise ValueError(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--variants", default="aiohttp,ChatClient,httpx+aiohttp,httpx")
    args = parser.parse_args()
    variants = args.variants.split(",")
    me = os.getpid()
    lines = [
        f"{args.concurrency} concurrent, fake LLM at 0 ms in its own process, {args.seconds:.0f} s "
        f"per variant. Host: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, httpx {httpx.__version__}, "
        f"load average before the run {os.getloadavg()[0]:.2f}.",
        "",
        "| repeat | client | requests | errors | req/s | ratio to aiohttp "
        "| CPU client | CPU server |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with fake_llm_process("--latency-ms", "0", "--jitter-ms", "0", "--capacity", "0") as llm:
        server = llm.process.pid
        for repeat in range(1, args.repeats + 1):
            base: float | None = None
            for name in variants:
                c0, s0, t0 = cpu_seconds(me), cpu_seconds(server), time.monotonic()
                done, errors, elapsed = asyncio.run(
                    run_variant(name, llm.base_url, args.concurrency, args.seconds, args.warmup)
                )
                wall = time.monotonic() - t0
                cpu_client = (cpu_seconds(me) - c0) / wall
                cpu_server = (cpu_seconds(server) - s0) / wall
                rate = done / elapsed
                if name == "aiohttp":
                    base = rate
                ratio = f"{rate / base:.2f}" if base else "-"
                line = (
                    f"| {repeat} | {name} | {done} | {errors} | {rate:.0f} | {ratio} "
                    f"| {100 * cpu_client:.0f}% | {100 * cpu_server:.0f}% |"
                )
                print(line, flush=True)
                lines.append(line)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
