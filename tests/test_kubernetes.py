"""Kubernetes through the gateway: the real kubectl, the real gateway, the shipped sample
rules (rules/kubernetes.yaml), and a Kubernetes API test server (examples/samples/kubeapi.py)."""

from __future__ import annotations

import base64
import http.client
import json
import queue
import ssl
import stat
import subprocess
import threading
import time

import pytest
import yaml

from examples.samples.kubeapi import KubeAPI
from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.kubectl import Kubectl, clean_env
from tests.support.servers import free_port

SA_TOKEN = "cluster-sa-token-5d1e9"
DB_PASSWORD = "s3cr3t-db-passw0rd"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
CI_VIEWER = "system:serviceaccount:team-a:viewer"
VAULT_KEY = "vault-master-key-6f1c"
LAUNCH_CODE = "team-b-launch-0451"
VAULT_REASON = "The vault namespace is off limits to agents."

TEST_RULES = {"rules": [
    {"id": "ci-views-as-team-viewer", "match": {
        "connection": "prod-k8s", "principal": {"groups": ["ci"]}, "action": "admin",
        "kubernetes": {"verbs": ["get", "list"], "impersonate": {"users": CI_VIEWER, "groups": "system:authenticated"}}},
     "effect": "allow", "masks": ["kubernetes-secrets"]},
    {"id": "cert-cluster-read", "match": {"connection": "cert-k8s", "principal": {"groups": ["k8s-readers"]},
                                          "action": "read"},
     "effect": "allow", "masks": ["kubernetes-secrets"]},
    # namespace-scoped rules, which requests across every namespace reach too
    {"id": "vault-off-limits", "match": {"connection": "prod-k8s", "kubernetes": {"namespaces": "vault"}},
     "effect": "deny", "reason": VAULT_REASON},
    {"id": "dev-reads-dev", "match": {"connection": "cert-k8s", "principal": {"groups": ["dev-readers"]},
                                      "action": "read", "kubernetes": {"namespaces": "dev"}},
     "effect": "allow", "masks": ["kubernetes-secrets"]},
    {"id": "cert-team-b-configmaps-masked", "match": {
        "connection": "cert-k8s", "principal": {"groups": ["k8s-readers"]}, "action": "read",
        "kubernetes": {"namespaces": "team-b"}},
     "effect": "allow", "masks": [{"objects": {"kind": "ConfigMap", "fields": ["data"]}}]},
]}


@pytest.fixture(scope="module")
def kube(ca):
    server = KubeAPI(ca.issue("localhost"), SA_TOKEN, client_ca=ca.cert_file)
    server.put("pods", {"metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "app", "image": "nginx",
                                                 "env": [{"name": "DB_PASSWORD", "value": DB_PASSWORD}]}]}})
    server.put("secrets", {"metadata": {"name": "db", "namespace": "default"}, "stringData": {"password": DB_PASSWORD}})
    applied = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "applied", "namespace": "default"},
               "data": {"token": base64.b64encode(DB_PASSWORD.encode()).decode()}}
    server.put("secrets", {**applied, "metadata": {**applied["metadata"], "annotations": {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied)}}})
    server.put("configmaps", {"metadata": {"name": "keep", "namespace": "default"}, "data": {"mode": "fast"}})
    server.log("default", "web-1", "started", f"using key {AWS_KEY}")
    for namespace in ("vault", "team-b", "dev"):
        server.put("namespaces", {"metadata": {"name": namespace}})
    server.put("secrets", {"metadata": {"name": "master", "namespace": "vault"}, "stringData": {"key": VAULT_KEY}})
    server.put("configmaps", {"metadata": {"name": "unseal", "namespace": "vault"}, "data": {"key": VAULT_KEY}})
    server.put("pods", {"metadata": {"name": "vault-0", "namespace": "vault"}})
    server.put("deployments", {"metadata": {"name": "vault", "namespace": "vault"}})
    server.put("configmaps", {"metadata": {"name": "launch", "namespace": "team-b", "labels": {"tier": "secret"}},
                              "data": {"code": LAUNCH_CODE}})
    server.put("configmaps", {"metadata": {"name": "dev-settings", "namespace": "dev"}, "data": {"mode": "dev"}})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, kube, ca):
    directory = tmp_path_factory.mktemp("k8s-gateway")
    client_cert = ca.issue_client("custody-gateway")
    approvals, direct = free_port(), free_port()
    gateway = Gateway(
        directory,
        connections=[
            {"name": "prod-k8s", "kind": "kubernetes", "hosts": ["kube.test"], "upstream": kube.url,
             "tls": {"ca_file": str(ca.cert_file)}, "credential": {"type": "bearer", "secret": "env:KUBE_SA_TOKEN"},
             "listen": f"127.0.0.1:{direct}"},
            # the same API server under another name: upstream TLS settings are chosen by address
            {"name": "cert-k8s", "kind": "kubernetes", "hosts": ["cert.kube.test"],
             "upstream": kube.url.replace("127.0.0.1", "localhost"),
             "tls": {"ca_file": str(ca.cert_file), "client_cert": str(client_cert)}},
        ],
        rules={"kubernetes.yaml": (ROOT / "rules" / "kubernetes.yaml").read_text(), "test.yaml": TEST_RULES},
        identity=standard_identity(servers.jwks),
        env={"KUBE_SA_TOKEN": SA_TOKEN},
    )
    gateway.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    gateway.config_file.write_text(yaml.safe_dump(gateway.config))
    gateway.approvals_url = f"http://127.0.0.1:{approvals}"
    gateway.start()
    wait_for(lambda: listening(gateway.approvals_url) and listening(f"https://127.0.0.1:{direct}"))
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def agents(gw, keys, jwks, tmp_path_factory):
    """kubectl for each kind of agent, plus tokens for approvers."""
    base = tmp_path_factory.mktemp("agents")

    def token(sub: str, groups: list[str]) -> str:
        return keys["rsa"].token(jwks.issuer, sub=sub, groups=groups, ttl=3600)

    return {
        "reader": Kubectl(gw, base / "reader", token("crew-reader", ["k8s-readers"])),
        "operator": Kubectl(gw, base / "operator", token("crew-operator", ["k8s-operators"])),
        "ci": Kubectl(gw, base / "ci", token("ci-bot", ["ci"])),
        "stranger": Kubectl(gw, base / "stranger", token("nobody", [])),
        "forged": Kubectl(gw, base / "forged", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
        "expired": Kubectl(gw, base / "expired", keys["rsa"].token(jwks.issuer, sub="crew-reader",
                                                                   groups=["k8s-readers"], ttl=-60)),
        "direct": Kubectl(gw, base / "direct", token("crew-reader", ["k8s-readers"]), direct=True),
        "cert": Kubectl(gw, base / "cert", token("crew-reader", ["k8s-readers"]), connection="cert-k8s"),
        "sre": Approver(gw.approvals_url, token("sre-1", ["sre"])),
        "reader_token": token("crew-reader", ["k8s-readers"]),
        "operator_token": token("crew-operator", ["k8s-operators"]),
        "dev_token": token("crew-dev", ["dev-readers"]),
    }


class Lines:
    """A running kubectl's output, line by line, as it arrives."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self.q = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, fragment: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if fragment in line:
                return line
        raise AssertionError(f"{fragment!r} not printed; got {self.lines}\nstderr: {self.stop()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.communicate(timeout=10)[1]
        except (ValueError, subprocess.TimeoutExpired):
            return ""


def reached(kube: KubeAPI, method: str, fragment: str) -> list:
    return [r for r in kube.reached(fragment) if r.method == method]


def store_bytes(gw: Gateway) -> str:
    """Everything the audit store holds on disk (the database and its write-ahead log)."""
    files = [gw.db, gw.db.with_name("audit.db-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists()).decode("latin-1")


def secret_free(text: str) -> bool:
    encoded = base64.b64encode(DB_PASSWORD.encode()).decode()
    return DB_PASSWORD not in text and encoded not in text


# kubeconfig


def test_kubeconfig_names_the_proxy_and_the_gateway_ca(agents, gw):
    config = yaml.safe_load(agents["reader"].kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster == {"server": "https://kube.test", "proxy-url": gw.proxy_url(None),
                       "certificate-authority": str(gw.ca.resolve())}
    assert config["users"][0]["user"] == {"tokenFile": str(agents["reader"].token_file.resolve())}
    assert stat.S_IMODE(agents["reader"].kubeconfig.stat().st_mode) == 0o600
    direct = yaml.safe_load(agents["direct"].kubeconfig.read_text())["clusters"][0]["cluster"]
    assert direct["server"].startswith("https://127.0.0.1:") and direct["tls-server-name"] == "kube.test"
    assert "proxy-url" not in direct


@pytest.mark.parametrize(
    "args, message",
    [
        (["--connection", "nope", "--token", "t"], "no connection 'nope'"),
        (["--connection", "prod-k8s"], "give the agent's token (--token) or a file holding it (--token-file)"),
        (["--connection", "prod-k8s", "--token", "t", "--token-file", "f"], "not both"),
        (["--connection", "cert-k8s", "--token", "t", "--direct"], "connection 'cert-k8s' has no listen address"),
        (["--connection", "prod-k8s", "--token", "t", "--ca", "/nonexistent/ca.pem"], "no gateway CA at /nonexistent/ca.pem"),
    ],
)
def test_kubeconfig_errors(gw, args, message):
    done = gw.custody("kubeconfig", *args, *([] if "--ca" in args else ["--ca", str(gw.ca)]))
    assert done.returncode == 1 and message in done.stderr and done.stdout == ""


# reads, masking


def test_get_pods_reaches_the_cluster_with_the_gateway_credential(agents, kube, gw):
    before = len(kube.received)
    done = agents["reader"].run("get", "pods")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[1].split()[:3] == ["web-1", "1/1", "Running"]
    got = kube.received[before:]
    assert got and all(r.headers.get("authorization") == f"Bearer {SA_TOKEN}" for r in got)
    assert not any(agents["reader_token"] in json.dumps(r.headers) for r in got)
    listing = next(r for r in got if r.path.startswith("/api/v1/namespaces/default/pods?"))
    assert "as=Table" in listing.headers["accept"]
    event = gw.wait_events("kind = 'request' AND resource = 'pods' AND connection = 'prod-k8s'")[-1]
    details = json.loads(event["operation"])["details"]
    assert (details["verb"], details["namespace"], details["resource"]) == ("list", "default", "pods")


@pytest.mark.parametrize(
    "args, shown",
    [
        (["get", "secret", "db", "-o", "yaml"], "password: '[REDACTED]'"),
        (["get", "secret", "db", "-o", "json"], '"password": "[REDACTED]"'),
        (["get", "secrets", "-o", "yaml"], "password: '[REDACTED]'"),  # a SecretList: items carry no kind
        (["get", "secret", "db", "-o", "jsonpath={.data.password}"], "[REDACTED]"),
        (["get", "secret", "applied", "-o", "yaml"], '"data":{"token":"[REDACTED]"}'),  # last-applied copy
        (["get", "secrets"], "Opaque   1"),
        (["get", "pod", "web-1", "-o", "yaml"], "value: '[REDACTED]'"),  # container env
    ],
)
def test_secret_values_are_masked(agents, args, shown):
    done = agents["reader"].run(*args)
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout and secret_free(done.stdout)


def test_nothing_secret_reaches_the_audit_store(agents, gw):
    assert agents["reader"].run("get", "secrets", "-o", "yaml").returncode == 0
    gw.wait_events("kind = 'response' AND resource = 'secrets'")
    assert secret_free(store_bytes(gw))


def test_table_rows_with_whole_objects_are_masked(gw, agents, kube):
    r = gw.session(None).get("https://kube.test/api/v1/namespaces/default/secrets?includeObject=Object",
                             headers={"Authorization": f"Bearer {agents['reader_token']}",
                                      "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}, timeout=20)
    assert r.status_code == 200 and r.json()["kind"] == "Table"
    rows = {row["object"]["metadata"]["name"]: row["object"] for row in r.json()["rows"]}
    assert rows["db"]["data"] == {"password": "[REDACTED]"} and secret_free(r.text)


def test_protobuf_is_asked_for_as_json_when_masks_apply(gw, agents, kube):
    before = len(kube.received)
    r = gw.session(None).get("https://kube.test/api/v1/namespaces/default/secrets/db", timeout=20, headers={
        "Authorization": f"Bearer {agents['reader_token']}",
        "Accept": "application/vnd.kubernetes.protobuf, application/json"})
    assert r.status_code == 200 and r.json()["data"] == {"password": "[REDACTED]"}
    assert [x.headers["accept"] for x in kube.received[before:]] == ["application/json"]


def test_discovery_version_and_health_are_reads(agents):
    done = agents["reader"].run("version", "-o", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["serverVersion"]["gitVersion"] == "v1.32.0-custody-test"
    assert agents["reader"].run("get", "--raw", "/healthz").stdout == "ok"


# writes, deletes, dry runs


def test_operator_applies_and_changes_a_configmap(agents, kube, tmp_path):
    manifest = tmp_path / "cm.yaml"
    document = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "fast"}}
    manifest.write_text(yaml.safe_dump(document))
    first = agents["operator"].run("apply", "--validate=false", "-f", str(manifest))
    assert (first.returncode, first.stdout.strip()) == (0, "configmap/settings created"), first.stderr
    manifest.write_text(yaml.safe_dump({**document, "data": {"mode": "slow"}}))
    second = agents["operator"].run("apply", "--validate=false", "-f", str(manifest))
    assert (second.returncode, second.stdout.strip()) == (0, "configmap/settings configured"), second.stderr
    assert kube.get("configmaps", "default", "settings")["data"] == {"mode": "slow"}
    assert reached(kube, "PATCH", "/configmaps/settings")


def test_dry_runs_are_reads(agents, kube, tmp_path):
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rehearsal"}}))
    before = len(kube.received)
    done = agents["reader"].run("apply", "--validate=false", "--dry-run=server", "-f", str(manifest))
    assert (done.returncode, done.stdout.strip()) == (0, "configmap/rehearsal created (server dry run)"), done.stderr
    assert kube.get("configmaps", "default", "rehearsal") is None
    posted = [r for r in kube.received[before:] if r.method == "POST"]
    assert posted and all("dryRun=All" in r.path for r in posted)


@pytest.mark.parametrize(
    "agent, args, message, method, fragment",
    [
        ("reader", ["create", "configmap", "sneaky", "--from-literal=a=b"],
         "error: failed to create configmap: custody: no rule matches this request", "POST", "/configmaps"),
        ("reader", ["delete", "pod", "web-1"], "Error from server (Forbidden): custody: no rule matches this request",
         "DELETE", "/pods/web-1"),
        ("operator", ["delete", "namespace", "kube-system"],
         "Error from server (Forbidden): custody: Agents never delete namespaces.", "DELETE", "/namespaces/kube-system"),
        ("operator", ["delete", "configmap", "keep"], "Error from server (Forbidden): custody: no rule matches this request",
         "DELETE", "/configmaps/keep"),
        ("operator", ["create", "secret", "generic", "planted", "--from-literal=k=v"],
         "error: failed to create secret custody: no rule matches this request", "POST", "/secrets"),
        ("operator", ["create", "configmap", "elsewhere", "-n", "kube-system", "--from-literal=a=b"],
         "error: failed to create configmap: custody: no rule matches this request", "POST", "/kube-system/configmaps"),
        ("stranger", ["get", "pods"], "Error from server (Forbidden): custody: no rule matches this request",
         "GET", "/pods"),
    ],
)
def test_refused_changes_never_reach_the_cluster(agents, kube, agent, args, message, method, fragment):
    before = len(reached(kube, method, fragment))
    done = agents[agent].run(*args)
    assert done.returncode == 1 and message in done.stderr
    assert len(reached(kube, method, fragment)) == before


def test_operator_deletes_a_pod(agents, kube):
    kube.put("pods", {"metadata": {"name": "doomed", "namespace": "default"}})
    done = agents["operator"].run("delete", "pod", "doomed", "--wait=false")
    assert (done.returncode, done.stdout.strip()) == (0, 'pod "doomed" deleted'), done.stderr
    assert kube.get("pods", "default", "doomed") is None


@pytest.mark.parametrize(
    "agent, args, message",
    [
        ("forged", ["get", "pods"], "error: You must be logged in to the server"),
        # kubectl prints Warning headers whatever the path: the agent learns why, not only that
        ("expired", ["get", "pods"], "Warning: custody: token expired"),
        ("forged", ["get", "pods"], "Warning: custody: token has no issuer (iss)"),
    ],
)
def test_bad_tokens_are_refused(agents, kube, agent, args, message):
    before = len(kube.received)
    done = agents[agent].run(*args)
    assert done.returncode == 1 and message in done.stderr
    assert len(kube.received) == before


# impersonation


@pytest.mark.parametrize(
    "agent, flags, allowed",
    [
        ("reader", ["--as", "admin"], False),
        ("reader", ["--as", "admin", "--as-group", "system:masters"], False),
        ("operator", ["--as", CI_VIEWER], False),
        ("ci", ["--as", CI_VIEWER], True),
        ("ci", ["--as", CI_VIEWER, "--as-group", "system:masters"], False),
        ("ci", ["--as", "system:serviceaccount:team-a:admin"], False),
        ("ci", ["--as", CI_VIEWER, "--as-uid", "1"], True),
        ("ci", [], False),  # ci may only look through the viewer's eyes
    ],
)
def test_impersonation_only_as_a_rule_allows_exactly(agents, kube, agent, flags, allowed):
    before = len(kube.received)
    done = agents[agent].run("get", "configmaps", *flags)
    got = [r for r in kube.received[before:] if "/configmaps" in r.path]
    if allowed:
        assert done.returncode == 0 and "keep" in done.stdout, done.stderr
        assert got and all(r.headers["impersonate-user"] == CI_VIEWER for r in got)
    else:
        assert done.returncode == 1 and "Error from server (Forbidden): custody:" in done.stderr
        assert got == []


# encoded-path evasions


@pytest.mark.parametrize(
    "who, method, path, status, error",
    [
        ("operator", "DELETE", "/api/v1/namespaces/kube%2Dsystem", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1/namespaces/kube-system/", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1//namespaces//kube-system", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1/%6eamespaces/kube-system", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1/namespaces%2Fkube-system", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1/namespaces/kube-system?dryRun=", 403, "denied_by_policy"),
        ("operator", "DELETE", "/api/v1/namespaces/default/pods/%2e%2e/%2e%2e/kube-system", 400, "ambiguous_path"),
        ("operator", "DELETE", "/api/v1/namespaces/default/pods/..%2F..%2Fkube-system", 400, "ambiguous_path"),
        ("operator", "DELETE", "/api/v1/namespaces/default/pods/%252e%252e/x", 400, "ambiguous_path"),
        ("reader", "GET", "/api/v1/namespaces/default/pods/web-1/%65xec?command=env&stdout=true", 403, "no_matching_rule"),
        ("reader", "POST", "/api/v1/namespaces/default/pods/web-1/exec/?command=env", 403, "no_matching_rule"),
        # the API server refuses a dryRun list holding anything but "All" (422): no dry run, so no read
        ("reader", "POST", "/api/v1/namespaces/default/pods?dryRun=All&dryRun=", 403, "no_matching_rule"),
        ("reader", "POST", "/api/v1/namespaces/default/pods?dryRun=All&dryRun=All", 200, None),
    ],
)
def test_path_spellings_do_not_dodge_rules(gw, agents, kube, who, method, path, status, error):
    before = len(kube.received)
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rehearsed"}} if method == "POST" else None
    r = gw.session(None).request(method, f"https://kube.test{path}", json=body, timeout=20,
                                 headers={"Authorization": f"Bearer {agents[who + '_token']}"})
    assert r.status_code == (status if status != 200 else 201), r.text
    if error:
        answer = r.json()
        assert (answer["kind"], answer["status"], answer["error"]) == ("Status", "Failure", error)
        assert answer["message"].startswith("custody: ")
        assert kube.received[before:] == []


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/default/secr%65ts/db",
        "/api/v1/namespaces/default/secrets/db/",
        "/api/v1//namespaces/default/secrets/db",
        "/api/v1/namespaces%2Fdefault%2Fsecrets%2Fdb",
    ],
)
def test_secret_spellings_are_masked(gw, agents, path):
    r = gw.session(None).get(f"https://kube.test{path}", timeout=20,
                             headers={"Authorization": f"Bearer {agents['reader_token']}"})
    assert r.status_code in (200, 404) and secret_free(r.text)
    if r.status_code == 200:
        assert r.json()["data"] == {"password": "[REDACTED]"}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/default/secrets?watch=true",
        "/api/v1/namespaces/default/secrets?watch=True",
        "/api/v1/namespaces/default/secrets?watch=1&fieldSelector=metadata.name%3Ddb",
        "/api/v1/watch/namespaces/default/secrets",
        "/api/v1/watch/namespaces/default/secrets/db",
    ],
)
def test_watch_spellings_stream_masked_events(gw, agents, path):
    with gw.session(None).get(f"https://kube.test{path}", stream=True, timeout=20,
                              headers={"Authorization": f"Bearer {agents['reader_token']}"}) as r:
        assert r.status_code == 200
        event = json.loads(next(r.iter_lines()))
    assert event["type"] == "ADDED" and event["object"]["kind"] == "Secret"
    assert all(v == "[REDACTED]" for v in event["object"]["data"].values()) and secret_free(json.dumps(event))


# streams


def test_watch_streams_new_objects_as_they_happen(agents, kube):
    watching = Lines(agents["reader"].start("get", "pods", "-w"))
    try:
        watching.wait_for("web-1")
        kube.put("pods", {"metadata": {"name": "arrives-later", "namespace": "default"}})
        assert watching.wait_for("arrives-later").split()[:3] == ["arrives-later", "1/1", "Running"]
        assert watching.proc.poll() is None  # still watching: streamed, not buffered to the end
    finally:
        watching.stop()


def test_watched_secrets_are_masked_event_by_event(agents, kube):
    watching = Lines(agents["reader"].start("get", "secrets", "-w", "-o", "jsonpath={.data}{\"\\n\"}"))
    try:
        watching.wait_for("REDACTED")
        kube.put("secrets", {"metadata": {"name": "fresh", "namespace": "default"},
                             "stringData": {"api": f"fresh-{DB_PASSWORD}"}})
        line = watching.wait_for('"api"')
        assert line == '{"api":"[REDACTED]"}'
    finally:
        watching.stop()
    assert all(f"fresh-{DB_PASSWORD}" not in line for line in watching.lines)


def test_logs_follow_streams_masked_lines(agents, kube):
    kube.put("pods", {"metadata": {"name": "talker", "namespace": "default"}})
    kube.log("default", "talker", "booting")
    following = Lines(agents["reader"].start("logs", "-f", "talker"))
    try:
        following.wait_for("booting")
        kube.log("default", "talker", f"aws_access_key_id = {AWS_KEY}")
        assert following.wait_for("aws_access_key_id") == "aws_access_key_id = [AWS_ACCESS_KEY_ID]"
        assert following.proc.poll() is None
        kube.end_logs("default", "talker")
        assert following.proc.wait(10) == 0
    finally:
        following.stop()


def test_logs_without_follow_are_masked(agents):
    done = agents["reader"].run("logs", "web-1")
    assert done.returncode == 0 and done.stdout.splitlines() == ["started", "using key [AWS_ACCESS_KEY_ID]"]


# exec


def exec_pending(agents, command: str) -> dict:
    return wait_for(lambda: next((a for a in agents["sre"].list() if a["operation"]["details"].get("command")
                                  and " ".join(a["operation"]["details"]["command"]) == command), None))


def test_exec_waits_for_approval_and_its_output_is_masked(agents, kube, gw):
    running = agents["operator"].start("exec", "web-1", "--", "env")
    approval = exec_pending(agents, "env")
    assert approval["operation"]["summary"] == "exec in pods/web-1 in default on prod-k8s: env"
    assert approval["rules"] == ["k8s-exec-reviewed"]
    assert agents["sre"].vote(approval["id"], "approve", "checking the env").status_code == 200
    out, err = running.communicate(timeout=30)
    assert running.returncode == 0, err
    assert out.splitlines() == ["DATABASE_PASSWORD=[GENERIC_SECRET]", "AWS_SECRET_ACCESS_KEY=[AWS_SECRET_ACCESS_KEY]"]
    assert kube.exec_sessions[-1]["command"] == ["env"] and kube.exec_sessions[-1]["protocol"] == "v5.channel.k8s.io"
    gw.wait_events("kind = 'session_end' AND flow = ?", [approval["flow"]])
    frames = [json.loads(e["detail"]) | {"body": e["body"]} for e in gw.events("kind = 'message' AND flow = ?", [approval["flow"]])]
    stdout = [f for f in frames if f["channel"] == 1 and not f["from_client"]]
    assert stdout and all(f["body"].startswith(b"\x01") for f in stdout)
    assert b"[AWS_SECRET_ACCESS_KEY]" in b"".join(f["body"] for f in stdout)
    assert any(f["channel"] == 3 for f in frames)  # the exit Status
    assert secret_free(store_bytes(gw)) and kube.env["AWS_SECRET_ACCESS_KEY"] not in store_bytes(gw)


def test_exec_stdin_and_exit_codes_pass_through(agents, kube, gw):
    running = subprocess.Popen(["kubectl", "exec", "-i", "web-1", "--", "cat"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=agents["operator"].env)
    approval = exec_pending(agents, "cat")
    agents["sre"].vote(approval["id"], "approve", "echo test")
    typed = f"typed into the pod\nexport AWS_ACCESS_KEY_ID={AWS_KEY}\n".encode()
    out, err = running.communicate(typed, timeout=30)
    assert running.returncode == 0, err
    assert out == b"typed into the pod\nexport AWS_ACCESS_KEY_ID=[AWS_ACCESS_KEY_ID]\n"  # echoed back, masked
    assert kube.exec_sessions[-1]["stdin"] == typed  # the pod got what was typed
    gw.wait_events("kind = 'session_end' AND flow = ?", [approval["flow"]])
    stdin = [e for e in gw.events("kind = 'message' AND flow = ?", [approval["flow"]])
             if json.loads(e["detail"])["from_client"] and json.loads(e["detail"])["channel"] == 0]
    recorded = b"".join(e["body"][1:] for e in stdin)
    assert recorded == b"typed into the pod\nexport AWS_ACCESS_KEY_ID=[AWS_ACCESS_KEY_ID]\n"
    assert AWS_KEY not in store_bytes(gw)
    failing = agents["operator"].start("exec", "web-1", "--", "sh", "-c", "exit 3")
    agents["sre"].vote(exec_pending(agents, "sh -c exit 3")["id"], "approve", "exit code test")
    _, err = failing.communicate(timeout=30)
    assert failing.returncode == 3 and "command terminated with exit code 3" in err


def test_denied_exec_tells_kubectl_why_and_runs_nothing(agents, kube):
    sessions = len(kube.exec_sessions)
    running = agents["operator"].start("exec", "web-1", "--", "whoami")
    approval = exec_pending(agents, "whoami")
    agents["sre"].vote(approval["id"], "deny", "not during the freeze")
    _, err = running.communicate(timeout=30)
    assert running.returncode == 1
    assert "Error from server (Forbidden): custody: denied by sre-1: not during the freeze" in err
    assert len(kube.exec_sessions) == sessions


def test_exec_without_a_rule_is_refused_with_the_policy_reason(agents, kube):
    sessions, before = len(kube.exec_sessions), len(reached(kube, "POST", "/exec"))
    done = agents["reader"].run("exec", "web-1", "--", "env")
    assert done.returncode == 1 and "Error from server (Forbidden): custody: no rule matches this request" in done.stderr
    assert len(kube.exec_sessions) == sessions and len(reached(kube, "POST", "/exec")) == before


def test_spdy_is_refused_with_what_to_do(agents, kube):
    sessions = len(kube.exec_sessions)
    done = agents["operator"].run("exec", "web-1", "--", "whoami", KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false")
    assert done.returncode == 1
    assert "SPDY streams cannot be inspected by the gateway" in done.stderr
    assert "KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true" in done.stderr
    assert len(kube.exec_sessions) == sessions


def test_port_forward_is_denied(agents, kube):
    before = len(kube.reached("/portforward"))
    done = agents["operator"].run("port-forward", "pod/web-1", f"{free_port()}:80", timeout=30)
    assert done.returncode == 1 and "Port-forwarding and API proxying are not available to agents" in done.stderr
    assert len(kube.reached("/portforward")) == before


# direct (reverse-mode) clients and client certificates


def test_direct_listener_serves_kubectl_without_a_proxy(agents, kube):
    done = agents["direct"].run("get", "secret", "db", "-o", "jsonpath={.data.password}")
    assert (done.returncode, done.stdout) == (0, "[REDACTED]"), done.stderr
    refused = agents["direct"].run("delete", "pod", "web-1")
    assert refused.returncode == 1 and "custody: no rule matches this request" in refused.stderr
    assert kube.get("pods", "default", "web-1") is not None


def test_direct_listener_needs_a_token(gw, kube):
    port = next(c["listen"] for c in gw.config["connections"] if c["name"] == "prod-k8s").rsplit(":", 1)[1]
    before = len(kube.received)
    done = subprocess.run(["curl", "-sS", "--cacert", str(gw.ca), "--resolve", f"kube.test:{port}:127.0.0.1",
                           "-w", "\n%{http_code}", f"https://kube.test:{port}/api/v1/namespaces/default/pods"],
                          capture_output=True, text=True, timeout=30, env=clean_env())
    body, _, code = done.stdout.rpartition("\n")
    assert code == "401" and json.loads(body)["error"] == "unauthenticated", done.stderr
    assert len(kube.received) == before


def test_client_certificate_connections_authenticate_with_the_certificate(agents, kube):
    before = len(kube.received)
    done = agents["cert"].run("get", "configmaps")
    assert done.returncode == 0 and "keep" in done.stdout, done.stderr
    got = kube.received[before:]
    assert got and all(r.user == "custody-gateway" and "authorization" not in r.headers for r in got)


# what the API server reads: DeleteOptions from the body, dry runs it will really rehearse


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status_code, self.text = response.status, response.read().decode()

    def json(self) -> dict:
        return json.loads(self.text)


def send(conn: http.client.HTTPSConnection, token: str, method: str, path: str, content: bytes | None = None,
         content_type: str = "") -> Answer:
    """One request, its path and query sent byte for byte as written (requests would
    re-quote a URL with a stray `%`, and turn `%41` into `A`)."""
    headers = {"Authorization": f"Bearer {token}", **({"Content-Type": content_type} if content_type else {})}
    try:
        conn.request(method, path, body=content, headers=headers)
        return Answer(conn.getresponse())
    finally:
        conn.close()


def raw(gw: Gateway, token: str, method: str, path: str, content: bytes | None = None, content_type: str = "",
        host: str = "kube.test") -> Answer:
    """Through the gateway, as an agent would send it."""
    tunnel = http.client.HTTPSConnection("127.0.0.1", gw.port, timeout=20,
                                         context=ssl.create_default_context(cafile=str(gw.ca)))
    tunnel.set_tunnel(host, 443)
    return send(tunnel, token, method, path, content, content_type)


def refused(r, error: str, message: str = "") -> None:
    """A refusal as kubectl reads it: a Kubernetes Status, with Custody's error code."""
    answer = r.json()
    assert (r.status_code, answer["kind"], answer["status"], answer["code"]) == (403, "Status", "Failure", 403), r.text
    assert answer["error"] == error and answer["message"].startswith("custody: ")
    assert message in answer["message"]


OPTIONS = json.dumps({"kind": "DeleteOptions", "apiVersion": "v1"}).encode()
CONFIGMAP = "/api/v1/namespaces/default/configmaps/keep"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"

DELETES_THAT_ARE_NO_DRY_RUN = [
    (CONFIGMAP + "?dryRun=All", OPTIONS, "application/json"),
    (CONFIGMAP + "?dryRun=All", b"{}", "application/json"),
    (CONFIGMAP + "?dryRun=All", b'{"dryRun":[]}', "application/json"),
    (CONFIGMAP + "?dryRun=All", b'{"dryRun":null}', ""),
    (CONFIGMAP + "?dryRun=All", b'{"propagationPolicy":"Background"}', "application/json"),
    (CONFIGMAP + "?dryRun=All", b'{"kind":"DeleteOptions","apiVersion":"meta.k8s.io/v1","gracePeriodSeconds":0}',
     "application/json"),
    (CONFIGMAP + "?dryRun=All&dryRun=All", OPTIONS, "application/json; charset=utf-8"),
    (CONFIGMAP + "?dryRun=All", b"kind: DeleteOptions\napiVersion: v1\n", "application/yaml"),
    (CONFIGMAP + "?dryRun=All", b'{"dryrun":["All"]}', "application/json"),
    (CONFIGMAP + "?dryRun=All", b'{"dryRun":["All"],"dryRun":[]}', "application/json"),
    (CONFIGMAP + "?dryRun=All", b"dryRun: [All]\n", "application/yaml"),
    (CONFIGMAP + "?dryRun=All", b"k8s\x00\n\x02v1\x12\rDeleteOptions", "application/vnd.kubernetes.protobuf"),
    (CONFIGMAP + "?dryRun=All;", None, ""),  # Go drops a pair holding a ';': no dry run at all
    (CONFIGMAP + "?dryRun=All%zz", None, ""),
    (CONFIGMAP + "?dryRun=all", None, ""),
    (CONFIGMAP + "?dryRun=All&dryRun=", None, ""),
    (CONFIGMAP + "?dryrun=All", None, ""),
    (CONFIGMAPS + "?dryRun=All", OPTIONS, "application/json"),  # the whole collection
    (CONFIGMAPS + "?dryRun=All&labelSelector=app%3Dnone", b"{}", "application/json"),
    (CONFIGMAPS + "?dryRun=All&fieldSelector=metadata.name%3Dkeep", OPTIONS, ""),
]


@pytest.mark.parametrize("path, content, content_type", DELETES_THAT_ARE_NO_DRY_RUN)
def test_a_read_only_agent_cannot_delete_behind_a_dry_run_query(gw, agents, kube, path, content, content_type):
    before = len(kube.received)
    r = raw(gw, agents["reader_token"], "DELETE", path, content, content_type)
    refused(r, "no_matching_rule")
    assert kube.received[before:] == []
    assert kube.get("configmaps", "default", "keep")["data"] == {"mode": "fast"}


@pytest.mark.parametrize(
    "path, content, content_type",
    [
        (CONFIGMAP, b'{"kind":"DeleteOptions","apiVersion":"v1","dryRun":["All"]}', "application/json"),
        (CONFIGMAP + "?dryRun=", b'{"dryRun":["All"]}', ""),  # the body's options replace the query's
        (CONFIGMAP + "?dryRun=All", b'{"dryRun":["All"],"propagationPolicy":"Foreground"}', "application/json"),
        (CONFIGMAP + "?dryRun=All", None, ""),
        (CONFIGMAP + "?dryRun=%41ll", None, ""),
        (CONFIGMAPS + "?dryRun=All", None, ""),
        (CONFIGMAPS, b'{"dryRun":["All"]}', "application/json"),
    ],
)
def test_a_real_dry_run_delete_is_a_read_and_changes_nothing(gw, agents, kube, path, content, content_type):
    before = len(kube.received)
    r = raw(gw, agents["reader_token"], "DELETE", path, content, content_type)
    assert r.status_code == 200, r.text
    assert [x.method for x in kube.received[before:]] == ["DELETE"]
    assert kube.get("configmaps", "default", "keep")["data"] == {"mode": "fast"}


def test_kubectl_delete_dry_run_sends_its_options_in_the_body(agents, kube):
    before = len(kube.received)
    done = agents["reader"].run("delete", "configmap", "keep", "--dry-run=server")
    assert (done.returncode, done.stdout.strip()) == (0, 'configmap "keep" deleted (server dry run)'), done.stderr
    sent = [r for r in kube.received[before:] if r.method == "DELETE"]
    assert sent and all(json.loads(r.body)["dryRun"] == ["All"] and "dryRun" not in r.path for r in sent)
    assert kube.get("configmaps", "default", "keep") is not None


# requests across every namespace reach every namespace


EVERY_NAMESPACE = [
    "/api/v1/secrets",
    "/api/v1/secrets/",
    "/api/v1/%73ecrets",
    "/api/v1/secrets?watch=true",
    "/api/v1/secrets?watch=1&resourceVersion=0",
    "/api/v1/secrets?watch=",
    "/api/v1/watch/secrets",
    "/api/v1/secrets?fieldSelector=metadata.namespace%3Dvault",
    "/api/v1/secrets?fieldSelector=metadata.namespace%3D%3Dvault",
    "/api/v1/secrets?fieldSelector=metadata.namespace!%3Ddefault",
    "/api/v1/watch/secrets?fieldSelector=metadata.namespace%3Dvault",
    "/api/v1/secrets?fieldSelector=metadata.name%3Dmaster",
    "/api/v1/secrets?labelSelector=app%3Dvault&limit=1",
    "/api/v1/configmaps",
    "/api/v1/pods?watch=1",
    "/apis/apps/v1/deployments",
    "/apis/apps/v1/deployments?watch=1",
    "/apis/apps/v1/watch/deployments",
    "/api/v1/namespaces",
]
EMPTY_NAMESPACE = [  # the API server reads an empty namespace segment as every namespace
    "/api/v1/namespaces//secrets",
    "/api/v1/namespaces//secrets?watch=1",
    "/api/v1/watch/namespaces//secrets",
    "/apis/apps/v1/namespaces//deployments",
]


@pytest.mark.parametrize("path", EVERY_NAMESPACE + EMPTY_NAMESPACE)
def test_a_deny_rule_on_a_namespace_refuses_requests_across_every_namespace(gw, agents, kube, path):
    before = len(kube.received)
    r = raw(gw, agents["reader_token"], "GET", path)
    refused(r, "denied_by_policy", VAULT_REASON)
    assert kube.received[before:] == []


@pytest.mark.parametrize(
    "args",
    [
        ["get", "secrets", "-A"],
        ["get", "secrets", "--all-namespaces", "-o", "yaml"],
        ["get", "pods", "-A", "--field-selector", "metadata.namespace=vault"],
        ["get", "configmaps", "-A", "-l", "tier=secret"],
        ["get", "deployments", "-A", "-w", "--request-timeout=5s"],
        ["get", "namespaces"],
    ],
)
def test_kubectl_across_every_namespace_is_refused_by_a_namespace_rule(agents, kube, args):
    before = len(kube.received)
    done = agents["reader"].run(*args)
    assert done.returncode == 1 and f"Error from server (Forbidden): custody: {VAULT_REASON}" in done.stderr
    assert [r for r in kube.received[before:] if r.path.startswith(("/api/v1/", "/apis/apps/v1/"))] == []


def test_the_namespace_rule_leaves_other_namespaces_alone(agents, kube):
    done = agents["reader"].run("get", "configmaps", "-n", "dev", "-o", "name")
    assert (done.returncode, done.stdout.strip()) == (0, "configmap/dev-settings"), done.stderr
    refused_in_vault = agents["reader"].run("get", "configmaps", "-n", "vault")
    assert refused_in_vault.returncode == 1 and VAULT_REASON in refused_in_vault.stderr


@pytest.mark.parametrize("path", EVERY_NAMESPACE + EMPTY_NAMESPACE)
def test_an_allow_rule_on_one_namespace_does_not_allow_requests_across_every_namespace(gw, agents, kube, path):
    before = len(kube.received)
    r = raw(gw, agents["dev_token"], "GET", path, host="cert.kube.test")
    refused(r, "no_matching_rule")
    assert kube.received[before:] == []


def test_the_one_namespace_is_allowed(gw, agents):
    r = raw(gw, agents["dev_token"], "GET", "/api/v1/namespaces/dev/configmaps", host="cert.kube.test")
    assert r.status_code == 200 and [i["metadata"]["name"] for i in r.json()["items"]] == ["dev-settings"]


def first_team_b_object(r) -> dict:
    """The team-b ConfigMap in a list, a Table or a watch stream."""
    if r.headers["content-type"].startswith("application/json") and "watch" not in r.url:
        document = r.json()
        items = document.get("items") or [row["object"] for row in document.get("rows", [])]
        return next(i for i in items if i["metadata"]["namespace"] == "team-b")
    for line in r.iter_lines():
        event = json.loads(line)
        if event["object"]["metadata"]["namespace"] == "team-b":
            return event["object"]
    raise AssertionError("no team-b object in the stream")


@pytest.mark.parametrize(
    "path, accept",
    [
        ("/api/v1/configmaps", ""),
        ("/api/v1/configmaps/", ""),
        ("/api/v1/%63onfigmaps", ""),
        ("/api/v1/configmaps?limit=500", ""),
        ("/api/v1/configmaps?labelSelector=tier%3Dsecret", ""),
        ("/api/v1/configmaps?fieldSelector=metadata.namespace%3Dteam-b", ""),
        ("/api/v1/configmaps?fieldSelector=metadata.name%3Dlaunch", ""),
        ("/api/v1/configmaps?watch=true", ""),
        ("/api/v1/configmaps?watch=", ""),
        ("/api/v1/watch/configmaps", ""),
        ("/api/v1/watch/configmaps?fieldSelector=metadata.namespace%3Dteam-b", ""),
        ("/api/v1/configmaps?includeObject=Object", "application/json;as=Table;v=v1;g=meta.k8s.io"),
        ("/api/v1/namespaces//configmaps", ""),
    ],
)
def test_masks_of_a_namespace_apply_to_requests_across_every_namespace(gw, agents, path, accept):
    headers = {"Authorization": f"Bearer {agents['reader_token']}", **({"Accept": accept} if accept else {})}
    with gw.session(None).get(f"https://cert.kube.test{path}", headers=headers, stream=True, timeout=20) as r:
        assert r.status_code == 200
        launch = first_team_b_object(r)
    assert launch["metadata"]["name"] == "launch" and launch["data"] == {"code": "[REDACTED]"}


def test_masks_of_a_namespace_stay_in_it(gw, agents):
    default = raw(gw, agents["reader_token"], "GET", CONFIGMAP, host="cert.kube.test")
    team_b = raw(gw, agents["reader_token"], "GET", "/api/v1/namespaces/team-b/configmaps/launch", host="cert.kube.test")
    assert default.json()["data"] == {"mode": "fast"} and team_b.json()["data"] == {"code": "[REDACTED]"}


# legacy proxy paths are the proxy subresource they stood for

PROXY_REASON = "Port-forwarding and API proxying are not available to agents."


@pytest.mark.parametrize(
    "who, method, path",
    [
        ("operator", "GET", "/api/v1/proxy/namespaces/default/pods/web-1"),
        ("operator", "GET", "/api/v1/proxy/namespaces/default/pods/web-1/"),
        ("operator", "GET", "/api/v1/proxy/namespaces/default/pods/web-1/metrics"),
        ("operator", "GET", "/api/v1/proxy/namespaces/default/pods/web-1:8080/debug/pprof/"),
        ("operator", "GET", "/api/v1/proxy/namespaces/default/pods/https:web-1:8443/"),
        ("operator", "POST", "/api/v1/proxy/namespaces/default/pods/web-1/admin/shutdown"),
        ("operator", "DELETE", "/api/v1/proxy/namespaces/default/pods/web-1/cache"),
        ("operator", "GET", "/api/v1/proxy/nodes/node-1:10250/pods"),
        ("operator", "GET", "/api/v1/%70roxy/namespaces/default/pods/web-1"),
        ("operator", "GET", "/api/v1/proxy%2Fnamespaces%2Fdefault%2Fpods%2Fweb-1"),
        ("operator", "GET", "/api/v1//proxy/namespaces/default/pods/web-1"),
        ("operator", "GET", "/api/v1/namespaces/default/pods/web-1/proxy/metrics"),
        ("reader", "GET", "/api/v1/proxy/namespaces/default/pods/web-1"),
        ("reader", "PUT", "/api/v1/proxy/namespaces/kube-system/pods/dns:53/"),
    ],
)
def test_legacy_proxy_paths_are_refused_as_proxying(gw, agents, kube, who, method, path):
    before = len(kube.received)
    r = raw(gw, agents[f"{who}_token"], method, path, b"{}" if method in ("POST", "PUT") else None)
    refused(r, "denied_by_policy", PROXY_REASON)
    assert kube.received[before:] == []


# the sample API server answers these requests as the real one does


@pytest.fixture
def cluster(ca):
    """A sample API server of its own, for requests that change it."""
    server = KubeAPI(ca.issue("localhost"), SA_TOKEN)
    server.put("namespaces", {"metadata": {"name": "other"}})
    server.put("configmaps", {"metadata": {"name": "a", "namespace": "default"}, "data": {"k": "v"}})
    server.put("configmaps", {"metadata": {"name": "b", "namespace": "other"}, "data": {"k": "v"}})
    yield server
    server.stop()


def direct(server: KubeAPI, ca, method: str, path: str, content: bytes | None = None, content_type: str = "") -> Answer:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=20,
                                       context=ssl.create_default_context(cafile=str(ca.cert_file)))
    return send(conn, SA_TOKEN, method, path, content, content_type)


def configmaps(server: KubeAPI) -> set[str]:
    return {f"{ns}/{name}" for ns, name in server.call(lambda: list(server.objects["configmaps"]))}


A = "/api/v1/namespaces/default/configmaps/a"
NEW = json.dumps({"metadata": {"name": "c"}}).encode()
BOTH, ONLY_B = {"default/a", "other/b"}, {"other/b"}


@pytest.mark.parametrize(
    "method, path, content, content_type, status, left",
    [
        # handlers/delete.go: a non-empty body is the DeleteOptions, the query is ignored
        ("DELETE", A + "?dryRun=All", OPTIONS, "application/json", 200, ONLY_B),
        ("DELETE", A + "?dryRun=All", b"{}", "", 200, ONLY_B),
        ("DELETE", A + "?dryRun=All", b"kind: DeleteOptions\napiVersion: v1\n", "application/yaml", 200, ONLY_B),
        ("DELETE", A, b'{"dryRun":["All"]}', "application/json", 200, BOTH),
        ("DELETE", A + "?dryRun=", b"dryRun: [All]\n", "application/yaml", 200, BOTH),
        ("DELETE", A + "?dryRun=All", None, "", 200, BOTH),
        ("DELETE", A + "?dryRun=%41ll", None, "", 200, BOTH),
        ("DELETE", A + "?dryRun=All;", None, "", 200, ONLY_B),  # Go drops the pair: a real delete
        ("DELETE", A + "?dryRun=All%zz", None, "", 200, ONLY_B),
        ("DELETE", A + "?dryRun=all", None, "", 422, BOTH),  # ValidateDryRun: only "All"
        ("DELETE", A, b'{"dryRun":["All",""]}', "application/json", 422, BOTH),
        ("DELETE", A, b'{"dryRun":"All"}', "application/json", 400, BOTH),
        ("DELETE", A, OPTIONS, "text/plain", 415, BOTH),
        ("DELETE", A, b'{"kind":"Pod","apiVersion":"v1"}', "application/json", 400, BOTH),
        ("DELETE", "/api/v1/namespaces/default/configmaps?dryRun=All", OPTIONS, "application/json", 200, ONLY_B),
        ("DELETE", "/api/v1/namespaces/default/configmaps?dryRun=All", None, "", 200, BOTH),
        ("DELETE", "/api/v1/namespaces//configmaps", None, "", 200, set()),  # an empty namespace: all of them
        ("DELETE", "/api/v1/configmaps", None, "", 405, BOTH),  # across namespaces only list and watch
        # create.go: dryRun from the query, checked
        ("POST", "/api/v1/namespaces/default/configmaps?dryRun=All&dryRun=", NEW, "application/json", 422, BOTH),
        ("POST", "/api/v1/namespaces/default/configmaps?dryRun=All", NEW, "application/json", 201, BOTH),
        ("POST", "/api/v1/namespaces/default/configmaps?dryRun=All;", NEW, "application/json", 201,
         BOTH | {"default/c"}),
        ("POST", "/api/v1/configmaps", NEW, "application/json", 405, BOTH),
        ("POST", "/api/v1/namespaces//configmaps", NEW, "application/json", 400, BOTH),
        ("GET", "/api/v1/namespaces//configmaps/a", None, "", 400, BOTH),  # Namespace parameter required
        ("GET", "/api/v1/proxy/namespaces/default/pods/web", None, "", 404, BOTH),  # no legacy proxy routes
    ],
)
def test_the_sample_cluster_reads_requests_as_the_api_server_does(cluster, ca, method, path, content, content_type,
                                                                  status, left):
    r = direct(cluster, ca, method, path, content, content_type)
    assert r.status_code == status, r.text
    if status >= 400:
        assert (r.json()["kind"], r.json()["code"]) == ("Status", status)
    assert configmaps(cluster) == left


@pytest.mark.parametrize(
    "path, names",
    [
        ("/api/v1/configmaps", ["a", "b"]),
        ("/api/v1/namespaces//configmaps", ["a", "b"]),
        ("/api/v1/configmaps?fieldSelector=metadata.namespace%3Dother", ["b"]),
        ("/api/v1/namespaces/default/configmaps", ["a"]),
        ("/api/v1/configmaps?watch=&timeoutSeconds=1", ["a", "b"]),  # an empty watch= is a watch
        ("/api/v1/configmaps?watch=F&timeoutSeconds=1", ["a", "b"]),
        ("/api/v1/watch/configmaps?timeoutSeconds=1", ["a", "b"]),
        ("/api/v1/namespaces/default/configmaps/a?watch=1", ["a"]),  # a named GET is a get
    ],
)
def test_the_sample_cluster_lists_and_watches_every_namespace(cluster, ca, path, names):
    r = direct(cluster, ca, "GET", path)
    assert r.status_code == 200, r.text
    if "watch" in path and "/a?" not in path:
        got = [json.loads(line)["object"]["metadata"]["name"] for line in r.text.splitlines()]
    else:
        document = r.json()
        got = [i["metadata"]["name"] for i in document.get("items", [document])]
    assert got == names
