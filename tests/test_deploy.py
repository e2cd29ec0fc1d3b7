"""The deployment forms in deploy/, checked offline with the tools their users run.

- deploy/custody.yaml is loaded by Custody's own loader (addons/engine/config.py), as the
  bridges read it and, in the file tree each form mounts, as the gateway reads it: a schema
  change or a secret a form forgets to mount breaks this test, not a user.
- deploy/Containerfile is parsed and its properties asserted (no container runtime here).
- deploy/compose.yaml is validated against the Compose specification's JSON schema
  (tests/data/compose-spec/) and deploy/haproxy.cfg with the real `haproxy -c`.
- deploy/kubernetes/ is rendered with the real `kubectl kustomize` and every object is
  validated against the Kubernetes schemas `kubernetes-validate` ships (strict: unknown
  fields fail).
- deploy/systemd/ is checked with the real `systemd-analyze verify`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncssh
import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from mitmproxy import certs

from addons.engine import config
from examples.samples.postgres import PostgresServer
from examples.samples.processes import free_port, stop_process, wait_listening
from tests.conftest import standard_identity

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG_PATH = "/etc/custody/config/custody.yaml"
"""Where every form mounts deploy/custody.yaml; its relative paths are relative to it."""
CONFDIR = "/etc/custody/ca"
CA_FILES = {"mitmproxy-ca.pem", "mitmproxy-dhparam.pem"}
"""What mitmproxy's CertStore.from_store reads from the confdir (and would write if missing)."""
K8S_VERSION = "1.30.0"
OVERLAYS = ["base", "overlays/production"]


# ----------------------------------------------------------------------------------------
# The configuration, in the tree each form lays out


def lay_out(root: Path, files: dict[str, str | None]) -> Path:
    """Materialize container paths under `root`: deploy/custody.yaml at CONFIG_PATH, the rule
    directory where given (None: the repository's rules/), every other path a placeholder
    file. Returns the configuration's path inside `root`."""
    for target, source in files.items():
        where = root / target.lstrip("/")
        where.parent.mkdir(parents=True, exist_ok=True)
        if target == CONFIG_PATH:
            shutil.copy(DEPLOY / "custody.yaml", where)
        elif source == "rules":
            shutil.copytree(ROOT / "rules", where)
        else:
            where.write_text(f"placeholder for {target}\n")
    return root / CONFIG_PATH.lstrip("/")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_files(service: dict[str, Any]) -> dict[str, str | None]:
    """The container paths a Compose service gets: its configs, secrets and bind mounts."""
    files: dict[str, str | None] = {c["target"]: None for c in service.get("configs", [])}
    files |= {s["target"]: None for s in service.get("secrets", [])}
    for v in service.get("volumes", []):
        if v["source"] == "../rules":
            files[v["target"]] = "rules"
    return files


def k8s_files(objects: list[dict[str, Any]], deployment: str) -> dict[str, str | None]:
    """The container paths the first container of a Deployment gets from its volumes."""
    spec = by_kind_name(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, str | None] = {}
    for mount in spec["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        base = mount["mountPath"]
        if "configMap" in volume:
            cm = by_kind_name(objects, "ConfigMap", volume["configMap"]["name"])
            if base == "/etc/custody/rules":
                files[base] = "rules"
            else:
                files |= {f"{base}/{key}": None for key in cm["data"]}
        sources = [s["secret"] for s in volume.get("projected", {}).get("sources", [])]
        sources += [{"items": volume["secret"]["items"]}] if "secret" in volume else []
        files |= {f"{base}/{item['path']}": None for s in sources for item in s["items"]}
    return files


def test_the_bridges_read_the_configuration_without_its_secrets():
    cfg = config.load(str(DEPLOY / "custody.yaml"), secrets=False)
    assert cfg.store.url == "env:CUSTODY_STORE_URL"
    assert {c.name: c.listen for c in cfg.connections if c.kind in ("postgres", "ssh")} == {
        "prod-db": ("0.0.0.0", 15432), "prod-web": ("0.0.0.0", 2222)}
    assert cfg.approvals.listen == ("0.0.0.0", 9090)
    assert cfg.identity.dev_issuer is None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        text = subprocess.run(
            ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(DEPLOY / "kubernetes" / overlay)],
            check=True, capture_output=True, text=True).stdout
        out[overlay] = [d for d in yaml.safe_load_all(text) if d]
    return out


def gateway_layouts(rendered) -> dict[str, dict[str, str | None]]:
    return {"compose gateway-a": compose_files(compose()["services"]["gateway-a"]),
            "compose gateway-b": compose_files(compose()["services"]["gateway-b"]),
            "kubernetes base": k8s_files(rendered["base"], "custody-gateway"),
            "kubernetes production": k8s_files(rendered["overlays/production"], "custody-gateway")}


@pytest.mark.parametrize("form", ["compose gateway-a", "compose gateway-b", "kubernetes base", "kubernetes production"])
def test_the_gateway_finds_every_secret_its_form_mounts(form, rendered, tmp_path):
    files = gateway_layouts(rendered)[form]
    cfg = config.load(str(lay_out(tmp_path, files)), secrets=True)
    assert cfg.masking.hash_key == b"placeholder for /etc/custody/secrets/masking-hash-key"
    assert {c.name: c.credential.value for c in cfg.connections if c.credential} == {
        "prod-k8s": "Bearer placeholder for /etc/custody/secrets/prod-k8s-token",
        "prod-db": "placeholder for /etc/custody/secrets/prod-db-password",
        "prod-web": "placeholder for /etc/custody/secrets/prod-web-key",
        "tickets": "Bearer placeholder for /etc/custody/secrets/tickets-token"}
    assert "/etc/custody/secrets/store-password" in files  # store.password, read when the store opens
    assert CA_FILES <= {Path(p).name for p in files if p.startswith(CONFDIR + "/")}


@pytest.mark.parametrize("missing, message", [
    ("/etc/custody/secrets/prod-db-password", "connections[1].credential.secret"),
    ("/etc/custody/secrets/prod-k8s-ca.pem", "connections[0].tls.ca_file"),
    ("/etc/custody/secrets/prod-web-known-hosts", "connections[2].known_hosts"),
    ("/etc/custody/secrets/masking-hash-key", "masking.hash_key"),
])
def test_a_secret_a_form_forgot_stops_the_gateway_naming_it(missing, message, rendered, tmp_path):
    files = dict(gateway_layouts(rendered)["kubernetes production"])
    del files[missing]
    with pytest.raises(config.ConfigError) as e:
        config.load(str(lay_out(tmp_path, files)), secrets=True)
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------
# deploy/Containerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile: comments dropped, continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


SECRET_WORDS = re.compile(r"(?i)password|passwd|token|secret|private|credential|\.pem\b|\.key\b|\.custody|_key\b")
ALLOWED_COPIES = {"pyproject.toml", "README.md", "addons", "pg_bridge", "ssh_bridge"}


def containerfile_problems(text: str) -> list[str]:
    """What would make the image unfit: root at run time, a secret baked in, no health check."""
    steps = instructions(text)
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    problems = []
    base = final[0][1].split()[0]
    m = re.search(r"python:3\.(\d+)[.\w-]*-slim", base)
    if not m or int(m.group(1)) < 12:
        problems.append(f"base image {base}: not a slim Python 3.12+")
    users = [args for word, args in final if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root")
    health = [args for word, args in final if word == "HEALTHCHECK"]
    if not health or "/readyz" not in health[-1]:
        problems.append("no HEALTHCHECK against /readyz")
    for word, args in steps:
        if word in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if word == "ADD" or "--from=" not in args and not set(words[:-1]) <= ALLOWED_COPIES:
                problems.append(f"{word} {args}: copies more than the package's sources")
            if SECRET_WORDS.search(args):
                problems.append(f"{word} {args}: copies a secret")
        if word in ("ENV", "ARG") and SECRET_WORDS.search(re.sub(r"=\S*", "", args)):
            problems.append(f"{word} {args}: a secret in the image's environment")
    return problems


def test_the_containerfile_is_fit():
    assert containerfile_problems((DEPLOY / "Containerfile").read_text()) == []


GOOD = (DEPLOY / "Containerfile").read_text()


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace("USER custody:custody", "USER root"), "runs as root"),
    (lambda t: t.replace("USER custody:custody", ""), "runs as root"),
    (lambda t: re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", t), "no HEALTHCHECK against /readyz"),
    (lambda t: t.replace("slim-bookworm AS build", "slim AS build").replace(
        "FROM docker.io/library/python:3.12-slim-bookworm\n", "FROM docker.io/library/python:3.11-slim\n"),
     "base image docker.io/library/python:3.11-slim: not a slim Python 3.12+"),
    (lambda t: t.replace("COPY addons ./addons", "COPY . ."), "COPY . .: copies more than the package's sources"),
    (lambda t: t.replace("COPY addons ./addons", "COPY addons .custody ./"), "COPY addons .custody ./: copies a secret"),
    (lambda t: t.replace("PYTHONUNBUFFERED=1", "STORE_PASSWORD=hunter2"), "a secret in the image's environment"),
    (lambda t: t.replace("WORKDIR /src", "WORKDIR /src\nARG API_TOKEN"), "ARG API_TOKEN: a secret in the image's environment"),
])
def test_the_containerfile_check_finds_each_unfit_image(change, problem):
    changed = change(GOOD)
    assert changed != GOOD
    assert any(problem in p for p in containerfile_problems(changed)), containerfile_problems(changed)


def test_the_image_installs_the_gateway_and_both_bridges_from_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    steps = instructions(GOOD)
    copied = {w.rstrip("/") for word, args in steps if word == "COPY" and "--from=" not in args
              for w in shlex.split(args)[:-1]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} == copied
    assert all((ROOT / c).exists() for c in copied)
    assert any(word == "RUN" and "pip install ." in args for word, args in steps)
    cmd = json.loads(next(args for word, args in steps if word == "CMD"))
    assert cmd[:2] == ["custody", "run"] and cmd[cmd.index("--confdir") + 1] == CONFDIR
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for word, args in steps if word == "ENV")))
    assert env["CUSTODY_CONFIG"] == CONFIG_PATH


# ----------------------------------------------------------------------------------------
# deploy/compose.yaml and deploy/haproxy.cfg

COMPOSE_SCHEMA = json.loads((ROOT / "tests/data/compose-spec/compose-spec.json").read_text())


def compose_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(COMPOSE_SCHEMA, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification():
    assert compose_errors(compose()) == []


@pytest.mark.parametrize("change, where", [
    (lambda d: d["services"]["gateway-a"].update(secretz=["store-password"]), "services/gateway-a"),
    (lambda d: d["services"]["gateway-a"].update(cap_drop="ALL"), "services/gateway-a/cap_drop"),
    (lambda d: d["secrets"]["store-password"].update(path="./x"), "secrets/store-password"),
    (lambda d: d["services"]["haproxy"].update(ports=[{"targett": 80}]), "services/haproxy/ports/0"),
])
def test_the_compose_schema_refuses_a_broken_file(change, where):
    document = copy.deepcopy(compose())
    change(document)
    assert any(e.startswith(where) for e in compose_errors(document)), compose_errors(document)


def test_the_compose_stack_is_two_replicas_on_postgresql_behind_haproxy():
    doc = compose()
    services = doc["services"]
    gateways = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["custody", "run"]}
    assert sorted(gateways) == ["gateway-a", "gateway-b"]
    assert sorted(s["hostname"] for s in gateways.values()) == ["gateway-a", "gateway-b"]  # replicas differ by host
    for s in gateways.values():
        assert s["environment"]["CUSTODY_STORE_URL"].startswith("postgresql://custody@postgres:")
        assert s["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"]
        assert s["command"][s["command"].index("--confdir") + 1] == CONFDIR
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", (DEPLOY / "haproxy.cfg").read_text(), re.MULTILINE)
    assert {(host, port) for _, host, port in servers} == {(g, p) for g in gateways for p in ("8080", "9090")}
    assert sorted(services["haproxy"]["ports"]) == ["8080:8080", "9090:9090"]
    for bridge, module, port in [("pg-bridge", "pg_bridge", 15432), ("ssh-bridge", "ssh_bridge", 2222)]:
        assert services[bridge]["command"] == ["python", "-m", module]
        assert services[bridge]["environment"]["CUSTODY_PROXY"] == "http://haproxy:8080"
        assert services[bridge]["ports"] == [f"{port}:{port}"]
    assert [s["source"] for s in services["ssh-bridge"]["secrets"]] == ["ssh-bridge-host-key"]
    assert "secrets" not in services["pg-bridge"]


def test_compose_secrets_come_from_files_and_nowhere_else():
    doc = compose()
    declared = doc["secrets"]
    assert all(set(s) == {"file"} and s["file"].startswith("./secrets/") for s in declared.values())
    for name, service in doc["services"].items():
        for s in service.get("secrets", []):
            assert (s["source"] if isinstance(s, dict) else s) in declared
        for key, value in service.get("environment", {}).items():
            assert not SECRET_WORDS.search(key) or key.endswith("_FILE"), (name, key)
            assert "@" not in value or ":" not in value.split("@")[0].split("//")[-1], (name, key)  # no password in a URL
    assert (DEPLOY / "secrets/.gitignore").read_text().split() == ["*", "!.gitignore"]


def haproxy_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["haproxy", "-c", "-f", str(path)], check=False, capture_output=True, text=True)


def test_haproxy_accepts_its_configuration():
    result = haproxy_check(DEPLOY / "haproxy.cfg")
    assert result.returncode == 0, result.stderr
    assert "Configuration file is valid" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "[WARNING]" in line]
    # the replicas' names resolve only inside the Compose network (init-addr none lets it start)
    assert warnings and all("could not resolve address 'gateway-" in w for w in warnings), warnings


@pytest.mark.parametrize("old, new", [
    ("option redispatch 1", "option redispach 1"),
    ("balance leastconn", "balance sideways"),
    ("default_backend gateways", "default_backend nowhere"),
])
def test_haproxy_refuses_a_broken_configuration(old, new, tmp_path):
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert old in text
    (tmp_path / "haproxy.cfg").write_text(text.replace(old, new))
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode != 0 and "[ALERT]" in result.stderr


# ----------------------------------------------------------------------------------------
# deploy/kubernetes/


def by_kind_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and (o["metadata"]["name"] == name or o["metadata"]["name"].startswith(f"{name}-") and kind == "ConfigMap")]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in objects])
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_follows_the_kubernetes_schemas(overlay, rendered):
    for obj in rendered[overlay]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path, value", [
    (("spec", "template", "spec", "securityContext", "runAsNonRoot"), "yes"),
    (("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "pathh"), "/readyz"),
    (("spec", "replicas"), "two"),
])
def test_the_kubernetes_schemas_refuse_a_broken_deployment(path, value, rendered):
    obj = copy.deepcopy(by_kind_name(rendered["base"], "Deployment", "custody-gateway"))
    where = obj
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def dig(obj: Any, path: str) -> Any:
    for key in path.split("."):
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj


GATEWAY = ("Deployment", "custody-gateway")
POD = "spec.template.spec"
C0 = f"{POD}.containers.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("obj, path, expected", [
    (GATEWAY, f"{POD}.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.topologyKey",
     "kubernetes.io/hostname"),
    (GATEWAY, f"{POD}.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.labelSelector.matchLabels",
     {"app.kubernetes.io/name": "custody", "app.kubernetes.io/component": "gateway"}),
    (GATEWAY, f"{POD}.securityContext.runAsNonRoot", True),
    (GATEWAY, f"{POD}.securityContext.seccompProfile.type", "RuntimeDefault"),
    (GATEWAY, f"{POD}.automountServiceAccountToken", False),
    (GATEWAY, f"{C0}.securityContext.readOnlyRootFilesystem", True),
    (GATEWAY, f"{C0}.securityContext.allowPrivilegeEscalation", False),
    (GATEWAY, f"{C0}.securityContext.capabilities.drop", ["ALL"]),
    (GATEWAY, f"{C0}.readinessProbe.httpGet", {"path": "/readyz", "port": "approvals"}),
    (GATEWAY, f"{C0}.livenessProbe.httpGet", {"path": "/healthz", "port": "approvals"}),
    (GATEWAY, f"{C0}.command", ["custody", "run", "--listen-port", "8080", "--confdir", CONFDIR]),
    (GATEWAY, f"{C0}.ports", [{"name": "proxy", "containerPort": 8080}, {"name": "approvals", "containerPort": 9090}]),
    (("Deployment", "custody-pg-bridge"), f"{C0}.command", ["python", "-m", "pg_bridge", "--proxy", "http://custody-proxy:8080"]),
    (("Deployment", "custody-ssh-bridge"), f"{C0}.command", ["python", "-m", "ssh_bridge", "--proxy", "http://custody-proxy:8080"]),
    (("Deployment", "custody-pg-bridge"), f"{C0}.securityContext.readOnlyRootFilesystem", True),
    (("Deployment", "custody-ssh-bridge"), f"{C0}.securityContext.capabilities.drop", ["ALL"]),
    (("Deployment", "custody-ssh-bridge"), f"{POD}.volumes.1.secret.secretName", "custody-ssh-host-key"),
    (("Service", "custody-proxy"), "spec.ports.0.targetPort", "proxy"),
    (("Service", "custody-approvals"), "spec.ports.0.targetPort", "approvals"),
    (("Service", "custody-pg-bridge"), "spec.ports.0.targetPort", "postgres"),
    (("Service", "custody-ssh-bridge"), "spec.ports.0.targetPort", "ssh"),
    (("PodDisruptionBudget", "custody-gateway"), "spec.maxUnavailable", 1),
    (("PodDisruptionBudget", "custody-gateway"), "spec.selector.matchLabels",
     {"app.kubernetes.io/name": "custody", "app.kubernetes.io/component": "gateway"}),
    (("NetworkPolicy", "custody-gateway"), "spec.policyTypes", ["Ingress"]),
    (("NetworkPolicy", "custody-gateway"), "spec.ingress.0.from.0",
     {"namespaceSelector": {"matchLabels": {"custody/agents": "true"}},
      "podSelector": {"matchLabels": {"custody/agent": "true"}}}),
    (("NetworkPolicy", "custody-gateway"), "spec.ingress.0.ports", [{"port": "proxy", "protocol": "TCP"}]),
    (("NetworkPolicy", "custody-bridges"), "spec.ingress.0.from.0",
     {"namespaceSelector": {"matchLabels": {"custody/agents": "true"}},
      "podSelector": {"matchLabels": {"custody/agent": "true"}}}),
])
def test_the_kubernetes_objects_have_the_properties_a_production_gateway_needs(overlay, obj, path, expected, rendered):
    assert dig(by_kind_name(rendered[overlay], *obj), path) == expected


@pytest.mark.parametrize("overlay, replicas, image, namespace", [
    ("base", 2, "custody:0.1.0", None),
    ("overlays/production", 3, "registry.example.com/custody:0.1.0", "custody"),
])
def test_the_overlay_changes_what_differs_per_environment(overlay, replicas, image, namespace, rendered):
    objects = rendered[overlay]
    gateway = by_kind_name(objects, *GATEWAY)
    assert gateway["spec"]["replicas"] == replicas
    assert {c["image"] for o in objects if o["kind"] == "Deployment" for c in dig(o, POD)["containers"]} == {image}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace}


def test_every_pod_writes_only_to_emptydirs(rendered):
    for deployment in [o for o in rendered["overlays/production"] if o["kind"] == "Deployment"]:
        pod = dig(deployment, POD)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in pod["containers"][0]["volumeMounts"]:
            assert mount.get("readOnly") is True or "emptyDir" in volumes[mount["name"]], (deployment["metadata"]["name"], mount)
        assert "/tmp" in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}


def test_the_gateway_and_only_the_gateway_gets_backend_credentials(rendered):
    secrets = {}
    for deployment in [o for o in rendered["overlays/production"] if o["kind"] == "Deployment"]:
        volumes = dig(deployment, POD)["volumes"]
        names = {v["secret"]["secretName"] for v in volumes if "secret" in v}
        names |= {s["secret"]["name"] for v in volumes for s in v.get("projected", {}).get("sources", [])}
        secrets[deployment["metadata"]["name"]] = names
    assert secrets == {"custody-gateway": {"custody-backend", "custody-ssh-host-key", "custody-ca"},
                       "custody-pg-bridge": set(), "custody-ssh-bridge": {"custody-ssh-host-key"}}


def test_the_configmaps_hold_the_repositorys_configuration_and_every_rule_file(rendered):
    objects = rendered["overlays/production"]
    assert by_kind_name(objects, "ConfigMap", "custody-config")["data"] == {
        "custody.yaml": (DEPLOY / "custody.yaml").read_text()}
    assert by_kind_name(objects, "ConfigMap", "custody-rules")["data"] == {
        p.name: p.read_text() for p in (ROOT / "rules").glob("*.yaml")}
    url = by_kind_name(objects, "ConfigMap", "custody-store")["data"]["CUSTODY_STORE_URL"]
    assert url.startswith("postgresql://custody@") and config._store({"url": url}, ROOT, "x").url == url


# ----------------------------------------------------------------------------------------
# deploy/systemd/

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def verify_units(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` in a root that has the installed layout's executables and
    this machine's own system units (sysinit.target and the rest a service depends on)."""
    root = tmp_path / "root"
    for exe in ("custody", "python"):
        path = root / "opt/custody/bin" / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units_dir = root / "etc/systemd/system"
    units_dir.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, units_dir)
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *[u.name for u in units]],
                          cwd=units_dir, check=False, capture_output=True, text=True)


def test_systemd_accepts_the_units(tmp_path):
    result = verify_units(UNITS, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("old, new, said", [
    ("NoNewPrivileges=yes", "NoNewPrivilegs=yes", "Unknown key 'NoNewPrivilegs'"),
    ("ProtectSystem=strict", "ProtectSystem=very", "Failed to parse protect system value"),
    ("ExecStart=/opt/custody/bin/custody", "ExecStart=/opt/custody/bin/custodyd", "is not executable"),
])
def test_systemd_refuses_a_broken_unit(old, new, said, tmp_path):
    broken = tmp_path / "custody-gateway.service"
    text = (DEPLOY / "systemd/custody-gateway.service").read_text()
    assert old in text
    broken.write_text(text.replace(old, new))
    result = verify_units([broken], tmp_path)
    assert said in result.stdout + result.stderr


def directives(unit: Path) -> dict[str, list[str]]:
    """A unit's [Service] directives, each with every value it was given (systemd's own
    reading: repeated keys add up)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


HARDENING = {"NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
             "PrivateDevices": ["yes"], "CapabilityBoundingSet": [""], "AmbientCapabilities": [""],
             "RestrictSUIDSGID": ["yes"], "RestrictNamespaces": ["yes"], "User": ["custody"],
             "Restart": ["on-failure"], "UMask": ["0077"], "SystemCallFilter": ["@system-service", "~@privileged @resources"]}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
@pytest.mark.parametrize("key", sorted(HARDENING))
def test_every_unit_is_hardened(unit, key):
    assert directives(unit)[key] == HARDENING[key]


@pytest.mark.parametrize("unit, start, secrets", [
    ("custody-gateway.service", f"/opt/custody/bin/custody run --listen-port 8080 --confdir {CONFDIR}",
     {"EnvironmentFile": ["/etc/custody/custody.env"], "ReadWritePaths": ["/var/lib/custody"]}),
    ("custody-pg-bridge.service", "/opt/custody/bin/python -m pg_bridge",
     {"TemporaryFileSystem": [f"/etc/custody/secrets:ro {CONFDIR}:ro"]}),
    ("custody-ssh-bridge.service", "/opt/custody/bin/python -m ssh_bridge",
     {"TemporaryFileSystem": [f"/etc/custody/secrets:ro {CONFDIR}:ro"],
      "BindReadOnlyPaths": ["/etc/custody/secrets/ssh-bridge-host-key"]}),
])
def test_each_unit_starts_its_process_and_sees_only_its_secrets(unit, start, secrets):
    d = directives(DEPLOY / "systemd" / unit)
    assert d["ExecStart"] == [start]
    assert f"CUSTODY_CONFIG={CONFIG_PATH}" in d["Environment"][0].split()
    assert {k: d[k] for k in secrets} == secrets
    if unit != "custody-gateway.service":
        assert "CUSTODY_PROXY=http://127.0.0.1:8080" in d["Environment"][0].split()
        assert "EnvironmentFile" not in d  # the store's address is the gateway's business only


# ----------------------------------------------------------------------------------------
# The configuration and probes, run: a real gateway on a real PostgreSQL store


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def readiness(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reply = requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return reply.status_code, reply.json()


def until(what, expected, timeout: float = 60):
    """Poll `what()` until it returns `expected`; its last answer either way."""
    deadline = time.monotonic() + timeout
    while (got := what()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_the_deployed_gateway_is_ready_on_its_store_and_says_so_to_each_probe(rendered, jwks, tmp_path):
    """The production overlay's gateway container, run as its Deployment says with its mounts
    laid out, on a real PostgreSQL: the Kubernetes probes and the image's HEALTHCHECK say
    ready, say unready (without failing liveness) while the store is down, and ready again
    when it is back; nothing is written under /etc/custody (the read-only filesystem)."""
    root = tmp_path / "root"
    files = k8s_files(rendered["overlays/production"], "custody-gateway")
    config_file = lay_out(root, files)
    password = "store-pw-5b1e"
    secrets = root / "etc/custody/secrets"
    (secrets / "store-password").write_text(password + "\n")
    for key in ("prod-web-key", "ssh-bridge-host-key"):
        (secrets / key).write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    made = tmp_path / "made-ca"
    certs.CertStore.create_store(made, "mitmproxy", 2048)
    for name in CA_FILES:
        shutil.copy(made / name, root / CONFDIR.lstrip("/") / name)
    approvals = free_port()
    document = yaml.safe_load((DEPLOY / "custody.yaml").read_text())
    document["identity"] = standard_identity(jwks)  # the test's issuer instead of login.example.com
    document["approvals"]["listen"] = f"127.0.0.1:{approvals}"
    config_file.write_text(yaml.safe_dump(document))
    before = tree(root / "etc/custody")

    pg = PostgresServer(password, superuser="custody", log_statements=False)
    try:
        pg.execute("CREATE DATABASE custody")
        container = dig(by_kind_name(rendered["overlays/production"], *GATEWAY), C0)
        command = [a.replace(CONFDIR, str(root / CONFDIR.lstrip("/"))) for a in container["command"]]
        proxy = free_port()
        command[command.index("--listen-port") + 1] = str(proxy)
        command[0] = str(Path(sys.executable).parent / command[0])
        env = {**os.environ, "CUSTODY_CONFIG": str(config_file), "XDG_CACHE_HOME": str(tmp_path / "cache"),
               "CUSTODY_STORE_URL": f"postgresql://custody@127.0.0.1:{pg.port}/custody"}
        with open(tmp_path / "gateway.log", "wb") as log:
            proc = subprocess.Popen([*command, "--listen-host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=tmp_path)
        gateway_log = (tmp_path / "gateway.log").read_text
        try:
            wait_listening(approvals, proc, "gateway", gateway_log, timeout=60)
            health = next(args for word, args in instructions(GOOD) if word == "HEALTHCHECK")
            healthcheck = json.loads(health.split(" CMD ", 1)[1])
            healthcheck = [sys.executable, *(a.replace("127.0.0.1:8080", f"127.0.0.1:{proxy}") for a in healthcheck[1:])]

            def probes() -> tuple:
                ready, body = readiness(approvals, container["readinessProbe"]["httpGet"]["path"])
                alive, _ = readiness(approvals, container["livenessProbe"]["httpGet"]["path"])
                image = subprocess.run(healthcheck, check=False, capture_output=True, timeout=30).returncode
                return ready, body["status"], alive, image

            assert until(probes, (200, "ready", 200, 0)) == (200, "ready", 200, 0), gateway_log()
            pg.halt()
            assert until(probes, (503, "unready", 200, 1)) == (503, "unready", 200, 1), gateway_log()
            pg.start()
            assert until(probes, (200, "ready", 200, 0)) == (200, "ready", 200, 0), gateway_log()
            assert proc.poll() is None
        finally:
            stop_process(proc)
    finally:
        pg.stop()
    assert tree(root / "etc/custody") == before


@pytest.mark.parametrize("form, module", [
    ("kubernetes custody-pg-bridge", "pg_bridge"),
    ("kubernetes custody-ssh-bridge", "ssh_bridge"),
    ("compose pg-bridge", "pg_bridge"),
    ("compose ssh-bridge", "ssh_bridge"),
])
def test_each_bridge_starts_with_only_what_its_form_mounts(form, module, rendered, tmp_path):
    """A bridge gets the configuration (and the ssh bridge its host key), no backend
    credential: it starts on that alone, and writes nothing under /etc/custody."""
    kind, name = form.split(" ")
    if kind == "kubernetes":
        files = k8s_files(rendered["overlays/production"], name)
    else:
        files = compose_files(compose()["services"][name])
    assert not {Path(p).name for p in files} & {"store-password", "prod-db-password", "prod-web-key", "mitmproxy-ca.pem"}
    root = tmp_path / "root"
    config_file = lay_out(root, files)
    if module == "ssh_bridge":
        (root / "etc/custody/secrets/ssh-bridge-host-key").write_bytes(
            asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    document = yaml.safe_load(config_file.read_text())
    port = free_port()
    for c in document["connections"]:
        if "listen" in c:
            c["listen"] = f"127.0.0.1:{port}"  # the test's own port, not 0.0.0.0:15432/2222
    config_file.write_text(yaml.safe_dump(document))
    before = tree(root / "etc/custody")
    env = {**os.environ, "CUSTODY_CONFIG": str(config_file), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", module, "--proxy", "http://127.0.0.1:9"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = next((line for line in proc.stdout if line.startswith(f"{module}:")), "exited without a word")
    finally:
        stop_process(proc)
    assert line.startswith(f"{module}: {'prod-db' if module == 'pg_bridge' else 'prod-web'} on 127.0.0.1:{port}"), line
    assert tree(root / "etc/custody") == before


def seconds(text: str) -> float:
    return config.parse_duration(text)


def test_every_form_gives_a_stopping_replica_the_time_it_needs(rendered):
    """A stopping replica fails /readyz and keeps accepting for gateway.drain_delay, then
    finishes what is in flight within gateway.grace: each balancer must notice within the
    drain delay, and each form must wait for both before it kills the process."""
    cfg = config.load(str(DEPLOY / "custody.yaml"), secrets=False).replica
    probe = dig(by_kind_name(rendered["overlays/production"], *GATEWAY), C0)["readinessProbe"]
    haproxy = re.search(r"default-server inter (\S+) fall (\d+)", (DEPLOY / "haproxy.cfg").read_text())
    noticed = {"kubernetes readiness probe": probe["periodSeconds"] * probe["failureThreshold"],
               "haproxy health check": seconds(haproxy.group(1)) * int(haproxy.group(2))}
    assert all(t <= cfg.drain_delay for t in noticed.values()), (noticed, cfg.drain_delay)
    waits = {"kubernetes": dig(by_kind_name(rendered["overlays/production"], *GATEWAY), POD)["terminationGracePeriodSeconds"],
             "compose": seconds(compose()["services"]["gateway-a"]["stop_grace_period"]),
             "systemd": seconds(directives(DEPLOY / "systemd/custody-gateway.service")["TimeoutStopSec"][0])}
    assert all(t > cfg.drain_delay + cfg.grace for t in waits.values()), (waits, cfg)
