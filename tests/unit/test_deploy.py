"""deploy/ passes its offline validation, and the validation catches what it claims to."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
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


def test_invalid_settings_in_the_generated_configmap_are_caught(
    validate: ModuleType, tmp_path: Path
) -> None:
    k8s = k8s_copy(tmp_path)
    settings = k8s / "config" / "settings.yaml"
    good = settings.read_text()
    settings.write_text(good.replace("provider: openrouter", "provider: x"))
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "llm.provider" in found
    settings.write_text(good)
    (k8s / "config" / "prompt.j2").unlink()
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "configMapGenerator file config/prompt.j2 is missing" in found
    assert "template_file prompt.j2 is not a key" in found


def test_the_example_secret_stays_out_of_the_kustomization(
    validate: ModuleType, tmp_path: Path
) -> None:
    k8s = k8s_copy(tmp_path)
    edit_yaml(
        k8s / "kustomization.yaml", lambda doc: doc["resources"].append("secret.example.yaml")
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "['secret.example.yaml'] must stay out of resources" in found
    # The same Secret under another name is caught by its placeholders.
    (k8s / "secret.example.yaml").rename(k8s / "secret.yaml")
    edit_yaml(
        k8s / "kustomization.yaml",
        lambda doc: doc["resources"].__setitem__(-1, "secret.yaml"),
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "Secret llm-consumer has replace-me values" in found
    assert "differ from the files" not in found


def test_a_rollout_that_can_stall_is_caught(validate: ModuleType, tmp_path: Path) -> None:
    k8s = k8s_copy(tmp_path)

    def no_unavailable(doc: dict[str, Any]) -> None:
        doc["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": 1, "maxUnavailable": 0}

    edit_yaml(k8s / "deployment.yaml", no_unavailable)
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "maxUnavailable 0 stalls a rollout" in found


def test_the_service_monitor_must_select_the_metrics_service(
    validate: ModuleType, tmp_path: Path
) -> None:
    k8s = k8s_copy(tmp_path)

    def break_monitor(doc: dict[str, Any]) -> None:
        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
        doc["spec"]["endpoints"][0]["port"] = "http"
        doc["spec"]["endpoints"][0]["intervall"] = "30s"

    edit_yaml(k8s / "servicemonitor.yaml", break_monitor)
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "intervall" in found
    edit_yaml(k8s / "servicemonitor.yaml", lambda doc: doc["spec"]["endpoints"][0].pop("intervall"))
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "selector does not match the metrics Service's labels" in found
    assert "port http is not a Service port" in found
    edit_yaml(
        k8s / "kustomization.yaml", lambda doc: doc["resources"].append("servicemonitor.yaml")
    )
    found = "\n".join(problems_of(validate, "check_kubernetes", k8s))
    assert "['servicemonitor.yaml'] must stay out of resources" in found


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
def test_kustomize_renders_a_hashed_configmap_and_no_secret_with_placeholders() -> None:
    """What `kubectl apply -k` would apply, rendered offline by kubectl's own kustomize."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert "PrometheusRule" not in kinds and "ServiceMonitor" not in kinds
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["llm-consumer-keda"]
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    name = configmap["metadata"]["name"]
    assert re.fullmatch(r"llm-consumer-[a-z0-9]{10}", name), name
    assert set(configmap["data"]) == {"settings.yaml", "prompt.j2"}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "settings", "configMap": {"name": name}} in volumes


def test_a_single_stage_root_dockerfile_is_caught(validate: ModuleType, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        'FROM python:3.12\nRUN apt-get install -y gcc && pip install /src\nENTRYPOINT ["python"]\n'
    )
    found = "\n".join(problems_of(validate, "check_dockerfile", dockerfile))
    for expected in ("multi-stage", "not slim", "needs a USER", "build tools", "ENTRYPOINT"):
        assert expected in found, found
    for expected in ("is not pinned", "--require-hashes -r requirements.lock", "--no-deps"):
        assert expected in found, found


def test_an_unpinned_or_unlocked_dockerfile_is_caught(validate: ModuleType, tmp_path: Path) -> None:
    shipped = (DEPLOY / "Dockerfile").read_text()
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        shipped.replace("python:3.11.11-slim-bookworm", "python:3.11-slim-bookworm")
        .replace("--require-hashes ", "")
        .replace(
            '--no-build-isolation "$@" .',
            '--no-build-isolation "$@" . && pip install --upgrade pip',
        )
    )
    found = "\n".join(problems_of(validate, "check_dockerfile", dockerfile))
    assert "base python:3.11-slim-bookworm is not pinned" in found
    assert "--require-hashes -r requirements.lock" in found
    assert "upgrading pip" in found
    digest = "python:3.11-slim@sha256:" + "0" * 64
    dockerfile.write_text(shipped.replace("python:3.11.11-slim-bookworm", digest))
    assert problems_of(validate, "check_dockerfile", dockerfile) == []


def test_a_dependency_missing_from_the_lock_or_without_hashes_is_caught(
    validate: ModuleType, tmp_path: Path
) -> None:
    root = DEPLOY.parent
    lock = tmp_path / "requirements.lock"
    text = (root / "requirements.lock").read_text()
    start = text.index("\norjson==")
    end = text.index("\n", text.index("# via", start))
    lock.write_text(text[:start] + text[end:] + "tqdm-extra==1.0\n")
    problems = validate.Problems()
    validate.check_lock(problems, lock, root)
    found = "\n".join(problems.items)
    assert "orjson>=3.10 (pyproject.toml) is not locked" in found
    assert "tqdm-extra has no hash" in found
    problems = validate.Problems()
    validate.check_lock(problems, tmp_path / "nothing.lock", root)
    assert "missing" in problems.items[0]


def test_compose_runs_the_local_brokers_kafka_version(validate: ModuleType, tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    doc["services"]["kafka"]["image"] = "apache/kafka:4.1.0"
    compose.write_text(yaml.safe_dump(doc))
    found = "\n".join(problems_of(validate, "check_compose", compose))
    assert "apache/kafka:4.1.0 is not the local broker's version" in found


def _docker_daemon() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return "the Docker daemon is not reachable (docker info failed)"
    for name in ("LLM_CONSUMER_BASE_IMAGE", "LLM_CONSUMER_WHEELS"):
        if not os.environ.get(name):
            return f"{name} is not set (an offline build needs a local base image and wheels)"
    return None


@pytest.mark.timeout(900)
def test_the_image_builds_offline_from_a_local_base_image_and_wheels(tmp_path: Path) -> None:
    """The build the Dockerfile's header describes, with the network of the build off. Needs a
    Docker daemon, LLM_CONSUMER_BASE_IMAGE (a local python:3.11 slim image) and
    LLM_CONSUMER_WHEELS (pip download --require-hashes -r requirements.lock -d DIR); otherwise
    the static checks above (deploy/validate.py) are what runs."""
    reason = _docker_daemon()
    if reason is not None:
        pytest.skip(reason)
    root = DEPLOY.parent
    built = subprocess.run(
        [
            "docker",
            "build",
            "--network=none",
            "--pull=false",
            "-f",
            str(DEPLOY / "Dockerfile"),
            "--build-arg",
            f"PYTHON_IMAGE={os.environ['LLM_CONSUMER_BASE_IMAGE']}",
            "--build-arg",
            "PIP_OFFLINE=1",
            "--build-context",
            f"wheels={os.environ['LLM_CONSUMER_WHEELS']}",
            "-t",
            "llm-consumer:offline-test",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    version = subprocess.run(
        ["docker", "run", "--rm", "--network=none", "llm-consumer:offline-test", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.stdout.startswith("llm-consumer "), version.stderr


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
