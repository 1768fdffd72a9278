"""deploy/: files parse, their PromQL names real metrics, Prometheus accepts them and gets data, commands match the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import _parser
from proxy.config import ENVIRONMENT
from proxy.simulator.server import Simulator
from tests.conftest import ROOT, Gateway, free_port
from tests.scenario import SCENARIO_TEAM, run_scenario

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pixazo-proxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\bpixazo_proxy_[a-z0-9_]+\b")
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(path for path in DEPLOY.rglob("*") if path.suffix in (".yml", ".yaml", ".json"))
    assert len(files) == 15  # the PodDisruptionBudget and the SQLite overlay (with its PVC) included
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], path


def test_the_dashboard_has_the_panels_operators_need() -> None:
    titles = [panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
    for wanted in ("Spend by team", "Budget used vs limit", "Cache hit ratio", "Dollars saved", "Jobs in flight",
                   "Job outcomes", "gateway overhead vs upstream", "Upstream errors", "Webhook health"):
        assert any(wanted in title for title in titles), wanted


async def test_every_metric_in_the_dashboard_and_alerts_is_exported(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams=SCENARIO_TEAM, webhook_allow_private=True)
    await run_scenario(gateway, simulator)
    async with gateway.http.get(gateway.url + "/metrics") as response:
        exported = {sample.name for family in text_string_to_metric_families(await response.text())
                    for sample in family.samples}

    used = {name for query in dashboard_queries() + alert_queries() for name in METRIC_NAME.findall(query)}

    assert len(used) >= 15
    assert sorted(used - exported) == []


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus'; .ci/run installs it)")
def test_promtool_accepts_the_config_and_the_rules() -> None:
    config = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    rules = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)

    assert config.returncode == 0, config.stdout + config.stderr
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 11 rules found" in rules.stdout


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)")
async def test_a_real_prometheus_scrapes_the_gateway_and_the_dashboard_queries_return_data(
    start_gateway, simulator: Simulator
) -> None:
    gateway: Gateway = await start_gateway(teams=SCENARIO_TEAM, webhook_allow_private=True)
    await run_scenario(gateway, simulator)
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "prometheus.yml"
        shutil.copy(ALERTS, Path(directory) / "alerts.yml")
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "pixazo-proxy",
                                "static_configs": [{"targets": [gateway.url.removeprefix("http://")]}]}],
        }))
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            async with aiohttp.ClientSession() as http:
                async def query(expr: str) -> list:
                    async with http.get(f"{api}/query", params={"query": expr}) as response:
                        body = await response.json()
                        assert body["status"] == "success", (expr, body)
                        return body["data"]["result"]

                deadline = time.monotonic() + 30
                while True:  # four scrapes, so rate() and increase() have samples to work with
                    try:
                        if len(await query('up{job="pixazo-proxy"}[10s]')) and \
                                len((await query('up{job="pixazo-proxy"}[10s]'))[0]["values"]) >= 4:
                            break
                    except aiohttp.ClientError:
                        pass
                    assert time.monotonic() < deadline, "prometheus did not scrape the gateway"
                    await asyncio.sleep(0.5)
                await gateway.submit()  # traffic between scrapes, for the rate() panels
                await asyncio.sleep(2.5)
                empty = [expr for expr in dashboard_queries() if not await query(expr)]
                up = await query('up{job="pixazo-proxy"}')
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert up[0]["value"][1] == "1"
    assert empty == []


def _cli_accepts(args: list[str]) -> None:
    namespace = _parser().parse_args(args)  # argparse exits (SystemExit) on anything it does not know
    assert callable(namespace.run)


def test_the_commands_in_deploy_match_the_cli() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint == ["pixazo-proxy"]
    _cli_accepts(command)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("teams", "gateway", "simulator"):
        _cli_accepts(compose["services"][name]["command"])
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    _cli_accepts(container["args"])
    unit = (DEPLOY / "systemd" / "pixazo-proxy.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start.group(1).endswith("/pixazo-proxy")
    _cli_accepts(exec_start.group(2).split())
    assert (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]) == (
        "/readyz", "/healthz")
    assert "/healthz" in dockerfile


def test_every_setting_named_in_deploy_is_one_the_gateway_reads() -> None:
    known = {variable for variable, _ in ENVIRONMENT.values()}
    named = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\b((?:PROXY|PIXAZO)_[A-Z_]+)\b", path.read_text()))
    assert named and sorted(named - known) == []


def test_the_policies_configmap_mirrors_policies() -> None:
    configmap = yaml.safe_load((DEPLOY / "k8s" / "policies-configmap.yaml").read_text())
    files = {path.name: path.read_text() for path in (ROOT / "policies").glob("*.toml")}

    assert configmap["data"] == files


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    manifests = {path.name for path in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == manifests


def test_kubernetes_runs_three_replicas_on_postgresql_and_the_sqlite_overlay_one() -> None:
    k8s = DEPLOY / "k8s"
    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    secret = yaml.safe_load((k8s / "secret.yaml").read_text())
    pdb = yaml.safe_load((k8s / "pdb.yaml").read_text())
    overlay = yaml.safe_load((k8s / "overlays" / "sqlite" / "kustomization.yaml").read_text())
    env = {item["name"]: item.get("value") for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert (deployment["spec"]["replicas"], deployment["spec"]["strategy"]["type"]) == (3, "RollingUpdate")
    assert secret["stringData"]["PROXY_DB"].startswith("postgresql://") and "PROXY_DB" not in env
    assert (pdb["kind"], pdb["spec"]["minAvailable"], pdb["spec"]["selector"]) == (
        "PodDisruptionBudget", 2, deployment["spec"]["selector"])
    assert overlay["resources"] == ["../..", "pvc.yaml"]
    patches = "\n".join(patch["patch"] for patch in overlay["patches"])
    assert all(piece in patches for piece in ("/spec/replicas, value: 1", "type: Recreate",
                                              "name: PROXY_DB, value: /data/pixazo-proxy.db", "$patch: delete"))
    assert yaml.safe_load((k8s / "overlays" / "sqlite" / "pvc.yaml").read_text())["metadata"]["name"] == "pixazo-proxy-data"


def test_compose_runs_two_replicas_on_postgresql_behind_one_port() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway = services["gateway"]
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]

    assert gateway["deploy"]["replicas"] == 2 and "ports" not in gateway
    assert gateway["environment"]["PROXY_DB"].startswith("postgresql://") and "@postgres:5432/" in gateway["environment"]["PROXY_DB"]
    assert gateway["environment"]["PIXAZO_UPSTREAM_URL"] == "http://simulator:9000"
    assert services["postgres"]["image"].startswith("postgres:15") and services["proxy"]["ports"] == ["8080:8080"]
    assert "proxy_pass $gateway" in nginx and "set $gateway http://gateway:8080" in nginx
    assert scrape["dns_sd_configs"] == [{"names": ["gateway"], "type": "A", "port": 8080, "refresh_interval": "15s"}]
