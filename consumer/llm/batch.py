"""The providers' batch APIs: Files (purpose batch) + Batches, with each provider's differences.

OpenAI: `POST /v1/files` (multipart, purpose=batch), `POST /v1/batches` with endpoint
`/v1/chat/completions` and completion_window `24h`, `GET /v1/batches/{id}`, `GET /v1/batches`,
`GET /v1/files/{id}/content`. Azure OpenAI (Global Batch deployments): the same resources under
`/openai/...?api-version=` (or `/openai/v1/...` for the v1 API style); the line's `url` and the
batch's endpoint are `/chat/completions`, and the line's `model` is the deployment's name.
OpenRouter's batch API takes the requests inline (no files) and returns results in the poll
answer: not supported here yet (the settings refuse it).

Like `llm/client.py` for live calls, every difference is here and every failure comes out as a
classified `LLMFailure`, so the batch step treats a refused upload like a live outage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from consumer.config import LLMSettings
from consumer.llm.client import request_headers
from consumer.llm.errors import FailureKind, LLMFailure, classify_status, retry_after_seconds

COMPLETION_WINDOW = "24h"
# Statuses after which a job changes no more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
_OPENAI_ROOT = "https://api.openai.com/v1"


@dataclass(frozen=True)
class BatchJob:
    """What a status poll says about one job."""

    id: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    # The job's own errors (a failed validation), as "code: message" lines.
    errors: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_body(cls, body: Any) -> BatchJob:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise LLMFailure(FailureKind.TRANSIENT, "invalid_response", "not a batch object", 200)
        counts = body.get("request_counts")
        errors = body.get("errors")
        data = errors.get("data") if isinstance(errors, dict) else None
        problems = tuple(
            f"{item.get('code')}: {item.get('message')}"
            for item in (data if isinstance(data, list) else [])
            if isinstance(item, dict)
        )
        metadata = body.get("metadata")
        return cls(
            body["id"],
            str(body.get("status") or "validating"),
            body.get("output_file_id") or None,
            body.get("error_file_id") or None,
            {k: int(v) for k, v in counts.items() if isinstance(v, int)}
            if isinstance(counts, dict)
            else {},
            problems,
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        )


@dataclass(frozen=True)
class LineResult:
    """One line of an output or error file: the answer (status and body), or an error without
    an answer (`error_code`, e.g. batch_expired: the request never ran)."""

    custom_id: str
    status_code: int | None
    body: Any
    error_code: str | None = None
    error_message: str | None = None


class BatchAPI:
    """Where each resource lives for the configured provider, and what a line looks like."""

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self.azure = settings.provider == "azure"
        if self.azure:
            root = (settings.base_url or "").rstrip("/")
            v1 = settings.azure_api_style == "v1"
            self._root = f"{root}/openai/v1" if v1 else f"{root}/openai"
            self._query = "" if v1 else f"?api-version={settings.api_version}"
        else:
            self._root = (settings.base_url or _OPENAI_ROOT).rstrip("/")
            self._query = ""
        # The endpoint every line of a job is sent to, as the batch and the line name it.
        self.endpoint = "/chat/completions" if self.azure else "/v1/chat/completions"

    def url(self, path: str) -> str:
        return f"{self._root}{path}{self._query}"

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """One JSONL line; Azure's body names the deployment as its model."""
        if self.azure:
            body = {**body, "model": self._settings.deployment or self._settings.model}
        line = {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}
        return orjson.dumps(line) + b"\n"


def split_lines(
    lines: Iterable[tuple[str, bytes]], max_requests: int, max_bytes: int
) -> Iterator[list[tuple[str, bytes]]]:
    """Group (custom_id, line) pairs into input files within the per-file limits, in order.

    A single line larger than `max_bytes` cannot be sent in any file: it is a file of its own,
    which the provider refuses (its rows are then held back with the refusal as the reason).
    """
    chunk: list[tuple[str, bytes]] = []
    size = 0
    for item in lines:
        if chunk and (len(chunk) >= max_requests or size + len(item[1]) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1])
    if chunk:
        yield chunk


def parse_lines(content: bytes) -> list[LineResult]:
    """The lines of an output or error file; lines that cannot be read are skipped (their rows
    count as unanswered and are sent again)."""
    results: list[LineResult] = []
    for raw in content.splitlines():
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            continue
        response = line.get("response")
        error = line.get("error")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            results.append(
                LineResult(line["custom_id"], response["status_code"], response.get("body"))
            )
        elif isinstance(error, dict):
            results.append(
                LineResult(
                    line["custom_id"],
                    None,
                    None,
                    str(error.get("code") or "batch_line_error"),
                    str(error.get("message") or ""),
                )
            )
    return results


class BatchClient:
    """Upload, create, poll and download, through one aiohttp session."""

    def __init__(self, settings: LLMSettings, timeout_s: float = 300.0) -> None:
        self.api = BatchAPI(settings)
        headers = request_headers(settings)
        # aiohttp writes the multipart content type (with its boundary) itself.
        headers.pop("content-type", None)
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10.0)
        self._session: aiohttp.ClientSession | None = None

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return self.api.line(custom_id, body)

    async def upload(self, content: bytes, filename: str) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        body = await self._call("POST", "/files", data=form)
        file_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(file_id, str):
            raise LLMFailure(FailureKind.TRANSIENT, "invalid_response", "upload: no file id", 200)
        return file_id

    async def create(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchJob:
        payload = {
            "input_file_id": input_file_id,
            "endpoint": self.api.endpoint,
            "completion_window": COMPLETION_WINDOW,
            "metadata": dict(metadata),
        }
        return BatchJob.from_body(await self._call("POST", "/batches", json=payload))

    async def retrieve(self, batch_id: str) -> BatchJob:
        return BatchJob.from_body(await self._call("GET", f"/batches/{batch_id}"))

    async def find(self, key: str, value: str) -> BatchJob | None:
        """The newest job whose metadata has `key: value` among the latest 100 (a job created
        by a member that died before it could record the job's id)."""
        body = await self._call("GET", "/batches", params={"limit": "100"})
        data = body.get("data") if isinstance(body, dict) else None
        for item in data if isinstance(data, list) else []:
            job = BatchJob.from_body(item)
            if job.metadata.get(key) == value:
                return job
        return None

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content", raw=True)  # type: ignore[no-any-return]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        data: Any = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
            )
        payload = orjson.dumps(json) if json is not None else data
        headers = dict(self._headers)
        if json is not None:
            headers["content-type"] = "application/json"
        try:
            async with session.request(
                method, self.api.url(path), data=payload, headers=headers, params=params
            ) as response:
                content = await response.read()
                status, reply_headers = response.status, response.headers
        except TimeoutError as error:
            raise LLMFailure(
                FailureKind.TRANSIENT, "timeout", f"{method} {path}: {error!r}"
            ) from None
        except aiohttp.ClientError as error:
            raise LLMFailure(
                FailureKind.TRANSIENT, "connection_error", f"{method} {path}: {error!r}"
            ) from None
        if status >= 400:
            try:
                body: Any = orjson.loads(content)
            except orjson.JSONDecodeError:
                body = {"message": content.decode("utf-8", "replace")[:1000]}
            raise classify_status(
                status, body, retry_after_seconds(reply_headers, body, status=status)
            )
        if raw:
            return content
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise LLMFailure(
                FailureKind.TRANSIENT, "invalid_response", f"{method} {path}: not JSON", status
            ) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
