"""Kubernetes through the gateway: the real kubectl, the real gateway, the shipped sample
rules (rules/kubernetes.yaml), and a Kubernetes API test server (tests/support/kubeapi.py)."""

from __future__ import annotations

import base64
import json
import queue
import stat
import subprocess
import threading
import time

import pytest
import yaml

from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.kubeapi import KubeAPI
from tests.support.kubectl import Kubectl, clean_env
from tests.support.servers import free_port

SA_TOKEN = "cluster-sa-token-5d1e9"
DB_PASSWORD = "s3cr3t-db-passw0rd"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
CI_VIEWER = "system:serviceaccount:team-a:viewer"

TEST_RULES = {"rules": [
    {"id": "ci-views-as-team-viewer", "match": {
        "connection": "prod-k8s", "principal": {"groups": ["ci"]}, "action": "admin",
        "kubernetes": {"verbs": ["get", "list"], "impersonate": {"users": CI_VIEWER, "groups": "system:authenticated"}}},
     "effect": "allow", "masks": ["kubernetes-secrets"]},
    {"id": "cert-cluster-read", "match": {"connection": "cert-k8s", "principal": {"groups": ["k8s-readers"]},
                                          "action": "read"},
     "effect": "allow", "masks": ["kubernetes-secrets"]},
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
        "direct": Kubectl(gw, base / "direct", token("crew-reader", ["k8s-readers"]), direct=True),
        "cert": Kubectl(gw, base / "cert", token("crew-reader", ["k8s-readers"]), connection="cert-k8s"),
        "sre": Approver(gw.approvals_url, token("sre-1", ["sre"])),
        "reader_token": token("crew-reader", ["k8s-readers"]),
        "operator_token": token("crew-operator", ["k8s-operators"]),
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
