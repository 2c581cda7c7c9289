"""Settings: `${ENV}` interpolation, validation errors that name the key, the exported schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import ConfigError, load_settings, parse_settings, settings_json_schema

MINIMAL: dict[str, Any] = {
    "kafka": {
        "bootstrap_servers": "localhost:9092",
        "input_topic": "rows",
        "output_topic": "rows.enriched",
        "group_id": "g",
    },
    "llm": {"provider": "openrouter", "model": "openai/gpt-4o-mini", "template": "{{ row.t }}"},
}


def minimal(**llm: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data["llm"].update(llm)
    return data


def error_text(data: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(data, "test.yaml", environ or {})
    return str(caught.value)


def test_a_minimal_settings_dict_parses_with_defaults() -> None:
    settings = parse_settings(minimal(), environ={})
    assert settings.kafka.input_topic == "rows"
    assert settings.kafka.dead_letter_topic == "rows.dlq"
    assert settings.llm.provider == "openrouter"
    assert settings.llm.response_field == "llm_response"
    assert settings.window.max_messages == 100
    assert settings.window.max_wait_ms == 2_000
    assert settings.delivery.mode == "at_least_once"


def test_env_variables_are_interpolated() -> None:
    data = minimal(api_key="${OPENROUTER_API_KEY}")
    data["kafka"]["bootstrap_servers"] = "${BROKER}:9092"
    settings = parse_settings(data, environ={"OPENROUTER_API_KEY": "sk-123", "BROKER": "kafka"})
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == "sk-123"
    assert settings.kafka.bootstrap_servers == "kafka:9092"


def test_env_default_is_used_when_the_variable_is_unset() -> None:
    data = minimal(model="${MODEL:-fallback/model}")
    assert parse_settings(data, environ={}).llm.model == "fallback/model"
    assert parse_settings(data, environ={"MODEL": "set/model"}).llm.model == "set/model"


def test_an_empty_default_is_allowed() -> None:
    data = minimal(system_prompt="x${SUFFIX:-}")
    assert parse_settings(data, environ={}).llm.system_prompt == "x"


def test_a_missing_variable_names_the_key_path_and_the_variable() -> None:
    text = error_text(minimal(api_key="${OPENROUTER_API_KEY}"))
    assert "llm.api_key" in text
    assert "OPENROUTER_API_KEY" in text


def test_a_missing_variable_in_a_list_names_the_index() -> None:
    data = minimal()
    data["kafka"]["consumer_options"] = {"hosts": ["ok", "${NOPE}"]}
    text = error_text(data)
    assert "kafka.consumer_options.hosts[1]" in text
    assert "NOPE" in text


def test_a_wrong_provider_names_llm_provider() -> None:
    text = error_text(minimal(provider="anthropic"))
    assert "llm.provider" in text
    assert "anthropic" in text


def test_an_unknown_key_is_named() -> None:
    data = minimal()
    data["window"] = {"max_mesages": 10}
    assert "window.max_mesages" in error_text(data)


def test_an_unknown_top_level_key_is_named() -> None:
    data = minimal()
    data["extra_section"] = {}
    assert "extra_section" in error_text(data)


def test_an_unknown_key_suggests_the_close_key_of_its_section() -> None:
    data = minimal()
    data["window"] = {"max_wait": 500}
    assert "window.max_wait: unknown key; did you mean `max_wait_ms`?" in error_text(data)


def test_a_nested_typo_and_a_misspelt_section_get_suggestions() -> None:
    data = minimal(concurrency={"intial": 4})
    data["obsevability"] = {"port": 0}
    text = error_text(data)
    assert "llm.concurrency.intial: unknown key; did you mean `initial`?" in text
    assert "obsevability: unknown key; did you mean `observability`?" in text


def test_an_unknown_key_without_a_close_one_lists_the_keys_there() -> None:
    data = minimal()
    data["window"] = {"zzz": 1}
    text = error_text(data)
    assert "window.zzz: unknown key; the keys here are max_messages, max_wait_ms" in text


def test_a_missing_variable_in_a_settings_file_names_the_file(tmp_path: Path) -> None:
    path = write_settings(tmp_path, minimal(api_key="${OPENROUTER_API_KEY}"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    text = str(caught.value)
    assert text.startswith(f"{path}: llm.api_key: environment variable OPENROUTER_API_KEY")
    assert "${OPENROUTER_API_KEY:-value}" in text


def test_the_metrics_address_can_be_moved_by_environment(tmp_path: Path) -> None:
    path = write_settings(tmp_path, minimal())
    environ = {"LLM_CONSUMER_METRICS_PORT": "19464", "LLM_CONSUMER_METRICS_HOST": "127.0.0.1"}
    observability = load_settings(path, environ=environ).observability
    assert (observability.host, observability.port) == ("127.0.0.1", 19464)
    assert load_settings(path, environ={}).observability.port == 9464


def test_the_metrics_port_variable_wins_over_the_file(tmp_path: Path) -> None:
    data = minimal()
    data["observability"] = {"port": 9999, "stale_after_s": 30}
    path = write_settings(tmp_path, data)
    settings = load_settings(path, environ={"LLM_CONSUMER_METRICS_PORT": "0"})
    assert settings.observability.port == 0
    assert settings.observability.stale_after_s == 30


@pytest.mark.parametrize("value", ["http", "-1", "70000", ""])
def test_a_bad_metrics_port_variable_names_the_variable(tmp_path: Path, value: str) -> None:
    path = write_settings(tmp_path, minimal())
    with pytest.raises(ConfigError, match="LLM_CONSUMER_METRICS_PORT: expected a port number"):
        load_settings(path, environ={"LLM_CONSUMER_METRICS_PORT": value})


def test_a_missing_required_key_is_named() -> None:
    data = minimal()
    del data["kafka"]["group_id"]
    assert "kafka.group_id" in error_text(data)


def test_template_and_template_file_together_is_an_error() -> None:
    text = error_text(minimal(template_file="p.j2"))
    assert "template" in text and "template_file" in text


def test_neither_template_nor_template_file_is_an_error() -> None:
    data = minimal()
    del data["llm"]["template"]
    assert "template_file" in error_text(data)


def test_azure_without_base_url_is_an_error() -> None:
    text = error_text(minimal(provider="azure", model=None, deployment="gpt4o"))
    assert "base_url" in text


def test_azure_without_deployment_is_an_error() -> None:
    text = error_text(minimal(provider="azure", base_url="https://x.openai.azure.com"))
    assert "deployment" in text


def test_azure_with_base_url_and_deployment_parses() -> None:
    data = minimal(provider="azure", model=None, base_url="https://x.openai.azure.com")
    data["llm"]["deployment"] = "gpt4o"
    settings = parse_settings(data, environ={})
    assert settings.llm.model_name == "gpt4o"


def test_openai_without_model_is_an_error() -> None:
    data = minimal(provider="openai")
    del data["llm"]["model"]
    assert "model" in error_text(data)


def test_concurrency_min_above_initial_is_an_error() -> None:
    text = error_text(minimal(concurrency={"min": 20, "initial": 10, "max": 64}))
    assert "llm.concurrency" in text
    assert "min <= initial <= max" in text


def test_the_idle_window_bound_defaults_to_four_times_the_bound_and_is_never_below_it() -> None:
    data = minimal()
    data["window"] = {"max_pending_windows": 3}
    assert parse_settings(data, environ={}).window.windows_when_idle == 12
    data["window"]["max_pending_windows_when_idle"] = 3  # equal: the idle extra is off
    assert parse_settings(data, environ={}).window.windows_when_idle == 3
    data["window"]["max_pending_windows_when_idle"] = 2
    text = error_text(data)
    assert "max_pending_windows_when_idle (2) must be at least" in text
    assert "window.max_pending_windows (3)" in text


def test_input_topic_equal_to_output_topic_is_an_error() -> None:
    data = minimal()
    data["kafka"]["output_topic"] = "rows"
    text = error_text(data)
    assert "kafka" in text
    assert "output_topic" in text


def test_sasl_without_credentials_is_an_error() -> None:
    data = minimal()
    data["kafka"]["security_protocol"] = "SASL_SSL"
    data["kafka"]["sasl_mechanism"] = "PLAIN"
    assert "sasl_username" in error_text(data)


def test_sasl_with_credentials_parses() -> None:
    data = minimal()
    data["kafka"].update(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="${KAFKA_PASSWORD}",
    )
    settings = parse_settings(data, environ={"KAFKA_PASSWORD": "pw"})
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == "pw"
    assert "pw" not in repr(settings)


def test_a_response_field_that_is_not_an_identifier_is_an_error() -> None:
    assert "llm.response_field" in error_text(minimal(response_field="llm-response"))


def test_a_top_level_that_is_not_a_mapping_is_an_error() -> None:
    assert "mapping" in error_text(["not", "a", "mapping"])


def write_settings(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / "settings.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_load_settings_resolves_a_relative_template_file_next_to_the_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    (config_dir / "prompts").mkdir(parents=True)
    (config_dir / "prompts" / "p.j2").write_text("{{ row.t }}", encoding="utf-8")
    data = minimal(template_file="prompts/p.j2", lookup_file="prompts/lookup.yaml")
    del data["llm"]["template"]
    path = write_settings(config_dir, data)
    monkeypatch.chdir(tmp_path)  # the working directory is not the settings file's
    settings = load_settings(path, environ={})
    assert settings.llm.template_file == config_dir / "prompts" / "p.j2"
    assert settings.llm.lookup_file == config_dir / "prompts" / "lookup.yaml"


def test_load_settings_keeps_an_absolute_template_file(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "p.j2"
    data = minimal(template_file=str(absolute))
    del data["llm"]["template"]
    settings = load_settings(write_settings(tmp_path, data), environ={})
    assert settings.llm.template_file == absolute


def test_load_settings_keeps_an_absolute_template_file_given_by_an_env_variable(
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts"
    data = minimal(template_file="${PROMPTS_DIR}/p.j2")
    del data["llm"]["template"]
    (tmp_path / "conf").mkdir()
    path = write_settings(tmp_path / "conf", data)
    settings = load_settings(path, environ={"PROMPTS_DIR": str(prompts)})
    assert settings.llm.template_file == prompts / "p.j2"


def test_load_settings_on_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kafka: [unclosed\n  llm: {", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, environ={})


def test_load_settings_on_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_load_settings_errors_name_the_file(tmp_path: Path) -> None:
    path = write_settings(tmp_path, minimal(provider="nope"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)
    assert "llm.provider" in str(caught.value)


def test_the_json_schema_has_the_top_level_sections() -> None:
    schema = settings_json_schema()
    assert {"kafka", "window", "llm", "delivery"} <= set(schema["properties"])
    assert set(schema["required"]) == {"kafka", "llm"}
    assert schema["$schema"].startswith("https://json-schema.org/")
