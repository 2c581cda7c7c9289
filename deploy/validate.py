"""Offline checks of everything in deploy/: run by `make validate-deploy` (part of `make test`).

- Kubernetes manifests: the JSON schemas bundled by `kubernetes-validate` (strict: unknown fields
  fail), hand-written schema subsets for KEDA's ScaledObject/TriggerAuthentication and the
  Prometheus Operator's PrometheusRule and ServiceMonitor, and cross-file checks (selectors,
  probes on the configured port, graceful termination longer than the shutdown grace, a rollout
  that cannot stall, the settings of the ConfigMap that kustomization.yaml generates valid for
  this version of the consumer, alerts only on exported metrics and on every readiness check,
  CRD-only kinds and example Secrets kept out of kustomization.yaml, no placeholder Secret in
  it).
- compose.yaml: the compose-spec JSON schema vendored by `check-jsonschema`, plus the demo's
  shape (apache/kafka in KRaft mode, fake LLM, one-shot publisher, consumer).
- Dockerfile: parsed with `dockerfile-parse`: multi-stage, a slim base pinned to a patch release
  or digest, the dependencies installed from requirements.lock with hashes (and pip fetching
  nothing else), non-root USER, no build tools in the final stage, `llm-consumer` entry point
  running `run`. requirements.lock: every dependency of pyproject.toml pinned with hashes.
- compose.yaml's Kafka is the version of the local broker (deploy/kafka/pom.xml).
- Grafana dashboard: valid JSON whose queries only use metric names the consumer exports (the
  same query check as the alert rules).

Nothing here needs a network, a cluster or a Docker daemon. Exit code 1 lists every problem.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from dockerfile_parse import DockerfileParser

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
K8S_VERSION = "1.30.0"
KEDA_API = "keda.sh/v1alpha1"
_BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|clang|cargo|rustc)\b")

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
# The part of KEDA's CRDs (keda.sh/v1alpha1) these manifests use; unknown keys are errors.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": KEDA_API},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "properties": {
                            "failureThreshold": {"type": "integer"},
                            "replicas": {"type": "integer"},
                        },
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "behavior": {"type": "object"},
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                "metadata": _STRING_MAP,
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "kind": {
                                            "enum": [
                                                "TriggerAuthentication",
                                                "ClusterTriggerAuthentication",
                                            ]
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": KEDA_API},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    },
                    "env": {"type": "array"},
                    "podIdentity": {"type": "object"},
                },
            },
        },
    },
}
# The kafka scaler's metadata keys (KEDA 2.x); a typo here would silently never scale.
KEDA_KAFKA_KEYS = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag",
    "partitionLimitation",
    "version",
    "sasl",
    "tls",
}


PROMETHEUS_API = "monitoring.coreos.com/v1"
# Optional kinds whose CRD a cluster may not have: `kubectl apply -k` would fail on them, so
# their files stay out of kustomization.yaml and are applied on their own. (KEDA's CRDs are not
# optional: the deployment needs its ScaledObject.)
APPLIED_SEPARATELY = {"PrometheusRule", "ServiceMonitor"}
# Files to copy and fill in (the Secret with placeholders): never in kustomization.yaml, where
# `kubectl apply -k` would overwrite the real values with the placeholders.
EXAMPLE_SUFFIX = ".example.yaml"
PLACEHOLDER = "replace-me"
# The readiness checks of /readyz as gauges: each needs an alert, or a reason goes unnoticed.
ALERTED_METRICS = (
    "llm_consumer_ready",
    "llm_consumer_provider_failing",
    "llm_consumer_broker_unreachable",
    "llm_consumer_stuck_partitions",
)
_DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    "(([0-9]+)ms)?)$",
}
# The part of the PrometheusRule CRD (monitoring.coreos.com/v1) these rules use.
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": PROMETHEUS_API},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {
                                            "type": "string",
                                            "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                        },
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# The part of the ServiceMonitor CRD (monitoring.coreos.com/v1) this one uses.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": PROMETHEUS_API},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP},
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: object, where: str, message: str) -> None:
        if not ok:
            self.items.append(f"{where}: {message}")


# ---- Kubernetes ------------------------------------------------------------------------------


def load_manifests(directory: Path) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    for path in sorted(directory.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                yield path, f"{_rel(path)}#{index}", document


def check_kubernetes(problems: Problems, directory: Path = DEPLOY / "k8s") -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    kustomization: tuple[str, dict[str, Any]] | None = None
    files = {path.name for path in directory.glob("*.yaml")}
    separate: set[str] = set()
    alerts: dict[str, str] = {}
    for file, where, doc in load_manifests(directory):
        kind = str(doc.get("kind"))
        if kind == "Kustomization":
            kustomization = where, doc
            continue
        by_kind.setdefault(kind, []).append(doc)
        if kind in APPLIED_SEPARATELY:
            separate.add(file.name)
        if kind == "PrometheusRule":
            alerts |= check_prometheus_rule(problems, where, doc)
            continue
        if kind == "ServiceMonitor":
            for error in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc):
                path = "/".join(map(str, error.absolute_path))
                problems.check(False, f"{where} ServiceMonitor {path}", error.message)
            continue
        if doc.get("apiVersion") == KEDA_API:
            schema = KEDA_SCHEMAS.get(kind)
            if schema is None:
                problems.check(False, where, f"no schema for KEDA kind {kind}")
                continue
            for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                path = "/".join(map(str, error.absolute_path))
                problems.check(False, f"{where} {kind} {path}", error.message)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(map(str, error.path))
            problems.check(False, f"{where} {kind} {path}", error.message)
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.check(False, where, str(error))
    problems.check(kustomization is not None, "deploy/k8s", "no kustomization.yaml")
    examples = {name for name in files if name.endswith(EXAMPLE_SUFFIX)}
    if kustomization is not None:
        where, doc = kustomization
        listed = set(doc.get("resources", []))
        expected = files - {"kustomization.yaml"} - separate - examples
        problems.check(
            listed - separate - examples == expected,
            where,
            f"resources {sorted(listed)} differ from the files {sorted(expected)}",
        )
        problems.check(
            not listed & separate,
            where,
            f"{sorted(listed & separate)} must stay out of resources: `kubectl apply -k` fails "
            "on a cluster without their CRD (apply them on their own)",
        )
        problems.check(
            not listed & examples,
            where,
            f"{sorted(listed & examples)} must stay out of resources: `kubectl apply -k` would "
            "overwrite the real values with the example's placeholders",
        )
        for name in sorted(listed - examples):
            check_no_placeholders(problems, directory / name)
        for generated in check_config_map_generator(problems, where, doc, directory):
            by_kind.setdefault("ConfigMap", []).append(generated)
    check_kubernetes_consistency(problems, by_kind)
    rules = by_kind.get("PrometheusRule")
    problems.check(rules, "deploy/k8s", "needs a PrometheusRule with the consumer's alerts")
    for metric in ALERTED_METRICS:
        alerted = any(re.search(rf"\b{metric}\b", expr) for expr in alerts.values())
        problems.check(not rules or alerted, "deploy/k8s", f"no alert on {metric}")


def check_no_placeholders(problems: Problems, path: Path) -> None:
    """A Secret applied by `apply -k` must not carry placeholders: it would replace the real one."""
    if not path.is_file():
        return
    for document in yaml.safe_load_all(path.read_text()):
        if not isinstance(document, dict) or document.get("kind") != "Secret":
            continue
        values = {**document.get("stringData", {}), **document.get("data", {})}
        placeholders = sorted(k for k, v in values.items() if PLACEHOLDER in str(v))
        problems.check(
            not placeholders,
            _rel(path),
            f"Secret {document['metadata']['name']} has {PLACEHOLDER} values {placeholders} and "
            f"is applied by `kubectl apply -k`: ship it as *{EXAMPLE_SUFFIX}, outside resources",
        )


def check_config_map_generator(
    problems: Problems, where: str, kustomization: dict[str, Any], directory: Path
) -> list[dict[str, Any]]:
    """The ConfigMaps `configMapGenerator` makes, as kustomize would (keys: file basenames), so
    the cross-file checks read the settings the pods get. Every file must exist."""
    generated: list[dict[str, Any]] = []
    for entry in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for source in entry.get("files", []):
            key, _, file = str(source).rpartition("=")
            path = directory / file
            problems.check(path.is_file(), where, f"configMapGenerator file {file} is missing")
            if path.is_file():
                data[key or Path(file).name] = path.read_text()
        labels = entry.get("options", {}).get("labels", {})
        generated.append({"metadata": {"name": entry["name"], "labels": labels}, "data": data})
    return generated


def check_service_monitor(
    problems: Problems, monitor: dict[str, Any], service: dict[str, Any]
) -> None:
    where = "deploy/k8s/servicemonitor.yaml"
    wanted = monitor["spec"]["selector"].get("matchLabels", {})
    labels = service["metadata"].get("labels", {})
    problems.check(
        wanted and all(labels.get(k) == v for k, v in wanted.items()),
        where,
        "selector does not match the metrics Service's labels",
    )
    names = {port.get("name") for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        problems.check(
            endpoint["port"] in names, where, f"port {endpoint['port']} is not a Service port"
        )
        problems.check(endpoint.get("path", "/metrics") == "/metrics", where, "path /metrics")


def check_prometheus_rule(problems: Problems, where: str, doc: dict[str, Any]) -> dict[str, str]:
    """The CRD's shape, queries on exported metrics, alerts a person can route and read.

    Returns the alerts' expressions by name (none when the shape is wrong).
    """
    errors = list(jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(doc))
    for error in errors:
        path = "/".join(map(str, error.absolute_path))
        problems.check(False, f"{where} PrometheusRule {path}", error.message)
    if errors:  # the checks below assume the shape
        return {}
    known = exported_metric_names()
    alerts: dict[str, str] = {}
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            check_query(problems, f"{where} {name}", rule["expr"], known)
            if "alert" not in rule:
                continue
            problems.check(name not in alerts, where, f"alert {name} is defined twice")
            alerts[name] = rule["expr"]
            problems.check(
                rule.get("labels", {}).get("severity"), where, f"alert {name} needs a severity"
            )
            problems.check(
                rule.get("annotations", {}).get("summary"), where, f"alert {name} needs a summary"
            )
    return alerts


def _one(problems: Problems, by_kind: dict[str, list[dict[str, Any]]], kind: str) -> Any:
    docs = by_kind.get(kind, [])
    problems.check(docs, "deploy/k8s", f"needs a {kind}")
    return docs[0] if docs else None


def check_kubernetes_consistency(
    problems: Problems, by_kind: dict[str, list[dict[str, Any]]]
) -> None:
    from consumer.config import Settings, parse_settings

    deployment = _one(problems, by_kind, "Deployment")
    configmap = _one(problems, by_kind, "ConfigMap")
    service = _one(problems, by_kind, "Service")
    pdb = _one(problems, by_kind, "PodDisruptionBudget")
    scaled = _one(problems, by_kind, "ScaledObject")
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    if not (deployment and configmap and service and pdb and scaled):
        return
    for monitor in by_kind.get("ServiceMonitor", []):
        check_service_monitor(problems, monitor, service)
    rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    problems.check(
        str(rolling.get("maxUnavailable", "25%")) not in ("0", "0%"),
        "deploy/k8s/deployment.yaml",
        "maxUnavailable 0 stalls a rollout: a new pod is not ready while a provider outage "
        "holds its windows back, so no old pod is ever replaced",
    )
    where = "deploy/k8s/config/settings.yaml"
    settings: Settings | None = None
    raw = yaml.safe_load(configmap["data"].get("settings.yaml", "{}"))
    env = {k: "x" for s in secrets.values() for k in s.get("stringData", {})}
    try:
        settings = parse_settings(raw, "configmap settings.yaml", environ=env)
    except Exception as error:
        problems.check(False, where, f"settings.yaml is not valid for llm-consumer: {error}")
    if settings is not None and settings.llm.template_file is not None:
        name = str(settings.llm.template_file)
        problems.check(name in configmap["data"], where, f"template_file {name} is not a key")

    pod = deployment["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    where = "deploy/k8s/deployment.yaml"
    spec = pod["spec"]
    container = spec["containers"][0]
    security = spec.get("securityContext", {})
    problems.check(security.get("runAsNonRoot") is True, where, "pod needs runAsNonRoot: true")
    problems.check(security.get("runAsUser", 0) != 0, where, "pod must not run as uid 0")
    csec = container.get("securityContext", {})
    problems.check(csec.get("allowPrivilegeEscalation") is False, where, "no privilege escalation")
    resources_ = container.get("resources", {})
    problems.check(resources_.get("requests"), where, "container needs resource requests")
    problems.check(resources_.get("limits", {}).get("memory"), where, "container needs a mem limit")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    probes = {
        name: container.get(name, {}).get("httpGet", {})
        for name in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    problems.check(probes["livenessProbe"].get("path") == "/healthz", where, "liveness /healthz")
    problems.check(probes["readinessProbe"].get("path") == "/readyz", where, "readiness /readyz")
    if settings is not None:
        port = settings.observability.port
        problems.check(port != 0, where, "observability.port is 0: no probes can answer")
        for name, probe in probes.items():
            target = probe.get("port")
            resolved = ports.get(target) if isinstance(target, str) else target
            problems.check(resolved == port, where, f"{name} port {target} is not {port}")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        problems.check(
            grace > settings.delivery.shutdown_grace_s + 5,
            where,
            f"terminationGracePeriodSeconds {grace} must exceed delivery.shutdown_grace_s "
            f"({settings.delivery.shutdown_grace_s}) with room to commit",
        )
        trigger = scaled["spec"]["triggers"][0]["metadata"]
        problems.check(
            trigger.get("consumerGroup") == settings.kafka.group_id,
            "deploy/k8s/scaledobject.yaml",
            "consumerGroup differs from kafka.group_id in the ConfigMap",
        )
        problems.check(
            trigger.get("topic") == settings.kafka.input_topic,
            "deploy/k8s/scaledobject.yaml",
            "topic differs from kafka.input_topic in the ConfigMap",
        )
    for ref in container.get("envFrom", []):
        name = ref.get("secretRef", {}).get("name")
        problems.check(name is None or name in secrets, where, f"secret {name} is not defined")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    cm_names = {v["configMap"]["name"] for v in volumes.values() if "configMap" in v}
    problems.check(configmap["metadata"]["name"] in cm_names, where, "ConfigMap is not mounted")
    selector = deployment["spec"]["selector"]["matchLabels"]
    problems.check(
        all(labels.get(k) == v for k, v in selector.items()), where, "selector/labels mismatch"
    )
    for kind, sel in (
        ("Service", service["spec"].get("selector", {})),
        ("PodDisruptionBudget", pdb["spec"]["selector"].get("matchLabels", {})),
    ):
        problems.check(
            sel and all(labels.get(k) == v for k, v in sel.items()),
            f"deploy/k8s {kind}",
            "selector does not match the Deployment's pods",
        )
    for port in service["spec"]["ports"]:
        target = port.get("targetPort")
        problems.check(
            target in ports or target in ports.values(),
            "deploy/k8s/service.yaml",
            f"targetPort {target} is not a container port",
        )

    where = "deploy/k8s/scaledobject.yaml"
    sspec = scaled["spec"]
    problems.check(
        sspec["scaleTargetRef"]["name"] == deployment["metadata"]["name"],
        where,
        "scaleTargetRef does not name the Deployment",
    )
    problems.check("maxReplicaCount" in sspec, where, "set maxReplicaCount (= partitions)")
    for trigger in sspec["triggers"]:
        problems.check(trigger["type"] == "kafka", where, "the trigger must be kafka (lag)")
        meta = trigger["metadata"]
        unknown = set(meta) - KEDA_KAFKA_KEYS
        problems.check(not unknown, where, f"unknown kafka scaler keys {sorted(unknown)}")
        for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
            problems.check(key in meta, where, f"kafka trigger needs {key}")
        problems.check(
            meta.get("allowIdleConsumers", "false") == "false",
            where,
            "allowIdleConsumers must stay false: more members than partitions sit idle",
        )
        auth = trigger.get("authenticationRef", {}).get("name")
        names = {d["metadata"]["name"] for d in by_kind.get("TriggerAuthentication", [])}
        problems.check(auth is None or auth in names, where, f"no TriggerAuthentication {auth}")
    for auth in by_kind.get("TriggerAuthentication", []):
        for ref in auth["spec"].get("secretTargetRef", []):
            secret = secrets.get(ref["name"], {})
            problems.check(
                ref["key"] in secret.get("stringData", {}) or ref["key"] in secret.get("data", {}),
                where,
                f"TriggerAuthentication refers to missing {ref['name']}/{ref['key']}",
            )


# ---- compose ---------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def local_kafka_version(pom: Path = DEPLOY / "kafka" / "pom.xml") -> str | None:
    """The Kafka version deploy/kafka/kafka.sh runs (the tests' broker)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    return found.group(1) if found else None


def check_compose(problems: Problems, path: Path = DEPLOY / "compose.yaml") -> None:
    where = _rel(path)
    doc = yaml.safe_load(path.read_text())
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    for error in validator_class(schema).iter_errors(doc):
        problems.check(False, f"{where} {'/'.join(map(str, error.absolute_path))}", error.message)
    services = doc.get("services", {})
    for name in ("kafka", "fake-llm", "publisher", "consumer"):
        problems.check(name in services, where, f"needs a {name} service")
    if not {"kafka", "consumer", "publisher", "fake-llm"} <= set(services):
        return
    kafka = services["kafka"]
    problems.check(str(kafka.get("image", "")).startswith("apache/kafka:"), where, "apache/kafka")
    local = local_kafka_version()
    problems.check(
        kafka.get("image") == f"apache/kafka:{local}",
        where,
        f"kafka image {kafka.get('image')} is not the local broker's version {local} "
        "(deploy/kafka/pom.xml): the demo in containers and the tests would run different Kafkas",
    )
    env = kafka.get("environment", {})
    problems.check(
        "controller" in str(env.get("KAFKA_PROCESS_ROLES", "")), where, "Kafka in KRaft mode"
    )
    consumer = services["consumer"]
    problems.check(consumer.get("command", [None])[0] == "run", where, "consumer runs `run`")
    problems.check(
        services["publisher"].get("restart") == "no", where, "the publisher runs once (no restart)"
    )
    deps = consumer.get("depends_on", {})
    problems.check(
        deps.get("publisher", {}).get("condition") == "service_completed_successfully",
        where,
        "the consumer starts after the publisher finished",
    )
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            dockerfile = (path.parent / build["context"] / build["dockerfile"]).resolve()
            problems.check(dockerfile.is_file(), where, f"{name}: no Dockerfile at {dockerfile}")
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                problems.check(
                    (path.parent / source).exists(), where, f"{name}: {source} does not exist"
                )


# ---- Dockerfile ------------------------------------------------------------------------------


def check_dockerfile(problems: Problems, path: Path = DEPLOY / "Dockerfile") -> None:
    where = _rel(path)
    parser = DockerfileParser(path=str(path))
    instructions = parser.structure
    stages: list[list[dict[str, Any]]] = []
    for instruction in instructions:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    problems.check(len(stages) >= 2, where, "must be multi-stage (build, runtime)")
    if not stages:
        return
    final = stages[-1]
    base = parser.baseimage or ""
    args = {
        i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1]
        for i in instructions[: len(instructions)]
        if i["instruction"] == "ARG" and "=" in i["value"]
    }
    for name, value in args.items():
        base = base.replace(f"${{{name}}}", value).replace(f"${name}", value)
    problems.check(
        base.startswith("python:") and "slim" in base, where, f"final base {base} is not slim"
    )
    problems.check(
        _PINNED_IMAGE.search(base),
        where,
        f"base {base} is not pinned: name a patch release (python:3.11.11-slim-...) or a digest",
    )
    check_locked_install(problems, where, instructions)
    users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
    problems.check(users, where, "the final stage needs a USER")
    if users:
        user = users[-1].split(":")[0]
        problems.check(user not in {"root", "0"}, where, f"USER {user} is root")
    problems.check(
        any(i["instruction"] == "COPY" and "--from=" in i["value"] for i in final),
        where,
        "the final stage copies its install from the build stage",
    )
    for instruction in final:
        if instruction["instruction"] == "RUN":
            problems.check(
                not _BUILD_TOOLS.search(instruction["value"]),
                where,
                f"build tools in the final stage: {instruction['value']}",
            )
    entry = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
    cmd = [i["value"] for i in final if i["instruction"] == "CMD"]
    problems.check(entry, where, "needs an ENTRYPOINT")
    if entry:
        problems.check(
            json.loads(entry[-1]) == ["llm-consumer"], where, "ENTRYPOINT must be llm-consumer"
        )
    if cmd:
        problems.check(json.loads(cmd[-1])[:1] == ["run"], where, "CMD must be `run -c FILE`")
    exposed = " ".join(i["value"] for i in final if i["instruction"] == "EXPOSE")
    problems.check("9464" in exposed, where, "EXPOSE the metrics port 9464")
    for instruction in instructions:
        if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
            for source in instruction["value"].split()[:-1]:
                problems.check((ROOT / source).exists(), where, f"COPY source {source} missing")


_PINNED_IMAGE = re.compile(r":\d+\.\d+\.\d+[-\w.]*(@sha256:[0-9a-f]{64})?$|@sha256:[0-9a-f]{64}$")
_LOCK_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_locked_install(
    problems: Problems, where: str, instructions: list[dict[str, Any]]
) -> None:
    """The image installs the lock with hashes and the package without dependencies, and pip
    fetches nothing else (no `pip install --upgrade pip`, no build isolation)."""
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    problems.check(
        re.search(r"pip install --require-hashes\b.*-r requirements\.lock", runs),
        where,
        "install the dependencies with pip install --require-hashes -r requirements.lock",
    )
    problems.check(
        re.search(r"pip install --no-deps --no-build-isolation\b[^&]*\s\.(\s|$)", runs),
        where,
        "install the package with pip install --no-deps --no-build-isolation .",
    )
    problems.check(
        "--upgrade pip" not in runs, where, "upgrading pip fetches an unpinned pip from the index"
    )
    copied = " ".join(i["value"] for i in instructions if i["instruction"] == "COPY")
    problems.check("requirements.lock" in copied, where, "COPY requirements.lock")


def check_lock(
    problems: Problems, lock: Path = ROOT / "requirements.lock", project: Path = ROOT
) -> None:
    """Every dependency and build requirement of pyproject.toml pinned with hashes."""
    import tomllib

    where = _rel(lock)
    if not lock.is_file():
        problems.check(False, where, "missing: generate it (see its header in git history)")
        return
    text = lock.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text)
    pinned: dict[str, str] = {}
    for entry in entries:
        match = _LOCK_ENTRY.match(entry)
        if match is None:
            continue
        name = _normalized(match.group(1))
        pinned[name] = match.group(2)
        problems.check("--hash=sha256:" in entry, where, f"{name} has no hash")
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    for requirement in wanted:
        name = _normalized(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        problems.check(name in pinned, where, f"{requirement} (pyproject.toml) is not locked")


# ---- Grafana ---------------------------------------------------------------------------------


# The series a metric family exposes, by type (a labelled family has no samples until used).
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
}
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_CLOSES = {")": "(", "]": "[", "}": "{"}


def exported_metric_names() -> set[str]:
    """Every series name the consumer's `Metrics` can expose (batch mode's included, which
    exist only when it is on)."""
    from consumer.observability.metrics import Metrics
    from consumer.pipeline.batch_enrich import BatchTracker

    metrics = Metrics()
    metrics.watch_batches(BatchTracker())
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = _SERIES_SUFFIXES.get(family.type, ("",))
        names.update(f"{family.name}{suffix}" for suffix in suffixes)
    return names


def check_query(problems: Problems, where: str, expr: str, known: set[str]) -> None:
    """A PromQL query (dashboard or alert) names only exported series and closes its brackets."""
    for name in sorted(set(re.findall(r"\bllm_consumer_[a-z_]+", expr))):
        problems.check(name in known, where, f"unknown metric {name} in {expr!r}")
    opened: list[str] = []
    balanced = True
    for char in _QUOTED.sub('""', expr):
        if char in "([{":
            opened.append(char)
        elif char in _CLOSES:
            balanced = balanced and bool(opened) and opened.pop() == _CLOSES[char]
    problems.check(balanced and not opened, where, f"unbalanced brackets in {expr!r}")


def check_grafana(problems: Problems, directory: Path = DEPLOY / "grafana") -> None:
    known = exported_metric_names()
    dashboards = sorted(directory.glob("*.json"))
    problems.check(dashboards, "deploy/grafana", "no dashboard JSON")
    for path in dashboards:
        where = _rel(path)
        try:
            board = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            problems.check(False, where, f"not JSON: {error}")
            continue
        problems.check(board.get("panels"), where, "no panels")
        exprs = [
            target.get("expr", "")
            for panel in board.get("panels", [])
            for target in panel.get("targets", [])
        ]
        problems.check(exprs, where, "no queries")
        for expr in exprs:
            check_query(problems, where, expr, known)


def validate() -> list[str]:
    problems = Problems()
    check_lock(problems)
    check_dockerfile(problems)
    check_compose(problems)
    check_kubernetes(problems)
    check_grafana(problems)
    return problems.items


def main() -> int:
    found = validate()
    for problem in found:
        print(problem, file=sys.stderr)
    if found:
        print(f"deploy/: {len(found)} problem(s)", file=sys.stderr)
        return 1
    print("deploy/: Dockerfile, compose.yaml, k8s/ and grafana/ are valid")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
