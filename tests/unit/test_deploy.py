"""deploy/ passes its offline validation, and the validation catches what it claims to."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_validate", DEPLOY / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_deploy_files_are_valid(validate: ModuleType) -> None:
    assert validate.validate() == []


def k8s_copy(tmp_path: Path) -> Path:
    target = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", target)
    return target


def edit_yaml(path: Path, change: Any, index: int = 0) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    change(docs[index])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def problems_of(validate: ModuleType, check: str, path: Path) -> list[str]:
    problems = validate.Problems()
    getattr(validate, check)(problems, path)
    return list(problems.items)


def test_a_short_termination_grace_is_caught(validate: ModuleType, tmp_path: Path) -> None:
    k8s = k8s_copy(tmp_path)

    def shorten(doc: dict[str, Any]) -> None:
        doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20

    edit_yaml(k8s / "deployment.yaml", shorten)
    found = problems_of(validate, "check_kubernetes", k8s)
    assert any("terminationGracePeriodSeconds" in p for p in found), found


def test_an_unknown_field_fails_the_kubernetes_schema(validate: ModuleType, tmp_path: Path) -> None:
    k8s = k8s_copy(tmp_path)

    def typo(doc: dict[str, Any]) -> None:
        doc["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}

    edit_yaml(k8s / "deployment.yaml", typo)
    found = problems_of(validate, "check_kubernetes", k8s)
    assert any("livenessProbes" in p for p in found), found


def test_keda_trigger_typos_and_wrong_groups_are_caught(
    validate: ModuleType, tmp_path: Path
) -> None:
    k8s = k8s_copy(tmp_path)

    def break_trigger(doc: dict[str, Any]) -> None:
        meta = doc["spec"]["triggers"][0]["metadata"]
        meta["lagThreshhold"] = meta.pop("lagThreshold")
        meta["consumerGroup"] = "someone-else"
        doc["spec"]["maxReplicas"] = 3

    edit_yaml(k8s / "scaledobject.yaml", break_trigger)
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "lagThreshhold" in found
    assert "consumerGroup differs" in found
    assert "maxReplicas" in found


def test_invalid_settings_in_the_configmap_are_caught(validate: ModuleType, tmp_path: Path) -> None:
    k8s = k8s_copy(tmp_path)

    def bad_settings(doc: dict[str, Any]) -> None:
        doc["data"]["settings.yaml"] = doc["data"]["settings.yaml"].replace(
            "provider: openrouter", "provider: anthropic"
        )

    edit_yaml(k8s / "configmap.yaml", bad_settings)
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "llm.provider" in found


def test_a_single_stage_root_dockerfile_is_caught(validate: ModuleType, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        'FROM python:3.12\nRUN apt-get install -y gcc && pip install /src\nENTRYPOINT ["python"]\n'
    )
    found = "\n".join(problems_of(validate, "check_dockerfile", dockerfile))
    for expected in ("multi-stage", "not slim", "needs a USER", "build tools", "ENTRYPOINT"):
        assert expected in found, found


def test_compose_is_checked_against_the_compose_spec(validate: ModuleType, tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    doc["services"]["consumer"]["restart_policy"] = "always"  # not a compose key
    del doc["services"]["publisher"]
    compose.write_text(yaml.safe_dump(doc))
    found = "\n".join(problems_of(validate, "check_compose", compose))
    assert "restart_policy" in found
    assert "publisher" in found


def test_the_dashboard_uses_only_exported_metrics(validate: ModuleType, tmp_path: Path) -> None:
    board = tmp_path / "board.json"
    board.write_text(
        '{"panels": [{"targets": [{"expr": "rate(llm_consumer_rows_eaten_total[5m])"}]}]}'
    )
    found = problems_of(validate, "check_grafana", tmp_path)
    assert found and "llm_consumer_rows_eaten_total" in found[0]


def test_alert_rules_are_checked_like_the_dashboard(validate: ModuleType, tmp_path: Path) -> None:
    k8s = k8s_copy(tmp_path)

    def break_rules(doc: dict[str, Any]) -> None:
        rules = doc["spec"]["groups"][0]["rules"]
        rules[0]["expr"] = "max(llm_consumer_provider_broken) == 1"
        rules[1]["expr"] = "max(llm_consumer_broker_unreachable == 1"
        del rules[2]["labels"]["severity"]
        rules[3]["for"] = "15 minutes"

    edit_yaml(k8s / "prometheusrule.yaml", break_rules)
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "15 minutes" in found  # the CRD's duration pattern
    edit_yaml(
        k8s / "prometheusrule.yaml", lambda doc: doc["spec"]["groups"][0]["rules"][3].pop("for")
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "unknown metric llm_consumer_provider_broken" in found
    assert "unbalanced brackets" in found
    assert "LLMConsumerStuckPartitions needs a severity" in found
    assert "no alert on llm_consumer_provider_failing" in found


def test_the_alert_rules_stay_out_of_the_kustomization(
    validate: ModuleType, tmp_path: Path
) -> None:
    k8s = k8s_copy(tmp_path)
    edit_yaml(
        k8s / "kustomization.yaml", lambda doc: doc["resources"].append("prometheusrule.yaml")
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "['prometheusrule.yaml'] must stay out of resources" in found
    assert "differ from the files" not in found
    (k8s / "prometheusrule.yaml").unlink()
    edit_yaml(
        k8s / "kustomization.yaml", lambda doc: doc["resources"].remove("prometheusrule.yaml")
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "needs a PrometheusRule" in found
