"""The governed HTTP data path end to end: a real mitmdump with the chain, real upstreams,
real clients (curl and requests) configured only with the proxy and the gateway's CA."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess

import pytest

from tests.conftest import (
    API_TOKEN,
    SECURE_KEY,
    STANDARD_RULES,
    standard_connections,
    standard_gateway,
)


@pytest.fixture
def mark(upstream, tls_upstream, other_tls_upstream):
    """What reached the upstreams since the test began."""
    servers = (upstream, tls_upstream, other_tls_upstream)
    before = [len(s.received) for s in servers]
    return lambda: [got for s, n in zip(servers, before) for got in s.received[n:]]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method="CONNECT")
    response.begin()
    return response.status, response.read(int(response.getheader("content-length", 0)))


# allow / deny / no match / unknown connection


@pytest.mark.parametrize(
    "groups, method, url, body, status, effect, rules, error",
    [
        (["analysts"], "GET", "http://api.test/items", None, 200, "allow", ["analysts-read"], None),
        (["analysts"], "GET", "https://api.test/items?limit=5", None, 200, "allow", ["analysts-read"], None),
        (["analysts"], "HEAD", "http://api.test/items", None, 200, "allow", ["analysts-read"], None),
        (["writers"], "POST", "http://api.test/refunds", {"amount": 10}, 200, "allow", ["writers-write"], None),
        (["writers"], "POST", "http://api.test/refunds", {"amount": 5000}, 403, "deny", ["big-refunds-denied"], "denied_by_policy"),
        (["writers"], "DELETE", "https://api.test/items/3", None, 200, "allow", ["writers-write"], None),
        (["analysts"], "GET", "http://api.test/admin/users", None, 403, "deny", ["admin-denied"], "denied_by_policy"),
        (["analysts"], "POST", "http://api.test/items", {"name": "x"}, 403, "deny", [], "no_matching_rule"),
        (["analysts"], "DELETE", "http://api.test/items/1", None, 403, "deny", [], "no_matching_rule"),
        ([], "GET", "http://api.test/items", None, 403, "deny", [], "no_matching_rule"),
        (["writers"], "POST", "http://api.test/orders", {"quantity": 3}, 403, "review", ["orders-reviewed"], "approval_pending"),
    ],
)
def test_decisions(gateway, token, mark, groups, method, url, body, status, effect, rules, error):
    s = gateway.session(token(groups=groups))
    r = s.request(method, url, json=body)
    assert r.status_code == status
    if error is None:
        assert len(mark()) == 1 and mark()[0].method == method
        return
    assert mark() == []  # nothing reached the backend
    answer = r.json()
    assert answer["decision"] == "deny" and answer["error"] == error and answer["rules"] == rules
    refusal = gateway.event(answer["event_id"])
    assert refusal["kind"] == "decision" and refusal["effect"] == "deny" and json.loads(refusal["rules"]) == rules
    steps = [json.loads(e["detail"])["step"] for e in gateway.events("flow = ? AND kind = 'approval'", [refusal["flow"]])]
    assert steps == (["requested", "hold_timeout"] if effect == "review" else [])


def test_denial_names_reason_rules_and_event(gateway, token, mark):
    r = gateway.curl(token(groups=["analysts"]), "https://api.test/admin/users")
    assert r.status == 403 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body == {
        "decision": "deny",
        "error": "denied_by_policy",
        "reason": "admin endpoints are off-limits",
        "rules": ["admin-denied"],
        "event_id": body["event_id"],
        "hint": "a rule refuses this; `custody rules explain` shows which",
    }
    shown = gateway.custody("audit", "show", body["event_id"], "--json", check=True)
    flow = json.loads(shown.stdout)["flow"]
    assert [e["kind"] for e in flow] == ["request", "decision", "response"]
    assert flow[2]["status"] == 403
    assert mark() == []


@pytest.mark.parametrize(
    "url",
    ["http://unknown.test/", "http://api.test:22/", "http://127.0.0.1:1/", "http://evil.api.test/"],
)
def test_unregistered_hosts_refused_plain(gateway, token, mark, url):
    r = gateway.curl(token(), url)
    assert r.status == 403
    assert r.json()["error"] == "unknown_connection"
    assert mark() == []
    assert gateway.event(r.json()["event_id"])["effect"] == "deny"


@pytest.mark.parametrize("target", ["unknown.test:443", "api.test:22", "127.0.0.1:22"])
def test_connect_to_unregistered_host_refused(gateway, token, mark, target):
    """The tunnel itself is refused: no TCP connection to the target is ever opened."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {token()}\r\n\r\n".encode()
        )
        status, raw = read_response(sock)
    assert status == 403
    body = json.loads(raw)
    assert body["error"] == "unknown_connection"
    events = gateway.events("id = ?", [body["event_id"]])
    assert events[0]["kind"] == "connect" and events[0]["effect"] == "deny"
    assert mark() == []


REFUSED_CONNECT = "403 Forbidden (custody unknown_connection: unknown.test:443 is not a registered connection)"


def connect_error(client: str, proxy: str, ca: str) -> str:
    """What each real client tells its user when the gateway refuses its CONNECT."""
    url = "https://unknown.test/"
    if client == "httpx":
        import httpx

        with pytest.raises(httpx.ProxyError) as e, httpx.Client(proxy=proxy, verify=False) as c:
            c.get(url)
        return str(e.value)
    if client == "requests":
        import requests

        with pytest.raises(requests.exceptions.ProxyError) as e:
            requests.get(url, proxies={"https": proxy}, verify=ca, timeout=10)
        return str(e.value)
    if client == "aiohttp":
        import asyncio

        import aiohttp

        async def get() -> str:
            async with aiohttp.ClientSession() as session:
                try:
                    await session.get(url, proxy=proxy, ssl=False)
                except aiohttp.ClientHttpProxyError as e:
                    return f"{e.status} {e.message}"
            return "no error"

        return asyncio.run(get())
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    out = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "-x", proxy, url], capture_output=True, env=env, timeout=30)
    assert out.returncode == 56  # CONNECT tunnel failed
    return out.stderr.decode()


@pytest.mark.parametrize("client", ["httpx", "requests", "aiohttp", "curl"])
def test_a_refused_connect_says_why_where_the_client_shows_it(gateway, token, mark, client):
    """Proxy clients show a refused CONNECT's status line, not its body: the reason is there."""
    assert REFUSED_CONNECT in connect_error(client, gateway.proxy_url(token()), str(gateway.ca))
    assert mark() == []


H2C_UPGRADES = ["h2c", "H2C", "h2c, websocket", "websocket, h2c", "websocket,h2c"]


@pytest.mark.parametrize("upgrade", H2C_UPGRADES)
def test_an_h2c_upgrade_is_refused_not_ignored(gateway, token, mark, upgrade):
    r = gateway.session(token(groups=["analysts"])).get(
        "http://api.test/items", headers={"Upgrade": upgrade, "Connection": "Upgrade, HTTP2-Settings",
                                          "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
    assert r.status_code == 403 and r.json()["error"] == "unsupported_protocol"
    assert r.raw.version == 11  # answered in the client's HTTP/1.1
    assert mark() == []


def test_curl_asking_for_h2c_is_told_why(gateway, token, mark):
    r = gateway.curl(token(groups=["analysts"]), "http://api.test/items", "--http2")
    assert r.status == 403 and r.json()["error"] == "unsupported_protocol"
    assert r.json()["reason"].startswith("an HTTP/2 cleartext upgrade (h2c) is not governed")
    assert mark() == []


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"\r\nGET /items HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # leading CRLF: once taken for raw TCP
        b"\x16\x03\x01\x00\x05hello",
    ],
)
def test_a_tunnel_never_relays_bytes_it_cannot_govern(gateway, token, upstream, payload):
    """A tunnel to a registered host that resolves (the upstream itself, as `direct`), then
    something other than a governed HTTP request: nothing may reach that host."""
    seen = len(upstream.received)
    target = f"127.0.0.1:{upstream.port}"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token(groups=['analysts'])}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(payload)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            answer = b""  # waiting for a request that never completes: also nothing relayed
    assert b"BaseHTTP" not in answer  # the upstream's own server never answered
    assert not answer or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5"))
    assert len(upstream.received) == seen


# credentials and the agent's token


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_upstream_sees_the_connection_credential_never_the_agent_token(gateway, token, mark, scheme):
    agent_token = token(groups=["analysts"])
    r = gateway.session(agent_token).get(
        f"{scheme}://api.test/items",
        headers={"Authorization": "Bearer agent-supplied", "X-Custody-Model": "gpt-4o", "X-Custody-Agent": "researcher",
                 "X-Custody-Session": "spoofed"},
    )
    assert r.status_code == 200
    (got,) = mark()
    assert got.headers["authorization"] == f"Bearer {API_TOKEN}"
    assert "proxy-authorization" not in got.headers
    assert not any(h.startswith("x-custody-") for h in got.headers)
    assert "x-custody-session" not in got.headers
    assert agent_token not in json.dumps(got.headers)


def test_an_agent_credential_never_reaches_a_connection_without_one(gateway, token, upstream):
    seen = len(upstream.received)
    r = gateway.session(token(groups=["analysts"])).get(
        f"http://127.0.0.1:{upstream.port}/items", headers={"Authorization": "Basic YWdlbnQ6c2VjcmV0"})
    assert r.status_code == 200
    (got,) = upstream.received[seen:]
    assert "authorization" not in got.headers


def test_header_credential_on_a_tls_upstream_with_a_pinned_ca(gateway, token, mark):
    r = gateway.curl(token(groups=["analysts"]), "https://secure.test/reports/1")
    assert r.status == 200, r
    (got,) = mark()
    assert got.headers["x-api-key"] == SECURE_KEY
    assert r.json()["path"] == "/reports/1"


@pytest.mark.parametrize("host", ["mispinned.test", "unpinned.test"])
def test_upstream_tls_is_verified_against_the_connection_ca(gateway, token, mark, host):
    """Pinned to another CA, or to the default trust store: the test upstream is refused."""
    r = gateway.curl(token(groups=["analysts"]), f"https://{host}/items")
    assert r.status == 502
    assert b"Certificate verify failed" in r.body
    assert mark() == []
    errors = gateway.events("kind = 'error' AND connection = ?", [host.split(".")[0]])
    assert "Certificate verify failed" in json.loads(errors[-1]["detail"])["error"]


def test_basic_credential_and_bearer_token_that_belongs_to_the_gateway(gateway, token, mark):
    """kubeconfig-style: the agent's JWT arrives in Authorization and is replaced."""
    agent_token = token(groups=["analysts"])
    s = gateway.session(None)
    r = s.get("https://kube.test/api/v1/pods", headers={"Authorization": f"Bearer {agent_token}"})
    assert r.status_code == 200
    (got,) = mark()
    assert got.headers["authorization"].startswith("Basic ")
    assert base64.b64decode(got.headers["authorization"][6:]).decode() == f"svc:{API_TOKEN}"


# classification: the target is what the tunnel says, and paths normalise


@pytest.mark.parametrize(
    "path",
    ["/admin/users", "/admin", "//admin//users", "/admin%2fusers", "/%61dmin/users", "/%2561dmin/users",
     "/admin;jsessionid=1/users", "/admin/users/"],
)
def test_path_spellings_do_not_dodge_a_deny(gateway, token, mark, path):
    r = gateway.curl(token(groups=["analysts"]), "https://api.test" + path, "--path-as-is")
    assert r.status == 403, path
    assert r.json()["rules"] == ["admin-denied"]
    assert mark() == []


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/admin/../items", "the path contains a '.' or '..' segment"),
        ("/admin/..;/items", "the path contains a '.' or '..' segment"),
        ("/admin/%2e%2e/items", "the path contains a '.' or '..' segment"),
        ("/admin/%252e%252e/items", "the path contains a '.' or '..' segment"),
        ("/items/..%2fadmin/users", "the path contains a '.' or '..' segment"),
        ("/./items", "the path contains a '.' or '..' segment"),
        ("/items\\..\\admin", "the path contains a backslash"),
        ("/items%5c..%5cadmin", "the path contains a backslash"),
    ],
)
def test_paths_a_server_could_resolve_differently_are_refused(gateway, token, mark, path, reason):
    """The gateway does not guess how the backend resolves dot segments: it refuses them."""
    r = gateway.curl(token(groups=["analysts"]), "https://api.test" + path, "--path-as-is")
    assert r.status == 400 and r.json()["error"] == "ambiguous_path"
    assert r.json()["reason"] == f"{reason}; send the resolved path"
    assert mark() == []


@pytest.mark.parametrize(
    "override, status",
    [("DELETE", 403), ("POST", 403), ("GET", 200)],
)
def test_method_override_is_classified(gateway, token, mark, override, status):
    """GET with an override header: the riskier of the two decides."""
    r = gateway.session(token(groups=["analysts"])).get(
        "http://api.test/items/1", headers={"X-HTTP-Method-Override": override}
    )
    assert r.status_code == status
    assert len(mark()) == (1 if status == 200 else 0)


MORE_RULES = {**STANDARD_RULES, "more.yaml": {"rules": [
    {"id": "posters-write", "match": {"connection": "api", "principal": {"groups": ["posters"]}, "action": "write"},
     "effect": "allow"},
    {"id": "ci-read", "match": {"connection": "ci", "principal": {"groups": ["analysts"]}, "action": "read"},
     "effect": "allow"},
    {"id": "ci-secret-denied", "match": {"connection": "ci", "path": "/Secret/**"}, "effect": "deny"},
]}}


@pytest.fixture(scope="module")
def more(tmp_path_factory, servers):
    """The standard gateway plus a writer that may not delete (`posters`) and a connection
    whose backend routes case-insensitively (`ci`)."""
    directory = tmp_path_factory.mktemp("more")
    connections = standard_connections(servers.upstream, servers.tls_upstream, servers.ca, directory,
                                       servers.other_tls_upstream)
    connections.append({"name": "ci", "kind": "http", "hosts": ["ci.test"], "paths": "case-insensitive",
                        "upstream": f"http://127.0.0.1:{servers.upstream.port}"})
    gw = standard_gateway(directory, servers, connections=connections, rules=MORE_RULES).start()
    yield gw
    gw.stop()


def _multipart(disposition: str, boundary: str = "b0undary") -> tuple[str, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\nDELETE\r\n--{boundary}--\r\n")
    return f"multipart/form-data; boundary={boundary}", body.encode()


FORM = "application/x-www-form-urlencoded"
BODY_OVERRIDES = [
    (FORM, b"_method=DELETE"),
    (FORM, b"_method=delete"),
    (FORM, b"title=x&_method=DELETE"),
    (FORM, b"_method=DELETE&_method=POST"),
    (FORM, b"_method=POST&_method=DELETE"),
    (FORM, b"%5Fmethod=DELETE"),
    (FORM, b"_method=%44ELETE"),
    (FORM, b"_method=+DELETE+"),
    (FORM, b"_METHOD=DELETE"),
    (FORM, b"_method[]=DELETE"),
    (FORM, b"_method=PURGE"),
    (FORM + "; charset=UTF-8", b"_method=DELETE"),
    ("APPLICATION/X-WWW-FORM-URLENCODED", b"_method=DELETE"),
    (None, b"_method=DELETE"),
    _multipart('name="_method"'),
    _multipart("name=_method"),
    _multipart('name="_method"; filename="m.txt"'),
    _multipart('name="_method[]"'),
    ("application/json", b'{"_method": "DELETE"}'),
    ("application/json", b'{"_method": "DELETE", "_method": "POST"}'),
]


@pytest.mark.parametrize("content_type, body", BODY_OVERRIDES)
def test_a_method_override_in_the_body_is_classified(more, token, mark, content_type, body):
    """A writer who may not delete cannot delete with `_method` in a form or JSON body:
    Rails, Laravel and Symfony would act on the override."""
    headers = {"content-type": content_type} if content_type else {}
    r = more.session(token(groups=["posters"])).post("http://api.test/items/1", data=body, headers=headers)
    assert r.status_code == 403 and r.json()["error"] == "no_matching_rule"
    assert mark() == []


@pytest.mark.parametrize("content_type, body", [(FORM, b"title=x"), (FORM, b"_method=PATCH"),
                                                ("application/json", b'{"_method": "PUT"}')])
def test_a_write_that_stays_a_write_is_allowed(more, token, mark, content_type, body):
    r = more.session(token(groups=["posters"])).post("http://api.test/items/1", data=body,
                                                     headers={"content-type": content_type})
    assert r.status_code == 200 and r.json()["body"] == body.decode()
    assert len(mark()) == 1


CASE_SPELLINGS = [
    ("/ADMIN/users", 403, "denied_by_policy"),
    ("/Admin/users", 403, "denied_by_policy"),
    ("/aDmIn/users", 403, "denied_by_policy"),
    ("/ADMIN", 403, "denied_by_policy"),
    ("/%41DMIN/users", 403, "denied_by_policy"),
    ("/%2541dmin/users", 403, "denied_by_policy"),
    ("//ADMIN//users/", 403, "denied_by_policy"),
    ("/ADMIN;v=1/users", 403, "denied_by_policy"),
    ("/ADMIN/users?x=1", 403, "denied_by_policy"),
    ("/secret/keys", 403, "denied_by_policy"),  # the rule says /Secret/**
    ("/SECRET/keys", 403, "denied_by_policy"),
    ("/adm\u0131n/users", 400, "ambiguous_path"),  # dotless i: ToUpperInvariant makes it ADMIN
    ("/ADM\u0130N/users", 400, "ambiguous_path"),
    ("/adm%C4%B1n/users", 400, "ambiguous_path"),
    ("/\u017fecret/keys", 400, "ambiguous_path"),  # long s upper-cases to S
]


@pytest.mark.parametrize("path, status, error", CASE_SPELLINGS)
def test_on_a_case_insensitive_connection_case_does_not_dodge_a_deny(more, token, mark, path, status, error):
    r = more.session(token(groups=["analysts"])).get("http://ci.test" + path)
    assert r.status_code == status and r.json()["error"] == error
    assert mark() == []


def test_on_a_case_insensitive_connection_other_paths_pass_folded_rules(more, token, mark):
    r = more.session(token(groups=["analysts"])).get("http://ci.test/Items/Café")
    assert r.status_code == 200 and r.json()["path"] == "/Items/Caf%C3%A9"  # the backend gets the path as sent
    assert more.events("kind = 'request' AND connection = 'ci'")[-1]["resource"] == "/items/café"


def test_on_a_case_sensitive_connection_case_is_another_resource(more, token, mark):
    """api's backend is case-sensitive: /ADMIN is not /admin there, and rules say so too."""
    r = more.session(token(groups=["analysts"])).get("http://api.test/ADMIN/users")
    assert r.status_code == 200 and [g.path for g in mark()] == ["/ADMIN/users"]


def send_raw(gateway, head: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


OURS, MITMPROXY = "ours", "mitmproxy"
HEADER_FORMS = [
    # (extra header lines, who refuses): ours answer JSON; mitmproxy's parser answers its own 400
    (b"X-Note: a\r\n b", OURS),
    (b"X-Note: a\r\n\tb", OURS),
    (b"X-Note: a\r\n b\r\n c", OURS),
    (b"Content-Type: text/plain;\r\n charset=utf-8", OURS),
    (b"X-HTTP-Method-Override: GET\r\n DELETE", OURS),
    (b"X-Note: a\x00b", OURS),
    (b"X-Note: a\rb", OURS),
    (b"X-Note: a\x01b", OURS),
    (b"X-Note: a\x1bb", OURS),
    (b"X-Note: a\x7fb", OURS),
    (b"Host: api.test", OURS),
    (b"Host: secure.test", OURS),
    (b"X-Note : a", MITMPROXY),
    (b"X\x01Note: a", MITMPROXY),
    (b"Content-Length: 0\r\nContent-Length: 0", MITMPROXY),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 0", MITMPROXY),
    (b"Transfer-Encoding: chunked, identity", MITMPROXY),
]


@pytest.mark.parametrize("extra, refuser", HEADER_FORMS)
def test_header_forms_a_proxy_must_reject_are_refused(gateway, token, mark, extra, refuser):
    head = (f"GET http://api.test/items HTTP/1.1\r\nHost: api.test\r\n"
            f"Proxy-Authorization: Bearer {token(groups=['analysts'])}\r\n").encode() + extra + b"\r\n\r\n"
    status, headers, body = send_raw(gateway, head)
    assert status == 400
    if refuser == OURS:
        assert json.loads(body)["error"] == "malformed_headers"
    else:
        assert b"400 Bad Request" in body
    assert mark() == []


def test_host_header_that_disagrees_with_the_tunnel_is_refused(gateway, token, mark):
    r = gateway.curl(token(groups=["analysts"]), "https://api.test/items", "-H", "Host: secure.test")
    assert r.status == 400 and r.json()["error"] == "misdirected_request"
    assert mark() == []


def test_host_header_that_disagrees_with_the_request_line_is_refused(gateway, token, mark):
    r = gateway.curl(token(groups=["analysts"]), "http://api.test/items", "-H", "Host: unknown.test")
    assert r.status == 400 and r.json()["error"] == "misdirected_request"
    assert mark() == []


def test_a_tunnel_to_a_dns_port_is_closed_not_relayed(gateway, token):
    """mitmproxy picks its DNS layer for port 53 whatever the options say; the gate closes it."""
    query = bytes.fromhex("001c" "1234" "0100" "0001" "0000" "0000" "0000" "07" "6578616d706c65" "03" "636f6d" "00" "0001" "0001")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:53 HTTP/1.1\r\nProxy-Authorization: Bearer {token()}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(query)
        assert sock.recv(4096) == b""  # closed, no answer relayed
    assert "refusing a connection no classifier understands" in gateway.log()


def test_an_absolute_form_request_line_in_a_tunnel_is_refused(gateway, token, upstream):
    """Servers route on an absolute-form target, not on Host: it must name the tunnel's host."""
    seen = len(upstream.received)
    target = f"127.0.0.1:{upstream.port}"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token(groups=['analysts'])}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(f"GET http://internal-admin.corp:9999/items HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, body = read_response(sock)
    assert status == 400
    assert json.loads(body)["reason"] == f"request target 'internal-admin.corp:9999' does not match the tunnel to {target}"
    assert len(upstream.received) == seen


def test_sni_that_disagrees_with_the_tunnel_is_refused(gateway, token, mark):
    r = gateway.curl(
        token(groups=["analysts"]), "https://secure.test/items",
        "--connect-to", "secure.test:443:api.test:443", "-H", "Host: api.test",
    )
    # curl CONNECTs to api.test but sends the TLS server name secure.test
    assert r.status == 400 and r.json()["error"] == "misdirected_request"
    assert r.json()["reason"] == "TLS server name 'secure.test' does not match the request target api.test"
    assert mark() == []


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("application/json", b'{"amount": 5000'),
        ("application/json", b'{"amount": 10, "amount": 5000}'),
        ("application/x-www-form-urlencoded", b"amount=5000"),
        ("text/plain", b"{\"amount\": 5000}"),
    ],
)
def test_bodies_that_cannot_be_read_as_json_count_against_the_agent(gateway, token, mark, content_type, body):
    r = gateway.session(token(groups=["writers"])).post(
        "http://api.test/refunds", data=body, headers={"content-type": content_type}
    )
    assert r.status_code == 403 and r.json()["rules"] == ["big-refunds-denied"]
    assert mark() == []


def test_protocol_upgrades_are_refused(gateway, token, mark):
    r = gateway.session(token(groups=["analysts"])).get(
        "http://api.test/stream", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    )
    assert r.status_code == 403 and r.json()["error"] == "unsupported_protocol"
    assert mark() == []


# the gateway's own endpoints


def test_gateway_host_serves_public_endpoints_and_authenticates_the_rest(gateway, token, mark):
    s = gateway.session(None)
    assert s.get("http://custody.gateway/healthz").json() == {"status": "ok"}
    page = s.get("https://custody.gateway/")
    assert page.status_code == 200 and "Custody approvals" in page.text
    r = s.get("https://custody.gateway/anything")
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    r = gateway.session(token(groups=["analysts"])).get("https://custody.gateway/anything")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert mark() == []


# audit


def test_every_event_carries_who_what_and_the_decision(gateway, token, mark):
    t = token(groups=["analysts"], sub="crew-researcher", model="claude")
    r = gateway.session(t).get("https://api.test/items/7", headers={"X-Custody-Task": "restock report"})
    assert r.status_code == 200
    flow = gateway.events("flow = (SELECT flow FROM events WHERE kind = 'request' AND resource = '/items/7' AND subject = 'crew-researcher' ORDER BY seq DESC LIMIT 1)")
    assert [e["kind"] for e in flow] == ["request", "decision", "response"]
    for e in flow:
        assert e["subject"] == "crew-researcher" and e["connection"] == "api" and e["session"] and e["flow"]
        assert e["issuer"].startswith("http://127.0.0.1:")
        principal = json.loads(e["principal"])
        assert principal["asserted"] == {"task": "restock report"}
        assert principal["groups"] == ["analysts"]
    request, decision, response = flow
    assert decision["effect"] == "allow" and json.loads(decision["rules"]) == ["analysts-read"]
    assert json.loads(request["operation"])["action"] == "read"
    assert response["status"] == 200 and b"/items/7" in response["body"]
    headers = dict(json.loads(request["detail"])["headers"])
    assert t not in json.dumps(headers)


def test_recorded_headers_hide_credentials(gateway, token):
    t = token(groups=["analysts"])
    gateway.session(t).get("http://api.test/items/42", headers={"Cookie": "session=abc123"})
    request = gateway.events("kind = 'request' AND resource = '/items/42'")[-1]
    headers = dict(json.loads(request["detail"])["headers"])
    assert headers["Cookie"] == "[redacted]"
    assert "abc123" not in request["detail"]


def test_audit_chain_verifies_after_traffic(gateway, token):
    s = gateway.session(token(groups=["analysts"]))
    for n in range(5):
        s.get(f"https://api.test/items/{n}")
    out = gateway.custody("audit", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: ")


def test_mitmweb_sees_decision_as_comment_and_marker(tmp_path, servers, token):
    """Flows saved by mitmproxy (what mitmweb shows) carry the decision as comment and marker."""
    from mitmproxy import io

    flows = tmp_path / "flows.mitm"
    gw = standard_gateway(tmp_path, servers, options=(f"save_stream_file={flows}",)).start()
    try:
        s = gw.session(token(groups=["analysts"]))
        allowed = s.get("http://api.test/items")
        denied = s.get("http://api.test/admin/x")
    finally:
        gw.stop()
    with open(flows, "rb") as fh:
        saved = list(io.FlowReader(fh).stream())
    by_path = {f.request.path: f for f in saved}
    assert by_path["/items"].marked == ":heavy_check_mark:"
    assert by_path["/items"].comment.startswith("custody: allow · rules analysts-read · event ")
    assert by_path["/admin/x"].marked == ":heavy_multiplication_x:"
    assert denied.json()["event_id"] in by_path["/admin/x"].comment
    assert allowed.status_code == 200
    # the saved context is plain data, and a copy is never considered cleared
    assert by_path["/items"].metadata["custody"]["decision"]["effect"] == "allow"
    # the gateway's credential reached the upstream, but not the flow file
    assert allowed.json()["headers"]["authorization"] == f"Bearer {API_TOKEN}"
    assert by_path["/items"].request.headers["authorization"] == "[custody: gateway credential]"
    assert API_TOKEN.encode() not in flows.read_bytes().replace(allowed.content, b"")


# mitmweb and the operator's tools


OPERATOR_RULES = {**STANDARD_RULES, "console.yaml": {"rules": [
    {"id": "console-reads-secure", "match": {"connection": "secure", "action": "read",
                                             "principal": {"subjects": ["console-operator"], "issuers": ["mitmproxy"]}},
     "effect": "allow"},
]}}


@pytest.fixture(scope="module")
def web(tmp_path_factory, servers):
    from tests.support.mitmweb import Mitmweb
    from tests.support.servers import free_port

    port = free_port()
    directory = tmp_path_factory.mktemp("web")
    gw = standard_gateway(directory, servers, runner="mitmweb", rules=OPERATOR_RULES,
                          options=(f"web_port={port}", "web_open_browser=false", "web_password=s3cret",
                                   f"save_stream_file={directory / 'saved.mitm'}")).start()
    # mitmweb exits if anything logs an error before it is running (its page's missing favicon does)
    assert gw.session(None).get("http://custody.gateway/healthz").status_code == 200
    yield gw, Mitmweb(port, "s3cret")
    gw.stop()


def flow_for(mitmweb, path: str, **match) -> dict:
    from tests.support.approvals import wait_for

    return wait_for(lambda: next((f for f in reversed(mitmweb.flows()) if f["request"]["path"] == path
                                  and all(f.get(k) == v for k, v in match.items())), None))


CREDENTIAL_FLOWS = [("http://api.test/items/web-1", API_TOKEN), ("https://api.test/items/web-2", API_TOKEN),
                    ("https://secure.test/reports/web-3", SECURE_KEY), ("http://kube.test/items/web-4", base64.b64encode(f"svc:{API_TOKEN}".encode()).decode())]


@pytest.mark.parametrize("url, secret", CREDENTIAL_FLOWS)
def test_gateway_credentials_never_show_in_mitmweb_its_dump_or_a_flow_file(web, token, mark, upstream, tls_upstream,
                                                                           url, secret):
    from tests.support.servers import Route

    gw, mitmweb = web
    path = url.split(".test", 1)[1]
    for server in (upstream, tls_upstream):  # an answer that does not echo the request's headers
        server.routes[path] = Route("application/json", b'{"ok": true}')
    r = gw.session(token(groups=["analysts"])).get(url)
    assert r.status_code == 200 and secret in json.dumps(mark()[0].headers)  # the upstream got it
    shown = flow_for(mitmweb, path, intercepted=False)
    assert "response" in shown and secret not in json.dumps(shown)
    assert "[custody: gateway credential]" in json.dumps(shown["request"]["headers"])
    assert secret.encode() not in mitmweb.dump()
    saved = (gw.dir / "saved.mitm").read_bytes()
    assert path.encode() in saved and secret.encode() not in saved
    spec = f"~u {path}$"
    for fmt in mitmweb.command("export.formats"):  # curl, httpie, raw, raw_request, raw_response
        assert secret not in mitmweb.command("export", fmt, spec)
    har = gw.dir / f"{path.strip('/').replace('/', '-')}.har"
    mitmweb.command("save.har", spec, str(har))
    assert path in har.read_text() and secret not in har.read_text()


def test_a_replay_from_mitmweb_is_the_console_operators_request(web, token, mark):
    """Replaying an agent's allowed flow: the operator has no rule for api, so it is denied,
    recorded as the operator's, and nothing reaches the upstream again."""
    gw, mitmweb = web
    assert gw.session(token(sub="agent-7", groups=["writers"])).delete("http://api.test/items/replayed").status_code == 200
    original = flow_for(mitmweb, "/items/replayed")
    mitmweb.post(f"/flows/{original['id']}/replay")
    replay = flow_for(mitmweb, "/items/replayed", is_replay="request")
    from tests.support.approvals import wait_for

    replay = wait_for(lambda: next((f for f in mitmweb.flows() if f["id"] == original["id"] and f.get("response")
                                    and f["response"]["status_code"] == 403), None))
    assert replay["is_replay"] == "request"
    assert [g.path for g in mark()] == ["/items/replayed"]  # only the agent's own request reached it
    decision = gw.wait_events("kind = 'decision' AND flow = ? AND effect = 'deny'", [original["id"]])[-1]
    assert json.loads(decision["principal"])["subject"] == "console-operator"
    assert decision["session"].startswith("console-") and decision["reason"] == "no rule matches this request"
    assert decision["connection"] == "api" and decision["action"] == "delete"


def test_a_replay_the_rules_allow_goes_with_the_gateway_credential(web, token, mark):
    gw, mitmweb = web
    assert gw.session(token(groups=["analysts"])).get("https://secure.test/reports/again").status_code == 200
    original = flow_for(mitmweb, "/reports/again")
    mitmweb.post(f"/flows/{original['id']}/replay")
    from tests.support.approvals import wait_for

    wait_for(lambda: len(mark()) == 2)
    assert [g.headers["x-api-key"] for g in mark()] == [SECURE_KEY, SECURE_KEY]
    events = gw.wait_events("kind = 'decision' AND flow = ? AND effect = 'allow'", [original["id"]])
    assert [json.loads(e["principal"])["subject"] for e in events][-1] == "console-operator"


def test_a_flow_edited_in_mitmweb_and_resumed_goes_as_the_operators_not_the_agents(web, token, mark):
    gw, mitmweb = web
    mitmweb.session.put(mitmweb.base + "/options", json={"intercept": "~q ~u /items/intercepted"}, timeout=10).raise_for_status()
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(gw.session(token(sub="agent-8", groups=["writers"])).post,
                                  "http://api.test/items/intercepted", json={"n": 1}, timeout=30)
            held = mitmweb.held("/items/intercepted")
            mitmweb.put(f"/flows/{held['id']}", {"request": {"method": "DELETE", "content": ""}})
            mitmweb.post(f"/flows/{held['id']}/resume")
            r = pending.result()
    finally:
        mitmweb.session.put(mitmweb.base + "/options", json={"intercept": ""}, timeout=10)
    assert r.status_code == 409 and r.json()["error"] == "edited_in_console"
    from tests.support.approvals import wait_for

    denied = wait_for(lambda: [e for e in gw.events("kind = 'decision' AND resource = '/items/intercepted'")
                               if json.loads(e["principal"] or "{}").get("subject") == "console-operator"])
    assert denied[-1]["effect"] == "deny"
    assert mark() == []  # neither the agent's request nor the operator's edit reached the upstream


RESPONSE_HEADER_FORMS = [b"a\r\n b", b"a\r\n\tb", b"a\x00b", b"a\rb", b"a\x1bb", b"a\x7fb", b"a\x01b"]


@pytest.mark.parametrize("value", RESPONSE_HEADER_FORMS)
def test_a_response_with_a_header_form_a_proxy_must_reject_is_not_forwarded(gateway, token, upstream, value):
    from tests.support.servers import Route

    path = f"/items/folded-{RESPONSE_HEADER_FORMS.index(value)}"
    upstream.routes[path] = Route("application/json", b'{"planted": "upstream-body-7c1"}',
                                  headers=(("X-Folded", value.decode("latin-1")),))
    r = gateway.session(token(groups=["analysts"])).get(f"http://api.test{path}")
    assert r.status_code == 502 and r.json()["error"] == "malformed_headers"
    assert "X-Folded" not in r.headers and b"upstream-body-7c1" not in r.content


@pytest.mark.parametrize("client_version", ["HTTP/1.1", "HTTP/2.0"])
def test_a_sealed_credential_is_what_mitmproxys_own_assembly_sends(client_version):
    """No HTTP/2 upstream runs here, so mitmproxy's own HTTP/1 and HTTP/2 request assembly
    (mitmproxy/proxy/layers/http/_http1.py Http1Client.send, _http2.py format_h2_request_headers)
    is called on a sealed request: both put the credential on the wire, the flow's state does not."""
    import hpack
    from mitmproxy import http as mhttp
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http._http2 import normalize_h1_headers

    from addons.credentials import SHOWN, seal

    request = mhttp.Request.make("GET", "https://api.test/items", headers={"accept": "*/*"})
    request.http_version = client_version
    seal(request, "authorization", f"Bearer {API_TOKEN}")
    wire_h1 = http1.assemble_request_head(request.copy() if request.is_http2 else request)
    wire_h2 = hpack.Encoder().encode(normalize_h1_headers(list(request.headers.fields), True))
    assert f"authorization: Bearer {API_TOKEN}".encode() in wire_h1
    assert ("authorization", f"Bearer {API_TOKEN}") in hpack.Decoder().decode(wire_h2)
    assert API_TOKEN not in json.dumps(request.get_state(), default=repr)
    assert request.headers["authorization"] == SHOWN and API_TOKEN not in repr(request.headers)
