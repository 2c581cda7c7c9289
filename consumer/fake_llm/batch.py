"""The fake's batch API: Files (purpose batch) and Batches, as OpenAI and Azure OpenAI serve them.

Routes under `/v1` (OpenAI), `/openai` (Azure, needs `?api-version=`) and `/openai/v1` (Azure
v1): `POST files` (multipart), `GET files/{id}/content`, `POST batches`, `GET batches`,
`GET batches/{id}`, `POST batches/{id}/cancel`. A job moves by the clock: `validating` for the
first tenth of `batch_delay_s`, `in_progress` until nine tenths, `finalizing`, then `completed`
(or `failed` when validation found a bad line, or `expired`). Each line is answered as the chat
route would answer it, `[[fake:...]]` directives included: 200 lines go to the output file,
error lines to the error file, with OpenAI's line shape `{id, custom_id, response: {status_code,
request_id, body}, error}`.

Knobs (`FakeLLMConfig`): `batch_delay_s`; `batch_expire_next` jobs expire with only
`batch_expire_answered` of their lines answered (the rest are `batch_expired` error lines);
`batch_fail_next` jobs fail validation; `quota_exhausted` and `api_key` refuse uploads and
creates as they refuse chat requests. `GET /admin/batches` counts jobs, lines and files.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from consumer.fake_llm import answers, faults

PREFIXES = ("/v1", "/openai", "/openai/v1")
# The providers' limit on one input file.
BATCH_FILE_MAX_BYTES = 200 * 1024 * 1024 + 65_536
_ENDPOINTS = frozenset({"/v1/chat/completions", "/chat/completions"})


@dataclass
class _Job:
    id: str
    input_file_id: str
    endpoint: str
    dialect: faults.Dialect
    created: float
    metadata: dict[str, str]
    lines: list[dict[str, Any]]
    expire: float | None = None  # the share of lines answered when the job expires
    fail: bool = False
    cancelled: bool = False
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0


@dataclass
class _Counters:
    jobs: int = 0
    lines: int = 0
    files: int = 0
    line_errors: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


class FakeBatches:
    """The batch resources of one fake server; `chat` is the FakeLLM whose answers it reuses."""

    def __init__(self, chat: Any, clock: Callable[[], float]) -> None:
        self._chat = chat
        self._clock = clock
        self._files: dict[str, bytes] = {}
        self._jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self.counters = _Counters()

    def register(self, app: web.Application) -> None:
        for prefix in PREFIXES:
            app.router.add_post(f"{prefix}/files", self.upload)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self.content)
            app.router.add_post(f"{prefix}/batches", self.create)
            app.router.add_get(f"{prefix}/batches", self.list)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.retrieve)
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self.cancel)
        app.router.add_get("/admin/batches", self.stats)

    # -- checks ---------------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        config = self._chat.config
        if config.api_key is not None and not self._chat._authorized(request, config.api_key):
            return _reply(401, faults.INVALID_API_KEY)
        path = request.path
        deployments_style = path.startswith("/openai/") and not path.startswith("/openai/v1/")
        if deployments_style and "api-version" not in request.query:
            return _reply(400, faults.MISSING_API_VERSION)
        return None

    # -- files ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            return _invalid("Upload a 'file' with purpose 'batch'.")
        content = upload.file.read()
        file_id = f"file-fake{next(self._ids):08d}"
        self._files[file_id] = content
        self.counters.files += 1
        return _json(_file_object(file_id, len(content), upload.filename, "batch"))

    async def content(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self._advance_all()
        content = self._files.get(request.match_info["file_id"])
        if content is None:
            return _reply(
                404, faults.openai_error("No such File object.", "invalid_request_error", None)
            )
        return web.Response(body=content, content_type="application/octet-stream")

    # -- batches --------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        config = self._chat.config
        dialect = faults.dialect_of(request.path, config.dialect)
        if config.quota_exhausted:
            status, body = faults.insufficient_quota(dialect)
            return _reply(status, body)
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _invalid("We could not parse the JSON body of your request.")
        file_id = payload.get("input_file_id") if isinstance(payload, dict) else None
        if not isinstance(file_id, str) or file_id not in self._files:
            return _invalid(f"No file with id {file_id!r}.", "input_file_id")
        endpoint = payload.get("endpoint")
        if endpoint not in _ENDPOINTS:
            return _invalid(f"Unsupported endpoint {endpoint!r}.", "endpoint")
        if payload.get("completion_window") != "24h":
            return _invalid("completion_window must be '24h'.", "completion_window")
        metadata = payload.get("metadata") or {}
        lines, errors = _read_lines(self._files[file_id], endpoint)
        job = _Job(
            f"batch_fake{next(self._ids):08d}",
            file_id,
            endpoint,
            dialect,
            self._clock(),
            {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
            lines,
            errors=errors,
        )
        if config.batch_expire_next > 0:
            config.batch_expire_next -= 1
            job.expire = config.batch_expire_answered
        if config.batch_fail_next > 0:
            config.batch_fail_next -= 1
            job.fail = True
            job.errors.append(
                {"code": "invalid_request", "message": "Injected validation failure.", "line": 1}
            )
        self._jobs[job.id] = job
        self.counters.jobs += 1
        self.counters.lines += len(lines)
        return _json(self._view(job))

    def _job_of(self, request: web.Request) -> _Job | web.Response:
        """The job the path names, moved on to where its clock says; or the error reply."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        job = self._jobs.get(request.match_info["batch_id"])
        if job is None:
            return _reply(
                404, faults.openai_error("No such Batch object.", "invalid_request_error", None)
            )
        self._advance(job)
        return job

    async def retrieve(self, request: web.Request) -> web.Response:
        job = self._job_of(request)
        return job if isinstance(job, web.Response) else _json(self._view(job))

    async def list(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self._advance_all()
        limit = int(request.query.get("limit", "20"))
        newest = sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)[:limit]
        return _json(
            {"object": "list", "data": [self._view(job) for job in newest], "has_more": False}
        )

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job_of(request)
        if isinstance(job, web.Response):
            return job
        if job.status not in ("completed", "failed", "expired", "cancelled"):
            job.cancelled = True
            self._finish(job, "cancelled", answered=0)
        return _json(self._view(job))

    async def stats(self, request: web.Request) -> web.Response:
        self._advance_all()
        c = self.counters
        return _json(
            {
                "jobs": c.jobs,
                "lines": c.lines,
                "files": c.files,
                "line_errors": c.line_errors,
                "by_status": dict(sorted(c.by_status.items())),
                "batches": [
                    {"id": j.id, "status": j.status, "lines": len(j.lines), "metadata": j.metadata}
                    for j in self._jobs.values()
                ],
            }
        )

    # -- the clock moves jobs ---------------------------------------------------------------

    def _advance_all(self) -> None:
        for job in self._jobs.values():
            self._advance(job)

    def _advance(self, job: _Job) -> None:
        if job.status in ("completed", "failed", "expired", "cancelled"):
            return
        delay = self._chat.config.batch_delay_s
        elapsed = self._clock() - job.created
        if elapsed < delay * 0.1:
            return
        if job.errors:
            self._finish(job, "failed", answered=0)
            return
        if elapsed < delay * 0.9:
            job.status = "in_progress"
        elif elapsed < delay:
            job.status = "finalizing"
        elif job.expire is not None:
            self._finish(job, "expired", answered=math.floor(len(job.lines) * job.expire))
        else:
            self._finish(job, "completed", answered=len(job.lines))

    def _finish(self, job: _Job, status: str, answered: int) -> None:
        job.status = status
        self.counters.by_status[status] = self.counters.by_status.get(status, 0) + 1
        if status == "failed":
            return
        output: list[bytes] = []
        errors: list[bytes] = []
        for index, line in enumerate(job.lines):
            custom_id = line["custom_id"]
            line_id = f"batch_req_fake{next(self._ids):08d}"
            if index >= answered:
                reason = "batch_expired" if status == "expired" else "batch_cancelled"
                message = (
                    "This request could not be executed before the completion window expired."
                    if status == "expired"
                    else "This request was cancelled before it ran."
                )
                error = {"code": reason, "message": message}
                errors.append(
                    orjson.dumps(
                        {"id": line_id, "custom_id": custom_id, "response": None, "error": error}
                    )
                )
                job.failed += 1
                continue
            code, body = self._answer(line["body"], job.dialect)
            response = {
                "status_code": code,
                "request_id": f"req_fake{next(self._ids):08d}",
                "body": body,
            }
            record = orjson.dumps(
                {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
            )
            if code == 200:
                output.append(record)
                job.completed += 1
            else:
                errors.append(record)
                job.failed += 1
                self.counters.line_errors += 1
        if output:
            job.output_file_id = self._store(b"\n".join(output) + b"\n")
        if errors:
            job.error_file_id = self._store(b"\n".join(errors) + b"\n")

    def _store(self, content: bytes) -> str:
        file_id = f"file-fake{next(self._ids):08d}"
        self._files[file_id] = content
        return file_id

    def _answer(self, payload: dict[str, Any], dialect: faults.Dialect) -> tuple[int, Any]:
        """What the chat route would answer this body, without latency or capacity."""
        chat = self._chat
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, faults.openai_error(
                "'messages' must be a non-empty array.", "invalid_request_error", None, "messages"
            )
        model = str(payload.get("model") or "fake-llm")
        refusal = chat._configuration_error(payload, model, dialect)
        if refusal is not None:
            return refusal.status, orjson.loads(refusal.body)
        text = answers.last_user_text(messages)
        directive = faults.find_directive(text) if "[[fake:" in text else None
        if directive is not None:
            if directive.name not in faults.HTTP_ERRORS | faults.BODY_FAULTS:
                return 400, faults.openai_error(
                    f"Unknown fake-llm directive {directive.name!r}.", "invalid_request_error", None
                )
            if directive.times is not None and not chat._fails_again(directive.times, messages):
                directive = None
        prompt_tokens = answers.prompt_tokens(messages)
        if directive is not None and directive.name in faults.HTTP_ERRORS:
            return faults.directive_error(directive.name, model, prompt_tokens, dialect)
        fault = directive.name if directive is not None else None
        if fault in ("hang", "malformed"):
            return 500, faults.server_error(500, dialect, model)
        if fault == "error200":
            return 200, faults.ERROR_IN_200
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            max_tokens = None
        response_format = payload.get("response_format")
        json_mode = isinstance(response_format, dict) and response_format.get("type") in (
            "json_object",
            "json_schema",
        )
        content = answers.answer(text, chat.config.answer, json_mode)
        return 200, chat._completion(model, content, fault, max_tokens, prompt_tokens)

    def _view(self, job: _Job) -> dict[str, Any]:
        created = int(time.time() - (self._clock() - job.created))
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": job.endpoint,
            "errors": {"object": "list", "data": job.errors} if job.status == "failed" else None,
            "input_file_id": job.input_file_id,
            "completion_window": "24h",
            "status": job.status,
            "output_file_id": job.output_file_id,
            "error_file_id": job.error_file_id,
            "created_at": created,
            "expires_at": created + 86_400,
            "request_counts": {
                "total": len(job.lines),
                "completed": job.completed,
                "failed": job.failed,
            },
            "metadata": job.metadata,
        }


def _read_lines(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's request lines, and the validation errors that fail the whole job."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(
                {"code": "invalid_json_line", "message": "Line is not JSON.", "line": number}
            )
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            errors.append(
                {
                    "code": "missing_required_parameter",
                    "message": "custom_id is required.",
                    "line": number,
                }
            )
            continue
        if line.get("url") != endpoint:
            errors.append(
                {
                    "code": "mismatched_url",
                    "message": f"The line's url {line.get('url')!r} is not the batch's "
                    f"endpoint {endpoint!r}.",
                    "line": number,
                }
            )
        if line["custom_id"] in seen:
            errors.append(
                {
                    "code": "duplicate_custom_id",
                    "message": "custom_id must be unique.",
                    "line": number,
                }
            )
        seen.add(line["custom_id"])
        if not isinstance(line.get("body"), dict):
            line["body"] = {}
        lines.append(line)
    return lines, errors


def _file_object(file_id: str, size: int, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def _reply(status: int, body: Any) -> web.Response:
    return _json(body, status)


def _invalid(message: str, param: str | None = None) -> web.Response:
    return _reply(400, faults.openai_error(message, "invalid_request_error", None, param))


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
