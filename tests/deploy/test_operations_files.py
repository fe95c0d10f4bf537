"""The operations files: alert rules (checked and unit-tested with the real `promtool`),
the Grafana provisioning and dashboard, and that every metric they query is one the
engine exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from core.settings import load_settings
from tests.deploy.promql import exported_series_names, metric_names
from tests.deploy.test_deploy_files import promtool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "multimodal-engine.json"
PROMETHEUS_BUILTINS = {"up"}  # series Prometheus makes itself, per target

needs_promtool = pytest.mark.skipif(
    promtool() is None,
    reason="no promtool binary: PyPI has no wheel that ships it; Debian's `prometheus` "
    "package does (apt-get install prometheus; .ci/run installs it), or point PROMTOOL at one",
)


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    assert tool is not None
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return exprs


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus sees it once Grafana filled its variables."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The series names a live engine's registry exports (its collectors included)."""
    import asyncio

    async def build() -> set[str]:
        settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", voice_backend="local",
                                 _env_file=None)
        engine = Engine(settings, "127.0.0.1:9", registry=CollectorRegistry())
        try:
            return exported_series_names(engine.metrics.registry)
        finally:
            await engine.http.aclose()

    return asyncio.run(build())


# --------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("rule", [rule["alert"] for rule in alert_rules()])
def test_each_alert_is_tested_firing_and_silent(rule: str, tmp_path: Path) -> None:
    """An alert that always fires breaks its silent cases; one that never fires breaks
    its firing cases: so the unit tests pin both directions of every alert."""
    for replacement, breaks in (("vector(1)", "silent"), ("vector(1) > 2", "firing")):
        document = yaml.safe_load(RULES.read_text())
        for group in document["groups"]:
            for entry in group["rules"]:
                if entry["alert"] == rule:
                    entry["expr"] = replacement
                    entry.pop("for", None)
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document))
        shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
        result = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
        assert result.returncode != 0, f"{rule} as {replacement!r}: no {breaks} case fails"
        assert rule in result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{index}", "expr": grafana_to_promql(expr)}
        for index, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- metric names


def test_rules_and_dashboard_query_only_exported_metrics(exported: set[str]) -> None:
    queried: dict[str, set[str]] = {}
    for rule in alert_rules():
        queried[f"alert {rule['alert']}"] = metric_names(rule["expr"])
    for expr in dashboard_exprs():
        queried[f"panel {expr}"] = metric_names(grafana_to_promql(expr))
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["definition"]
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable)
    assert match is not None, variable
    queried["variable instance"] = {match.group(1)}
    unknown = {where: names - exported - PROMETHEUS_BUILTINS
               for where, names in queried.items() if names - exported - PROMETHEUS_BUILTINS}
    assert not unknown, f"not exported by the engine: {unknown}"
    # the dashboard shows what the issue asks of it
    everything = set().union(*queried.values())
    for name in ("engine_requests_completed_total", "engine_requests_failed_total",
                 "engine_queue_wait_seconds_bucket", "engine_processing_seconds_bucket",
                 "engine_consumer_lag_records", "engine_gpu_memory_allocated_bytes",
                 "engine_lora_load_seconds_count", "engine_upstream_request_seconds_bucket",
                 "engine_build_info", "engine_image_oom_total",
                 "engine_voice_quota_used_characters"):
        assert name in everything, name


def test_the_name_reader_can_fail(exported: set[str]) -> None:
    """The check above would see a misspelt metric, and does not take labels, functions,
    strings or durations for metrics."""
    expr = ('histogram_quantile(0.95, sum by (kind, le) (rate(engine_queue_wait_second_bucket'
            '{kind="image", instance=~"a|b"}[5m]))) > on(kind) group_left(x) up offset 1m')
    assert metric_names(expr) == {"engine_queue_wait_second_bucket", "up"}
    assert "engine_queue_wait_second_bucket" not in exported
    assert {"engine_queue_wait_seconds_bucket", "engine_requests_completed_total",
            "engine_build_info", "engine_gpu_memory_total_bytes"} <= exported


# --------------------------------------------------------------------------- Grafana


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                             .read_text())["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"]
    uid = sources[0]["uid"]
    assert sources[0]["url"] == "http://prometheus:9090"  # the compose service
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]


def test_compose_provisions_grafana_and_the_alert_rules(tmp_path: Path) -> None:
    from tests.deploy.test_deploy_files import make_project, run_compose

    project = make_project(tmp_path / "project")
    result = run_compose(project, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    services = json.loads(result.stdout)["services"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounts = {v["target"]: v for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert Path(provisioning["source"]) == project / "deploy" / "grafana" / "provisioning"
    assert provisioning["read_only"] is True
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" /
                               "multimodal-engine.yml").read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert Path(dashboards["source"]) == project / "deploy" / "grafana" / "dashboards"
    assert "prometheus" in grafana["depends_on"]

    # Prometheus finds the rules where deploy/prometheus.yml says, inside its container
    prometheus = services["prometheus"]
    binds = {v["target"]: Path(v["source"]) for v in prometheus["volumes"] if v["type"] == "bind"}
    config = PurePosixPath("/etc/prometheus/prometheus.yml")
    document = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert document["rule_files"]
    for entry in document["rule_files"]:
        inside = config.parent / entry
        source = next(binds[target] / inside.relative_to(target) for target in binds
                      if inside.is_relative_to(target) and target != str(config))
        assert source.read_text() == RULES.read_text()
