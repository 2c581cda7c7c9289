"""State tables: catch-up through Kafka, and the local store alone, with the figures that decide
whether SQLite is the right embedded store.

Kafka part (`--kafka-entries`, in this process, against the test broker or
KAFKA_BOOTSTRAP_SERVERS): one table writes the entries to a new state topic (put, then flush);
a second table with an empty store starts and catches up (the time a new replica or a lost
volume costs); it stops and starts again on the same file and catches up (what a restart
costs: it should read about nothing); a plain aiokafka consumer reads the same topic without a
store, to show which side bounds the catch-up.

Store part (`--store-entries`): the entries are applied straight to the store in batches of the
table's read batch, not through Kafka (a million entries through the broker would measure the
broker), each engine in its own process so the RSS is its own: load rate, size on disk, RSS,
get() latency on hits and misses, reopen time, and for SQLite stats() and keys_older_than().
`--engines` adds LMDB (package lmdb) and RocksDB (package rocksdict) behind the same operations
for comparison; they are not dependencies of the project, so install them in another venv and
pass its interpreter with `--python` (engines that do not import are reported as skipped).

Entries look like cache entries: a 32-byte sha256 key and a JSON value of about 600 bytes.

Run:  .venv/bin/python bench/state_store.py [--kafka-entries 100000]
          [--store-entries 100000,1000000] [--engines sqlite,lmdb,rocksdb --python PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_TEXT = (
    "the a product arrived late but works well customer service was slow and unhelpful great "
    "value would buy again broken on delivery refund requested quality excellent poor packaging "
    "fast shipping sentiment positive negative neutral because"
)
WORDS = _TEXT.split()
_PADS_RNG = random.Random(7)
PADS = [" ".join(_PADS_RNG.choice(WORDS) for _ in range(70))[:420].encode() for _ in range(1000)]
BATCH = 500  # the table's read batch (consumer/state/table.py)
SAMPLES = 20_000


def key(i: int) -> bytes:
    return hashlib.sha256(b"request %d" % i).digest()


def value(i: int) -> bytes:
    return (
        b'{"content":"%s","model":"fake-model","usage":{"prompt_tokens":%d,"completion_tokens":%d,'
        b'"total_tokens":%d},"finish_reason":"stop","bought_at_ms":%d}'
        % (PADS[i % len(PADS)], 100 + i % 50, 20 + i % 7, 120 + i % 57, 1_700_000_000_000 + i)
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak (VmHWM: ru_maxrss would count the parent's pages copied at fork)."""
    return _status_mib("VmHWM")


def disk_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def latencies_us(get: Callable[[bytes], Any], keys: list[bytes], expect_hit: bool) -> list[float]:
    out = []
    for k in keys:
        started = time.perf_counter_ns()
        found = get(k)
        out.append((time.perf_counter_ns() - started) / 1000)
        assert (found is not None) == expect_hit
    return sorted(out)


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


# ------------------------------------------------------------------ store part (one process)


class _SqliteEngine:
    def __init__(self, directory: Path) -> None:
        from consumer.state import LocalStore

        self._open = lambda: LocalStore(directory / "table.sqlite")
        self.store = self._open()

    def load(self, start: int, stop: int) -> None:
        from consumer.state import StateRecord

        self.store.apply([StateRecord(0, i, key(i), value(i), i) for i in range(start, stop)])

    def get(self, k: bytes) -> bytes | None:
        return self.store.get(k)

    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    def extra(self, entries: int) -> dict[str, float]:
        started = time.perf_counter()
        self.store.stats()
        stats_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        self.store.keys_older_than(entries // 10)
        return {"stats_ms": stats_ms, "older_ms": (time.perf_counter() - started) * 1000}

    def close(self) -> None:
        self.store.close()


class _LmdbEngine:
    def __init__(self, directory: Path) -> None:
        import lmdb  # type: ignore[import-not-found]

        self._directory = directory
        self._lmdb = lmdb
        self._open()

    def _open(self) -> None:
        # No sync per commit, like SQLite's WAL with synchronous=NORMAL: a power cut may lose
        # the last transactions (read again from the topic), and the load rates compare.
        self.env = self._lmdb.open(
            str(self._directory), map_size=16 << 30, max_dbs=2, sync=False, metasync=False
        )
        self.entries = self.env.open_db(b"entries")
        self.offsets = self.env.open_db(b"offsets")

    def load(self, start: int, stop: int) -> None:
        with self.env.begin(write=True) as txn:
            for i in range(start, stop):
                txn.put(key(i), i.to_bytes(8, "big") + value(i), db=self.entries)
            txn.put(b"0", str(stop).encode(), db=self.offsets)

    def get(self, k: bytes) -> bytes | None:
        with self.env.begin() as txn:
            found = txn.get(k, db=self.entries)
        return None if found is None else bytes(found)[8:]

    def reopen(self) -> None:
        self.env.close()
        self._open()

    def extra(self, entries: int) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.env.close()


class _RocksEngine:
    def __init__(self, directory: Path) -> None:
        import rocksdict  # type: ignore[import-not-found]

        self._directory = directory
        self._rocksdict = rocksdict
        self.db = rocksdict.Rdict(str(directory), options=rocksdict.Options(raw_mode=True))

    def load(self, start: int, stop: int) -> None:
        batch = self._rocksdict.WriteBatch(raw_mode=True)
        for i in range(start, stop):
            batch.put(key(i), i.to_bytes(8, "big") + value(i))
        batch.put(b"\x00offsets/0", str(stop).encode())
        self.db.write(batch)

    def get(self, k: bytes) -> bytes | None:
        found = self.db.get(k)
        return None if found is None else bytes(found)[8:]

    def reopen(self) -> None:
        self.db.close()
        self.db = self._rocksdict.Rdict(
            str(self._directory), options=self._rocksdict.Options(raw_mode=True)
        )

    def extra(self, entries: int) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.db.close()


ENGINES: dict[str, Callable[[Path], Any]] = {
    "sqlite": _SqliteEngine,
    "lmdb": _LmdbEngine,
    "rocksdb": _RocksEngine,
}


def store_worker(engine_name: str, entries: int, directory: Path) -> dict[str, Any]:
    """Load, size, RSS and latency of one engine at one size (run in its own process)."""
    baseline = rss_mib()
    try:
        engine = ENGINES[engine_name](directory)
    except ImportError as error:
        return {"engine": engine_name, "entries": entries, "skipped": str(error)}
    started = time.perf_counter()
    for start in range(0, entries, BATCH):
        engine.load(start, min(entries, start + BATCH))
    load_s = time.perf_counter() - started
    rng = random.Random(1)
    hits = latencies_us(engine.get, [key(rng.randrange(entries)) for _ in range(SAMPLES)], True)
    misses = latencies_us(engine.get, [key(entries + i) for i in range(SAMPLES)], False)
    result = {
        "engine": engine_name,
        "entries": entries,
        "load_per_s": entries / load_s,
        "get_hit_p50_us": pct(hits, 0.5),
        "get_hit_p99_us": pct(hits, 0.99),
        "get_miss_p50_us": pct(misses, 0.5),
        "rss_mib": rss_mib(),
        "rss_baseline_mib": baseline,
        **engine.extra(entries),
    }
    started = time.perf_counter()
    engine.reopen()
    engine.get(key(0))
    result["reopen_ms"] = (time.perf_counter() - started) * 1000
    engine.close()
    result["disk_mib"] = disk_mib(directory)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_store_part(
    engines: list[str], sizes: list[int], python: str, work: Path
) -> list[dict[str, Any]]:
    results = []
    for entries in sizes:
        for engine in engines:
            directory = work / f"{engine}-{entries}"
            directory.mkdir()
            interpreter = sys.executable if engine == "sqlite" else python
            proc = subprocess.run(
                [interpreter, __file__, "--store-worker", engine, str(entries), str(directory)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != 0:
                results.append(
                    {"engine": engine, "entries": entries, "skipped": proc.stderr[-300:]}
                )
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(directory, ignore_errors=True)
            print(f"  store {engine} {entries:,}: done", file=sys.stderr)
    return results


# ------------------------------------------------------------------ Kafka part (this process)


def _table(bootstrap: str, topic: str, directory: Path) -> Any:
    from consumer.config import KafkaSettings, StateSettings
    from consumer.state import GlobalTable

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, input_topic="bench.in", output_topic="bench.out", group_id="-"
    )
    return GlobalTable.from_settings(kafka, StateSettings(directory=directory), topic)


async def kafka_reader(bootstrap: str, topic: str, directory: Path, entries: int) -> dict[str, Any]:
    """A new replica (empty store) catches up, then restarts on the same file (own process)."""
    out: dict[str, Any] = {"rss_before_mib": rss_mib()}
    reader = _table(bootstrap, topic, directory)
    started = time.perf_counter()
    await reader.start()
    out["start_s"] = time.perf_counter() - started
    first = await reader.catch_up(600)
    out["empty_catch_up_s"], out["empty_records"] = first.seconds, first.records
    out["empty_complete"] = first.complete
    stats = reader.stats()
    out["store_entries"], out["store_mib"] = stats.entries, stats.bytes / 2**20
    rng = random.Random(1)
    hits = latencies_us(reader.get, [key(rng.randrange(entries)) for _ in range(SAMPLES)], True)
    out["get_p50_us"], out["get_p99_us"] = pct(hits, 0.5), pct(hits, 0.99)
    out["rss_mib"] = rss_mib()
    await reader.stop()

    reader = _table(bootstrap, topic, directory)
    started = time.perf_counter()
    await reader.start()
    again = await reader.catch_up(600)
    out["restart_s"] = time.perf_counter() - started
    out["restart_catch_up_s"], out["restart_records"] = again.seconds, again.records
    await reader.stop()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


async def run_kafka_part(bootstrap: str, entries: int, work: Path) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from consumer.config import StateSettings

    topic = f"bench-state-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"entries": entries}
    writer = _table(bootstrap, topic, work / "writer")
    await writer.start()
    started = time.perf_counter()
    put_us = []
    for i in range(entries):
        t = time.perf_counter_ns()
        writer.put(key(i), value(i))
        put_us.append((time.perf_counter_ns() - t) / 1000)
        if i % BATCH == 0:
            await asyncio.sleep(0)  # let the producer and the reader run, as a pipeline would
    failed = await writer.flush()
    out["write_per_s"] = entries / (time.perf_counter() - started)
    out["write_failed"] = failed
    put_us.sort()
    out["put_p50_us"], out["put_p99_us"] = pct(put_us, 0.5), pct(put_us, 0.99)
    await writer.stop()

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--kafka-reader",
        bootstrap,
        topic,
        str(work / "reader"),
        str(entries),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the reader process failed (exit {proc.returncode})")
    out.update(json.loads(stdout.decode().strip().splitlines()[-1]))

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1_048_576,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(StateSettings().partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        started = time.perf_counter()
        read = 0
        while read < sum(ends.values()):
            batch = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            read += sum(len(records) for records in batch.values())
        out["plain_read_per_s"] = read / (time.perf_counter() - started)
    finally:
        await consumer.stop()
    return out


@contextlib.contextmanager
def broker() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from tests.support.kafka_broker import kafka_broker

    with kafka_broker() as handle:
        yield handle.bootstrap


# ------------------------------------------------------------------ report


def print_report(kafka: dict[str, Any] | None, stores: list[dict[str, Any]]) -> None:
    if kafka is not None:
        n = kafka["entries"]
        print(f"\nGlobal table through Kafka, {n:,} entries (3 partitions, ~600-byte values)")
        rows = [
            ("write: put() + flush", f"{kafka['write_per_s']:,.0f} entries/s", ""),
            (
                "put() latency p50 / p99",
                f"{kafka['put_p50_us']:.1f} / {kafka['put_p99_us']:.1f} us",
                "",
            ),
            ("start (topic check, clients)", f"{kafka['start_s']:.2f} s", ""),
            (
                "catch-up, empty store",
                f"{kafka['empty_catch_up_s']:.2f} s",
                f"{kafka['empty_records']:,} records, "
                f"{kafka['empty_records'] / max(kafka['empty_catch_up_s'], 1e-9):,.0f}/s",
            ),
            (
                "catch-up after a restart",
                f"{kafka['restart_catch_up_s']:.3f} s",
                f"{kafka['restart_records']:,} records (start + catch-up "
                f"{kafka['restart_s']:.2f} s)",
            ),
            ("plain aiokafka read, no store", f"{kafka['plain_read_per_s']:,.0f} records/s", ""),
            (
                "store file + WAL",
                f"{kafka['store_mib']:.1f} MiB",
                f"{kafka['store_entries']:,} entries",
            ),
            (
                "table.get() hit p50 / p99",
                f"{kafka['get_p50_us']:.1f} / {kafka['get_p99_us']:.1f} us",
                "",
            ),
            (
                "reader process RSS",
                f"{kafka['rss_mib']:.0f} MiB",
                f"{kafka['rss_before_mib']:.0f} MiB before its table started, "
                f"peak {kafka['peak_rss_mib']:.0f} MiB",
            ),
        ]
        for name, figure, note in rows:
            print(f"  {name:<32} {figure:>22}  {note}")
    if stores:
        print(f"\nLocal store alone (applied in batches of {BATCH}, not through Kafka)")
        header = (
            f"  {'engine':<8} {'entries':>9} {'load/s':>9} {'disk MiB':>9} {'RSS MiB':>8} "
            f"{'base':>5} {'hit p50':>8} {'hit p99':>8} {'miss p50':>8} {'reopen':>8} "
            f"{'stats()':>8} {'older()':>8}"
        )
        print(header)
        for r in stores:
            if "skipped" in r:
                print(f"  {r['engine']:<8} {r['entries']:>9,} skipped: {r['skipped'][:80]}")
                continue
            print(
                f"  {r['engine']:<8} {r['entries']:>9,} {r['load_per_s']:>9,.0f} "
                f"{r['disk_mib']:>9.1f} {r['rss_mib']:>8.0f} {r['rss_baseline_mib']:>5.0f} "
                f"{r['get_hit_p50_us']:>6.1f}us {r['get_hit_p99_us']:>6.1f}us "
                f"{r['get_miss_p50_us']:>6.1f}us {r['reopen_ms']:>6.1f}ms "
                + (
                    f"{r['stats_ms']:>6.1f}ms {r['older_ms']:>6.0f}ms"
                    if "stats_ms" in r
                    else f"{'-':>8} {'-':>8}"
                )
            )
        print("  (RSS: after the load and the gets; base: before the store was opened)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kafka-entries", type=int, default=100_000, help="0: skip")
    parser.add_argument("--store-entries", default="100000,1000000", help="'': skip")
    parser.add_argument("--engines", default="sqlite")
    parser.add_argument("--python", default=sys.executable, help="interpreter for lmdb/rocksdb")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--store-worker", nargs=3, metavar=("ENGINE", "N", "DIR"), help=argparse.SUPPRESS
    )
    parser.add_argument("--kafka-reader", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kafka_reader:
        bootstrap, topic, directory, entries = args.kafka_reader
        result = asyncio.run(kafka_reader(bootstrap, topic, Path(directory), int(entries)))
        print(json.dumps(result))
        return 0
    if args.store_worker:
        engine, entries, directory = args.store_worker
        print(json.dumps(store_worker(engine, int(entries), Path(directory))))
        return 0
    sizes = [int(s) for s in args.store_entries.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        work = Path(tmp)
        kafka = None
        if args.kafka_entries:
            with broker() as bootstrap:
                kafka = asyncio.run(run_kafka_part(bootstrap, args.kafka_entries, work / "kafka"))
        stores = run_store_part(args.engines.split(","), sizes, args.python, work)
    print_report(kafka, stores)
    if args.json:
        args.json.write_text(json.dumps({"kafka": kafka, "stores": stores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
