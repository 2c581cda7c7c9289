"""The simplest correct aiokafka + aiohttp consumer: the yardstick end_to_end.py measures us by.

One batch at a time: `getmany`, one chat-completion call per row under an
`asyncio.Semaphore(concurrency)`, one output per row (the input JSON plus the answer in
`llm_response`), wait for every ack, commit, repeat until `--rows` outputs are acknowledged.
No windows, limiter, retries, DLQ, templates or metrics, so the gap between this loop and
`python -m consumer run` on the same broker and fake LLM is what the consumer's machinery costs.

The Kafka clients get the options that matter for throughput from consumer/kafka/clients.py
(acks=all, idempotence, linger 5 ms, 256 KiB batches, read_committed), so the comparison is
between pipelines and not between client settings. Every output carries a `window.id` header
naming its batch, so end_to_end.py's per-window breakdown reads this loop's batches too.

Run:  .venv/bin/python bench/plain_loop.py --bootstrap HOST:PORT --input-topic IN
          --output-topic OUT --group GROUP --llm-url http://127.0.0.1:PORT --rows N
It prints one JSON line at the end: rows, seconds (first batch to last commit), rows_per_s and
cpu_s (the process's CPU time over its whole run, start-up included).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord


@dataclass(frozen=True)
class LoopSettings:
    bootstrap: str
    input_topic: str
    output_topic: str
    group: str
    llm_url: str
    rows: int
    concurrency: int
    model: str


class Enricher:
    """POSTs one row's prompt and returns the answer text; at most `concurrency` at once."""

    def __init__(self, session: aiohttp.ClientSession, settings: LoopSettings) -> None:
        self._session = session
        self._url = settings.llm_url.rstrip("/") + "/v1/chat/completions"
        self._model = settings.model
        self._slots = asyncio.Semaphore(settings.concurrency)
        # The fake LLM takes any key; the header keeps the request like the consumer's.
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "authorization": "Bearer test-key",
        }

    async def __call__(self, row: dict[str, Any]) -> str:
        # The same prompt, temperature and max_tokens as end_to_end.py's consumer settings.
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": f"Review: {row['text']}"}],
            "temperature": 0.0,
            "max_tokens": 256,
        }
        async with (
            self._slots,
            self._session.post(self._url, data=orjson.dumps(body), headers=self._headers) as reply,
        ):
            content = await reply.read()
            # No retries: against an unlimited fake LLM anything but 200 is a bench bug.
            if reply.status != 200:
                raise RuntimeError(f"LLM answered {reply.status}: {content[:200]!r}")
        answer: str = orjson.loads(content)["choices"][0]["message"]["content"]
        return answer


async def _process(
    records: list[ConsumerRecord[bytes, bytes]],
    batch_id: str,
    enrich: Enricher,
    producer: AIOKafkaProducer,
    output_topic: str,
) -> None:
    """Enrich a batch, produce one output per row and wait until the broker acked them all."""
    rows = [orjson.loads(r.value) for r in records]
    answers = await asyncio.gather(*(enrich(row) for row in rows))
    headers = [("window.id", batch_id.encode())]
    acks = [
        await producer.send(
            output_topic,
            value=orjson.dumps({**row, "llm_response": answer}),
            key=record.key,
            headers=headers,
        )
        for record, row, answer in zip(records, rows, answers, strict=True)
    ]
    await asyncio.gather(*acks)


async def run(settings: LoopSettings) -> dict[str, float]:
    """Consume, enrich, produce and commit until `settings.rows` outputs are acknowledged."""
    consumer = AIOKafkaConsumer(
        settings.input_topic,
        bootstrap_servers=settings.bootstrap,
        group_id=settings.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=262_144,
    )
    connector = aiohttp.TCPConnector(limit=settings.concurrency)
    session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
    await consumer.start()
    await producer.start()
    produced = 0
    batches = 0
    started: float | None = None
    try:
        enrich = Enricher(session, settings)
        while produced < settings.rows:
            batch = await consumer.getmany(timeout_ms=1000)
            records = [r for partition in batch.values() for r in partition]
            if not records:
                continue
            if started is None:
                started = time.monotonic()
            batches += 1
            await _process(records, f"loop-{batches}", enrich, producer, settings.output_topic)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
            produced += len(records)
        seconds = time.monotonic() - (started or time.monotonic())
    finally:
        await session.close()
        await producer.stop()
        await consumer.stop()
    return {
        "rows": produced,
        "batches": batches,
        "seconds": round(seconds, 3),
        "rows_per_s": round(produced / seconds, 1) if seconds > 0 else 0.0,
        "cpu_s": round(time.process_time(), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group", required=True, help="consumer group id (use a fresh one)")
    parser.add_argument(
        "--llm-url", required=True, help="fake LLM root, e.g. http://127.0.0.1:8080"
    )
    parser.add_argument("--rows", type=int, required=True, help="stop after this many outputs")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args()
    settings = LoopSettings(
        bootstrap=args.bootstrap,
        input_topic=args.input_topic,
        output_topic=args.output_topic,
        group=args.group,
        llm_url=args.llm_url,
        rows=args.rows,
        concurrency=args.concurrency,
        model=args.model,
    )
    summary = asyncio.run(run(settings))
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
