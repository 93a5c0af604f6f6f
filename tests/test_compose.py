"""docker-compose.yml, the Dockerfile and Prometheus's config, checked without Docker.

Docker cannot run in the test environment, so these tests check what can
be checked from outside: every command the stack runs exists, the
services find each other by the names the settings use, the Dockerfile's
health check really probes a server, and Prometheus accepts its config.
"""

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import environ
import pytest
import yaml
from django.core.management import get_commands
from django.urls import resolve

from tests.helpers import ROOT, Server, free_port, migrated_sqlite
from tests.services import require_binary
from transport.worker import WORKER_CHANNEL

APP_SERVICES = {"migrate", "app1", "app2", "worker"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    return data


def test_the_stack_has_two_servers_a_worker_redis_postgres_and_prometheus(compose):
    services = compose["services"]

    assert set(services) == APP_SERVICES | {"redis", "postgres", "prometheus"}
    commands = {name: services[name]["command"] for name in APP_SERVICES}
    assert commands == {
        "migrate": ["python", "manage.py", "migrate", "--noinput"],
        "app1": ["python", "manage.py", "serve"],
        "app2": ["python", "manage.py", "serve"],
        "worker": ["python", "manage.py", "runworker", WORKER_CHANNEL],
    }


def test_every_app_service_runs_a_real_management_command_of_this_image(compose):
    commands = get_commands()

    for name in APP_SERVICES:
        service = compose["services"][name]
        assert service["build"] == "."
        command = service["command"][2]
        assert command in commands, f"{name} runs unknown command {command!r}"
    # The worker must be the project's runworker, which outlives a Redis restart.
    assert commands["runworker"] == "transport"


def test_app_services_reach_postgres_and_redis_by_their_service_names(compose):
    services = compose["services"]
    postgres_env = services["postgres"]["environment"]

    for name in APP_SERVICES:
        env = services[name]["environment"]
        database = environ.Env.db_url_config(env["DATABASE_URL"])
        assert database["ENGINE"] == "django.db.backends.postgresql"
        assert database["HOST"] in services
        assert (database["USER"], database["PASSWORD"], database["NAME"]) == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
        # Servers start only once their dependencies answer and migrations ran.
        depends = services[name]["depends_on"]
        assert depends["postgres"] == {"condition": "service_healthy"}
        if name != "migrate":
            assert depends["redis"] == {"condition": "service_healthy"}
            assert depends["migrate"] == {"condition": "service_completed_successfully"}


def test_prometheus_scrapes_each_server_at_a_host_its_settings_allow(compose, prometheus_config):
    services = compose["services"]
    [job] = prometheus_config["scrape_configs"]
    prometheus_address = services["prometheus"]["networks"]["default"]["ipv4_address"]
    [pool] = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    assert ipaddress.ip_address(prometheus_address) in subnet
    targets = [t for group in job["static_configs"] for t in group["targets"]]

    assert resolve(job["metrics_path"]).url_name == "metrics"
    assert sorted(targets) == ["app1:8000", "app2:8000"]
    for target in targets:
        host, port = target.split(":")
        assert host in services and services[host]["command"][2] == "serve"
        assert port == _dockerfile_env()["PORT"]
        allowed = services[host]["environment"]["DJANGO_ALLOWED_HOSTS"].split(",")
        assert host in allowed
        # /metrics answers Prometheus's address, and not the whole subnet.
        networks = services[host]["environment"]["METRICS_ALLOWED_NETWORKS"].split(",")
        address = ipaddress.ip_address(prometheus_address)
        assert any(address in ipaddress.ip_network(n) for n in networks)
        assert not any(
            subnet.subnet_of(network)  # type: ignore[arg-type]
            for network in map(ipaddress.ip_network, networks)
            if network.version == subnet.version
        )


def test_every_file_prometheus_mounts_exists_and_the_rules_are_loaded(compose, prometheus_config):
    mounts = dict(
        volume.removesuffix(":ro").split(":")
        for volume in compose["services"]["prometheus"]["volumes"]
    )

    for source in mounts:
        assert (ROOT / source).is_file(), source
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    [rules] = prometheus_config["rule_files"]
    assert mounts["./telemetry/prometheus/rules.yml"] == rules


def test_promtool_accepts_the_prometheus_config_with_its_rules(prometheus_config, tmp_path):
    promtool = require_binary("promtool", "prometheus")
    # The same config, with the rules at the path they have on this host.
    local = {**prometheus_config, "rule_files": [str(ROOT / "telemetry/prometheus/rules.yml")]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))

    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def _healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    command: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return command


def test_the_dockerfile_runs_as_a_non_root_user():
    users = re.findall(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)

    assert users and users[-1] not in ("root", "0")


@pytest.mark.process
def test_the_dockerfile_health_check_passes_on_a_live_server_and_fails_on_none(tmp_path: Path):
    command = _healthcheck_command()
    assert command[0] == "python"
    server = Server(migrated_sqlite(tmp_path / "db.sqlite3")).start()
    try:
        alive = subprocess.run(
            [sys.executable, *command[1:]], env={"PORT": str(server.port)}, timeout=30
        )
    finally:
        server.kill()
    dead = subprocess.run(
        [sys.executable, *command[1:]],
        env={"PORT": str(free_port())},
        capture_output=True,
        timeout=30,
    )

    assert alive.returncode == 0
    assert dead.returncode != 0
