"""Prompts render in a strict sandbox; hashes let downstream audit which prompt made a row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from consumer.config import ConfigError, LLMSettings
from consumer.enrich.template import PromptTemplate, TemplateRenderError


def settings(**overrides: Any) -> LLMSettings:
    values: dict[str, Any] = {"provider": "openai", "model": "gpt-test"}
    if "template_file" not in overrides:
        values["template"] = "Summarise: {{ row.text }}"
    values.update(overrides)
    return LLMSettings(**values)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_renders_the_row_into_a_user_message() -> None:
    template = PromptTemplate(settings())
    assert template.render({"text": "hello"}) == [{"role": "user", "content": "Summarise: hello"}]


def test_the_system_prompt_comes_first() -> None:
    template = PromptTemplate(settings(system_prompt="Be brief."))
    assert template.render({"text": "x"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarise: x"},
    ]


def test_renders_the_lookup_table() -> None:
    template = PromptTemplate(
        settings(
            template="{{ row.name }} is a {{ lookup.kinds[row.kind] }}",
            lookup={"kinds": {"c": "cat"}},
        )
    )
    assert template.render({"name": "Tom", "kind": "c"})[0]["content"] == "Tom is a cat"
    assert template.lookup_source == "inline"
    assert template.lookup_hash is not None


def test_a_missing_field_is_a_render_error_not_an_empty_prompt() -> None:
    template = PromptTemplate(settings())
    with pytest.raises(TemplateRenderError):
        template.render({"other": 1})


def test_a_runtime_error_in_the_template_is_a_render_error() -> None:
    template = PromptTemplate(settings(template="{{ 1 / row.n }}"))
    with pytest.raises(TemplateRenderError, match="ZeroDivisionError"):
        template.render({"n": 0})


@pytest.mark.parametrize(
    "source",
    [
        "{{ row.__class__.__mro__ }}",
        "{{ row.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ],
)
def test_the_sandbox_blocks_dunder_attribute_access(source: str) -> None:
    template = PromptTemplate(settings(template=source))
    with pytest.raises(TemplateRenderError, match=r"SecurityError: .*__class__.* is unsafe"):
        template.render({"text": "x"})


def test_template_hash_is_the_sha256_of_the_source() -> None:
    source = "Summarise: {{ row.text }}"
    assert PromptTemplate(settings(template=source)).template_hash == sha256(source)


def test_template_hash_changes_with_the_template_and_with_the_system_prompt() -> None:
    base = PromptTemplate(settings()).template_hash
    assert PromptTemplate(settings(template="Other {{ row.text }}")).template_hash != base
    with_system = PromptTemplate(settings(system_prompt="Be brief.")).template_hash
    assert with_system != base
    assert PromptTemplate(settings(system_prompt="Be long.")).template_hash != with_system


def test_variables_hash_does_not_depend_on_key_order() -> None:
    a = PromptTemplate.variables_hash({"a": 1, "b": {"x": 1, "y": [1, 2]}})
    b = PromptTemplate.variables_hash({"b": {"y": [1, 2], "x": 1}, "a": 1})
    assert a == b
    assert len(a) == 64
    assert a == hashlib.sha256(b'{"a":1,"b":{"x":1,"y":[1,2]}}').hexdigest()


def test_variables_hash_changes_with_the_values() -> None:
    assert PromptTemplate.variables_hash({"a": 1}) != PromptTemplate.variables_hash({"a": 2})


def test_without_files_there_is_no_template_source_or_lookup_hash() -> None:
    template = PromptTemplate(settings())
    assert template.template_source is None
    assert template.lookup_hash is None
    assert template.lookup_source is None


def test_a_template_file_sets_the_source_and_hashes_its_content(tmp_path: Path) -> None:
    path = tmp_path / "prompt.j2"
    path.write_text("From file: {{ row.text }}", encoding="utf-8")
    template = PromptTemplate(settings(template_file=path))
    assert template.template_source == str(path)
    assert template.template_hash == sha256("From file: {{ row.text }}")
    assert template.render({"text": "y"})[0]["content"] == "From file: y"


def test_a_json_lookup_file_sets_lookup_hash_and_source(tmp_path: Path) -> None:
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps({"b": 2, "a": 1}), encoding="utf-8")
    template = PromptTemplate(settings(template="{{ lookup.a }}", lookup_file=path))
    assert template.lookup_source == str(path)
    assert template.lookup_hash == hashlib.sha256(b'{"a":1,"b":2}').hexdigest()
    assert template.render({})[0]["content"] == "1"


def test_a_yaml_lookup_file_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "lookup.yaml"
    path.write_text("colours:\n  r: red\n", encoding="utf-8")
    template = PromptTemplate(settings(template="{{ lookup.colours.r }}", lookup_file=path))
    assert template.render({})[0]["content"] == "red"
    assert template.lookup_source == str(path)


def test_an_unreadable_template_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="template_file"):
        PromptTemplate(settings(template_file=tmp_path / "missing.j2"))


def test_an_unreadable_lookup_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lookup_file"):
        PromptTemplate(settings(lookup_file=tmp_path / "missing.yaml"))


def test_an_invalid_lookup_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "lookup.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="lookup_file"):
        PromptTemplate(settings(lookup_file=path))


@pytest.mark.parametrize("source", ["{{ row.text ", "{% if row.x %}no end", "{{ }}"])
def test_invalid_jinja_syntax_is_a_config_error(source: str) -> None:
    with pytest.raises(ConfigError, match="Jinja2"):
        PromptTemplate(settings(template=source))
