"""Static checks of the deployment files: Dockerfile, docker-compose.yml, the Kubernetes manifests,
the Prometheus alerts and the Grafana dashboard.

No Docker engine or cluster is needed: the files are parsed and checked for the properties the
service relies on (probes on /healthz and /readyz, non-root, no persistence in Redis, migrations
before replicas, ...). Every metric name used by an alert or a dashboard panel must be one that
`app.metrics.registry` exports, so renaming a metric fails here instead of silencing an alert.
`.ci/static-checks` adds hadolint, `docker-compose config`, kubernetes-validate and promtool.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from app.metrics import registry as metrics_registry

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "tokenvend.json"
COMPOSE = ROOT / "docker-compose.yml"
CI_ENV = DEPLOY / "compose" / "ci.env"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRET_VARS = (
    "TOKENVEND_DATABASE_URL",
    "TOKENVEND_REDIS_URL",
    "TOKENVEND_ENCRYPTION_KEYS",
    "TOKENVEND_BOOTSTRAP_ADMIN_KEY",
)
UVICORN_GRACEFUL_SECONDS = 20  # app/cli.py: timeout_graceful_shutdown
METRIC_NAME = re.compile(r"\btokenvend_[a-z0-9_]+")

# The sample names Prometheus sees for a metric family of each type (text exposition format).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def load_yaml(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def sample_names(families: Iterable[tuple[str, str]]) -> set[str]:
    return {name + suffix for name, type_ in families for suffix in SAMPLE_SUFFIXES[type_]}


def declared_metrics() -> list[MetricWrapperBase]:
    return [m for m in vars(metrics_registry).values() if isinstance(m, MetricWrapperBase)]


def exported_names() -> set[str]:
    """Every sample name tokenvend can export, from the metric families in the default registry
    (the one /metrics serves). Built from family names and types, not from collected samples: a
    labelled metric that has seen no observation yet has no samples."""
    families = [
        (family.name, family.type)
        for family in REGISTRY.collect()
        if family.name.startswith("tokenvend_")
    ]
    return sample_names(families)


def metric_names_in(expressions: Iterable[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


class TestMetricNames:
    def test_every_declared_metric_is_registered_for_export(self) -> None:
        declared = {(m._name, m._type) for m in declared_metrics()}
        families = {(f.name, f.type) for f in REGISTRY.collect()}
        assert len(declared) >= 10
        assert declared <= families

    def test_sample_suffixes_match_what_prometheus_client_exposes(self) -> None:
        registry = CollectorRegistry()
        counter = Counter("probe_events_total", "probe", registry=registry)
        gauge = Gauge("probe_level", "probe", registry=registry)
        histogram = Histogram("probe_seconds", "probe", buckets=(1.0,), registry=registry)
        counter.inc()
        gauge.set(1)
        histogram.observe(0.5)
        collected = {s.name for family in registry.collect() for s in family.samples}
        computed = sample_names((m._name, m._type) for m in (counter, gauge, histogram))
        assert collected <= computed
        assert {n for n in computed - collected if not n.endswith("_created")} == set()

    def test_counters_are_exported_with_total_and_histograms_with_buckets(self) -> None:
        names = exported_names()
        assert "tokenvend_http_requests_total" in names
        assert "tokenvend_http_requests" not in names  # no series has the bare counter name
        assert "tokenvend_http_request_duration_seconds_bucket" in names
        assert "tokenvend_http_request_duration_seconds" not in names
        assert "tokenvend_circuit_state" in names
        assert "tokenvend_no_such_metric_total" not in names


# -- Kubernetes ---------------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        objects.extend(doc for doc in load_yaml(path) if doc and doc.get("kind") != "Kustomization")
    return objects


def k8s_one(kind: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def secret_env(c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def assert_hardened(pod_spec: dict[str, Any], c: dict[str, Any]) -> None:
    pod_sc = pod_spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    assert pod_spec.get("automountServiceAccountToken") is False


class TestKubernetes:
    def test_the_required_kinds_are_there(self) -> None:
        kinds = {o["kind"] for o in k8s_objects()}
        assert {
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "Job",
            "Secret",
            "ServiceAccount",
        } <= kinds

    def test_kustomization_lists_existing_files_but_not_the_secret_template_or_the_job(
        self,
    ) -> None:
        (kustomization,) = load_yaml(K8S / "kustomization.yaml")
        resources = kustomization["resources"]
        for name in resources:
            assert (K8S / name).is_file(), name
        kinds = {doc["kind"] for name in resources for doc in load_yaml(K8S / name)}
        assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
        assert not {"Secret", "Job"} & kinds

    def test_deployment_probes_point_to_healthz_and_readyz_on_the_http_port(self) -> None:
        c = container(k8s_one("Deployment"))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] in ("http", 8000), probe

    def test_deployment_runs_several_hardened_replicas(self) -> None:
        deployment = k8s_one("Deployment")
        assert deployment["spec"]["replicas"] >= 2
        pod_spec = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        assert c["args"][0] == "serve"
        assert_hardened(pod_spec, c)
        # A read-only root file system: /tmp (metrics of several workers) must be a volume.
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]]

    def test_deployment_takes_its_secrets_from_the_secret(self) -> None:
        secret = k8s_one("Secret")
        env = secret_env(container(k8s_one("Deployment")))
        assert set(SECRET_VARS) <= set(env)
        for name in SECRET_VARS:
            secret_name, key = env[name]
            assert secret_name == secret["metadata"]["name"]
            assert key in secret["stringData"]

    def test_shutdown_drains_before_the_grace_period_ends(self) -> None:
        deployment = k8s_one("Deployment")
        pod_spec = deployment["spec"]["template"]["spec"]
        command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = int(command[1])
        assert pre_stop >= 5  # time for the endpoint to leave the Service
        # The grace period counts the preStop hook too; uvicorn drains for up to 20 s after it.
        assert pod_spec["terminationGracePeriodSeconds"] > pre_stop + UVICORN_GRACEFUL_SECONDS

    def test_pods_carry_prometheus_scrape_annotations(self) -> None:
        annotations = k8s_one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8000"
        assert annotations["prometheus.io/path"] == "/metrics"

    def test_service_pdb_and_hpa_target_the_api_pods_only(self) -> None:
        deployment = k8s_one("Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        job_labels = k8s_one("Job")["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)

        service = k8s_one("Service")
        assert selects(service["spec"]["selector"], pod_labels)
        assert not selects(service["spec"]["selector"], job_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= {"http", 8000}

        pdb = k8s_one("PodDisruptionBudget")
        assert pdb["apiVersion"] == "policy/v1"
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        assert not selects(pdb["spec"]["selector"]["matchLabels"], job_labels)
        assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # drains can proceed

        hpa = k8s_one("HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]

    def test_migration_job_upgrades_the_database_with_the_same_image(self) -> None:
        job = k8s_one("Job")
        c = container(job)
        assert c["args"] == ["db", "upgrade"]
        assert c["image"] == container(k8s_one("Deployment"))["image"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
        assert secret_env(c)["TOKENVEND_DATABASE_URL"][0] == k8s_one("Secret")["metadata"]["name"]
        assert_hardened(job["spec"]["template"]["spec"], c)

    def test_secret_template_holds_placeholders_only(self) -> None:
        secret = k8s_one("Secret")
        assert "data" not in secret
        assert set(secret["stringData"]) == set(SECRET_VARS)
        for key, value in secret["stringData"].items():
            assert "REPLACE" in value, f"{key} must stay a placeholder in the template"


# -- Prometheus alerts --------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


class TestAlerts:
    def test_rules_are_well_formed(self) -> None:
        (doc,) = load_yaml(ALERTS)
        assert doc["groups"]
        for group in doc["groups"]:
            assert group["name"]
            assert group["rules"]
        names = []
        for rule in alert_rules():
            assert re.fullmatch(r"Tokenvend[A-Za-z0-9]+", rule["alert"]), rule
            assert isinstance(rule["expr"], str)
            assert rule["expr"].strip()
            assert re.fullmatch(r"\d+[smhdwy]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["annotations"]["description"].strip(), rule["alert"]
            names.append(rule["alert"])
        assert len(names) == len(set(names))

    def test_every_metric_in_an_alert_is_exported(self) -> None:
        used = metric_names_in(rule["expr"] for rule in alert_rules())
        assert used
        assert used <= exported_names(), f"unknown metrics: {sorted(used - exported_names())}"

    def test_the_required_conditions_are_covered(self) -> None:
        used = metric_names_in(rule["expr"] for rule in alert_rules())
        assert {
            "tokenvend_upstream_exchanges_total",
            "tokenvend_credential_rejections_total",
            "tokenvend_circuit_state",
            "tokenvend_cached_jwt_min_remaining_seconds",
            "tokenvend_http_requests_total",
            "tokenvend_refresher_lag_seconds",
        } <= used
        exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
        assert any('status=~"5.."' in e for e in exprs.values())
        assert any(re.search(r"tokenvend_circuit_state\)?\s*==\s*2", e) for e in exprs.values())

    def test_every_alert_has_a_promtool_unit_test(self) -> None:
        (doc,) = load_yaml(ALERT_TESTS)
        assert doc["rule_files"] == [ALERTS.name]
        tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
        assert {rule["alert"] for rule in alert_rules()} <= tested


# -- Grafana ------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def dashboard_expressions(board: dict[str, Any]) -> Iterator[str]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        yield query["query"] if isinstance(query, dict) else str(query or "")


class TestDashboard:
    def test_dashboard_is_well_formed(self) -> None:
        board = dashboard()
        assert board["uid"]
        assert board["title"]
        assert 36 <= board["schemaVersion"] <= 41
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in board["panels"]:
            assert panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]

    def test_panels_do_not_overlap(self) -> None:
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard()["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]

    def test_every_metric_in_a_panel_is_exported(self) -> None:
        used = metric_names_in(dashboard_expressions(dashboard()))
        assert used
        assert used <= exported_names(), f"unknown metrics: {sorted(used - exported_names())}"

    def test_the_required_panels_are_there(self) -> None:
        exprs = list(dashboard_expressions(dashboard()))
        assert any(
            "histogram_quantile" in e and "tokenvend_http_request_duration_seconds_bucket" in e
            for e in exprs
        )
        assert any(
            "histogram_quantile" in e and "tokenvend_upstream_exchange_duration_seconds_bucket" in e
            for e in exprs
        )
        assert {
            "tokenvend_http_requests_total",
            "tokenvend_vends_total",
            "tokenvend_upstream_exchanges_total",
            "tokenvend_circuit_state",
            "tokenvend_cache_fallbacks_total",
            "tokenvend_refresher_lag_seconds",
            "tokenvend_cached_jwt_min_remaining_seconds",
            "tokenvend_audit_pending_events",
        } <= metric_names_in(exprs)


# -- docker-compose.yml -------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE)
    services: dict[str, Any] = doc["services"]
    return services


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def conditions(service: dict[str, Any]) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in service["depends_on"].items()}


REPLICAS = ("tokenvend-1", "tokenvend-2")


class TestCompose:
    def test_the_services_are_there(self) -> None:
        assert {"postgres", "redis", "migrate", *REPLICAS, "lb"} <= set(compose_services())

    def test_redis_keeps_nothing_on_disk(self) -> None:
        argv = as_argv(compose_services()["redis"]["command"])
        pairs = list(itertools.pairwise(argv))
        assert ("--save", "") in pairs
        assert ("--appendonly", "no") in pairs

    def test_every_long_running_service_has_a_healthcheck(self) -> None:
        services = compose_services()
        assert services["migrate"]["restart"] == "no"
        for name, service in services.items():
            if name == "migrate":
                continue
            check = service.get("healthcheck", {})
            assert not check.get("disable"), name
            assert check.get("test"), name
        assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
        assert as_argv(services["redis"]["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]
        for name in REPLICAS:
            assert "/readyz" in " ".join(services[name]["healthcheck"]["test"]), name

    def test_migrate_runs_once_before_the_replicas(self) -> None:
        services = compose_services()
        migrate = services["migrate"]
        assert as_argv(migrate["command"]) == ["db", "upgrade"]
        assert conditions(migrate) == {"postgres": "service_healthy"}
        for name in REPLICAS:
            assert conditions(services[name]) == {
                "postgres": "service_healthy",
                "redis": "service_healthy",
                "migrate": "service_completed_successfully",
            }, name

    def test_replicas_share_one_image_and_postgres_and_redis(self) -> None:
        services = compose_services()
        for name in REPLICAS:
            service = services[name]
            assert service["image"] == services["migrate"]["image"]
            assert service["build"] in (".", {"context": "."})
            argv = as_argv(service["command"])
            assert argv[0] == "serve"
            assert argv[argv.index("--workers") + 1] == "2"
            env = service["environment"]
            assert env["TOKENVEND_DATABASE_URL"].startswith("postgresql+asyncpg://")
            assert "@postgres:5432/" in env["TOKENVEND_DATABASE_URL"]
            assert env["TOKENVEND_REDIS_URL"].startswith("redis://redis:6379")
            assert service["read_only"] is True
            assert "/tmp" in service["tmpfs"]

    def test_no_secret_is_committed_in_the_compose_file(self) -> None:
        services = compose_services()
        required = re.compile(r"\$\{[A-Z_]+:\?[^}]+\}")
        for name in REPLICAS:
            env = services[name]["environment"]
            for var in ("TOKENVEND_ENCRYPTION_KEYS", "TOKENVEND_BOOTSTRAP_ADMIN_KEY"):
                assert required.fullmatch(env[var]), f"{name} {var}"
            assert required.search(env["TOKENVEND_DATABASE_URL"])
        assert required.fullmatch(services["postgres"]["environment"]["POSTGRES_PASSWORD"])

    def test_ci_env_provides_every_required_variable(self) -> None:
        values = json.dumps(load_yaml(COMPOSE))  # not the comments
        required = set(re.findall(r"\$\{([A-Z_]+):\?", values))
        provided = {
            line.split("=", 1)[0]
            for line in CI_ENV.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        assert required
        assert required == provided

    def test_only_the_load_balancer_is_published_and_it_balances_both_replicas(self) -> None:
        services = compose_services()
        published = {name for name, service in services.items() if service.get("ports")}
        assert published == {"lb"}
        lb = services["lb"]
        assert lb["image"].startswith("nginx:")
        assert lb["ports"] == ["8000:8000"]
        assert conditions(lb) == dict.fromkeys(REPLICAS, "service_healthy")
        mounted = {v.split(":")[0] for v in lb["volumes"]}
        (conf,) = [ROOT / m for m in mounted if m.endswith(".conf")]
        text = conf.read_text()
        for name in REPLICAS:
            assert f"server {name}:8000" in text


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage as (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def args_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [args for name, args in stage if name == instruction]


class TestDockerfile:
    def test_multi_stage_on_a_pinned_python_slim(self) -> None:
        stages = dockerfile_stages()
        assert len(stages) >= 2
        for stage in stages:
            (image,) = args_of(stage, "FROM")
            assert re.match(r"python:3\.11-slim\S* ", image + " "), image
        assert "AS builder" in args_of(stages[0], "FROM")[0]

    def test_final_stage_runs_tokenvend_serve_as_non_root(self) -> None:
        final = dockerfile_stages()[-1]
        users = args_of(final, "USER")
        assert users
        assert users[-1].split(":")[0] not in ("root", "0")
        assert json.loads(args_of(final, "ENTRYPOINT")[-1]) == ["tokenvend"]
        assert json.loads(args_of(final, "CMD")[-1])[0] == "serve"
        assert "8000" in args_of(final, "EXPOSE")
        (healthcheck,) = args_of(final, "HEALTHCHECK")
        assert "/healthz" in healthcheck
        env = " ".join(args_of(final, "ENV"))
        assert "PYTHONDONTWRITEBYTECODE=1" in env
        assert "PYTHONUNBUFFERED=1" in env

    def test_final_stage_has_no_build_tools(self) -> None:
        final = dockerfile_stages()[-1]
        runs = " ".join(args_of(final, "RUN"))
        for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
            assert tool not in runs
        assert any("--from=builder /opt/venv" in c for c in args_of(final, "COPY"))

    def test_migrations_sit_beside_the_app_package(self) -> None:
        # app/cli.py finds migrations at Path(app.__file__).parent.parent / "migrations".
        stages = dockerfile_stages()
        destinations = {
            Path(args.split()[-1]).name: Path(args.split()[-1])
            for args in args_of(stages[-1], "COPY")
        }
        assert destinations["app"].parent == destinations["migrations"].parent
        builder = stages[0]
        assert args_of(builder, "WORKDIR")[-1] == str(destinations["app"].parent)
        assert any("--editable ." in run or "-e ." in run for run in args_of(builder, "RUN"))

    def test_build_context_is_an_allow_list(self) -> None:
        patterns = [
            line.strip()
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert patterns[0] == "*"
        allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        assert allowed <= {"app", "migrations", "pyproject.toml", "README.md", "requirements.lock"}
        copied = {
            source.rstrip("/")
            for stage in dockerfile_stages()
            for args in args_of(stage, "COPY")
            if not args.startswith("--from")
            for source in args.split()[:-1]
        }
        assert copied <= allowed


# -- every file parses --------------------------------------------------------------------------

YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), COMPOSE])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)
