"""Prompt rendering and the hashes that let downstream audit which prompt produced a row.

Templates run in Jinja2's immutable sandbox (a template cannot edit the row it renders) with
StrictUndefined: a template that names a field the row
lacks fails for that row (a `template_error`), instead of silently sending an empty prompt.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.config import ConfigError, LLMSettings


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace: the same variables always hash the same."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


class TemplateRenderError(Exception):
    """The template could not be rendered for this row."""


def _load_lookup(settings: LLMSettings) -> tuple[Any, str | None, str | None]:
    if settings.lookup_file is not None:
        path = settings.lookup_file
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise ConfigError(f"llm.lookup_file: cannot read {path}: {error.strerror}") from None
        try:
            table = orjson.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
        except (orjson.JSONDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"llm.lookup_file: {path} is not valid JSON/YAML: {error}") from None
        return table, sha256_hex(canonical_json(table)), str(path)
    if settings.lookup is not None:
        return settings.lookup, sha256_hex(canonical_json(settings.lookup)), "inline"
    return {}, None, None


class PromptTemplate:
    """Renders the chat messages for a row and knows the hashes recorded with each output."""

    def __init__(self, settings: LLMSettings) -> None:
        if settings.template_file is not None:
            try:
                source = settings.template_file.read_text(encoding="utf-8")
            except OSError as error:
                raise ConfigError(
                    f"llm.template_file: cannot read {settings.template_file}: {error.strerror}"
                ) from None
            self.template_source: str | None = str(settings.template_file)
        else:
            source = settings.template or ""
            self.template_source = None
        environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        try:
            self._template = environment.from_string(source)
        except TemplateError as error:
            # Syntax errors carry the line; name the key and, for a file, the file to open.
            line = getattr(error, "lineno", None)
            where = (
                f"llm.template_file: {settings.template_file}"
                if settings.template_file is not None
                else "llm.template"
            )
            at = f", line {line}" if line else ""
            raise ConfigError(
                f"{where}{at}: not a valid Jinja2 template: {error.message or error}"
            ) from None
        self._system_prompt = settings.system_prompt
        hashed = source if self._system_prompt is None else f"{self._system_prompt}\x00{source}"
        self.template_hash = sha256_hex(hashed.encode("utf-8"))
        self.lookup, self.lookup_hash, self.lookup_source = _load_lookup(settings)

    def render(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The messages for one row; raises TemplateRenderError naming what went wrong."""
        try:
            prompt = self._template.render(row=row, lookup=self.lookup)
        except Exception as error:  # a template can raise anything (1/0, a bad filter arg)
            raise TemplateRenderError(f"{type(error).__name__}: {error}") from None
        messages = [{"role": "user", "content": prompt}]
        if self._system_prompt:
            messages.insert(0, {"role": "system", "content": self._system_prompt})
        return messages

    @staticmethod
    def variables_hash(row: dict[str, Any]) -> str:
        return sha256_hex(canonical_json(row))
