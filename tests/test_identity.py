"""identity end to end: every way a token can be wrong is refused with 407/401 and a JSON
reason, recorded, and nothing reaches the upstream; good tokens work from every source."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from mitmproxy.http import Headers

from addons.engine import devissuer
from addons.engine.bridge import POSTGRES, SSH, Link, Refusal, step
from addons.engine.config import IdentityConfig, Issuer
from addons.engine.errors import Error
from addons.engine.tokens import TokenError, Verifier, well_formed
from addons.identity import proxy_credentials
from examples.samples.pki import SigningKey
from tests.conftest import standard_gateway
from tests.support.gateway import Gateway
from tests.support.servers import JwksServer


def b64(data: bytes | dict) -> str:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(issuer: str, **extra) -> dict:
    now = int(time.time())
    return {"iss": issuer, "aud": "custody", "sub": "crew-analyst", "iat": now, "exp": now + 600,
            "groups": ["analysts"], **extra}


@pytest.fixture(scope="module")
def rotating() -> JwksServer:
    """A second issuer, found through OIDC discovery, whose keys the tests rotate."""
    server = JwksServer([SigningKey("rot-a", "ES256")])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idgw(tmp_path_factory, servers, jwks, rotating) -> Gateway:
    gw = standard_gateway(
        tmp_path_factory.mktemp("identity"),
        servers,
        identity={
            "issuers": [
                {"issuer": jwks.issuer, "audience": "custody", "jwks_url": f"{jwks.url}/jwks.json", "leeway": 1},
                {"issuer": rotating.issuer, "audience": ["custody", "other"], "discovery": True, "leeway": 1},
            ],
            "max_token_bytes": 4096,
            "jwks_min_interval": "200ms",
        },
    ).start()
    yield gw
    gw.stop()


@pytest.fixture
def nothing_reached(upstream, tls_upstream):
    before = len(upstream.received), len(tls_upstream.received)
    yield
    assert (len(upstream.received), len(tls_upstream.received)) == before, "a refused request reached the upstream"


CASES = [
    ("no token", "no token: send Proxy-Authorization"),
    ("empty", "malformed credentials"),
    ("malformed", "malformed token"),
    ("three garbage parts", "malformed token"),
    ("bad signature", "bad signature"),
    ("tampered claims", "bad signature"),
    ("alg none", "algorithm 'none' is not allowed"),
    ("HS256 signed with the public key", "algorithm 'HS256' is not allowed"),
    ("EC token with an RSA key's kid", "algorithm 'ES256' does not match the signing key"),
    ("expired", "token expired"),
    ("not yet valid", "token not yet valid"),
    ("wrong issuer", "token issuer 'https://evil.example' is not trusted"),
    ("no issuer", "token has no issuer (iss)"),
    ("wrong audience", "token audience is not accepted"),
    ("no subject", "token lacks the 'sub' claim"),
    ("no expiry", "token lacks the 'exp' claim"),
    ("unknown kid", "unknown signing key id 'rsa-2'"),
    ("oversized", "token too large ({size} bytes, limit 4096)"),
    ("four parts", "malformed token"),
    ("a header that is a list", "malformed token"),
    ("an expiry too large for a time", "token expiry (exp) is not a time"),
    ("an issue time that is not a number", "token issue time (iat) is not a time"),
]


def forge(keys: dict[str, SigningKey], iss: str) -> dict[str, str | None]:
    """The token for each case in CASES."""
    rsa = keys["rsa"]
    good = rsa.token(iss).split(".")
    hs_header, hs_body = b64({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}), b64(claims(iss))
    hs_sig = b64(hmac.new(rsa.public_pem(), f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    return {
        "no token": None,
        "empty": "",
        "malformed": "not-a-jwt",
        "three garbage parts": "a.b.c",
        "bad signature": SigningKey("rsa-1", "RS256").token(iss),  # same kid, another key
        "tampered claims": f"{good[0]}.{b64(claims(iss, groups=['admins']))}.{good[2]}",
        "alg none": f"{b64({'alg': 'none', 'kid': 'rsa-1'})}.{b64(claims(iss))}.",
        "HS256 signed with the public key": f"{hs_header}.{hs_body}.{hs_sig}",
        "EC token with an RSA key's kid": keys["ec"].token(iss, headers={"kid": "rsa-1"}),
        "expired": rsa.token(iss, ttl=-60),
        "not yet valid": rsa.token(iss, nbf=int(time.time()) + 600),
        "wrong issuer": rsa.token("https://evil.example"),
        "no issuer": rsa.token(iss, iss=None),
        "wrong audience": rsa.token(iss, audience="someone-else"),
        "no subject": rsa.token(iss, sub=None),
        "no expiry": rsa.token(iss, exp=None),
        "unknown kid": keys["next"].token(iss),
        "oversized": rsa.token(iss, padding="x" * 5000),
        "four parts": f"{good[0]}.{good[1]}.{good[2]}.{good[2]}",
        "a header that is a list": f"{b64(b'[1]')}.{good[1]}.{good[2]}",
        "an expiry too large for a time": rsa.token(iss, exp=10**400),  # an int that float() cannot hold
        "an issue time that is not a number": rsa.token(iss, iat=[1]),
    }


@pytest.fixture(scope="module")
def forged(keys, jwks) -> dict[str, str | None]:
    return forge(keys, jwks.issuer)


def connect(gw: Gateway, target: str, proxy_auth: str | None) -> tuple[int, dict, bytes]:
    """A raw CONNECT, so the refusal's JSON body can be read (curl does not show it)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        auth = f"Proxy-Authorization: {proxy_auth}\r\n" if proxy_auth is not None else ""
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
        response = http.client.HTTPResponse(sock, method="CONNECT")
        response.begin()
        body = response.read(int(response.getheader("content-length", 0)))
        return response.status, dict((k.lower(), v) for k, v in response.getheaders()), body


@pytest.mark.parametrize("transport", ["http", "connect"])
@pytest.mark.parametrize("case, reason", CASES)
def test_bad_tokens_are_refused_and_recorded(idgw, forged, nothing_reached, case, reason, transport):
    token = forged[case]
    reason = reason.format(size=len(token or ""))
    if transport == "http":
        r = idgw.curl(token, "http://api.test/items")
        status, headers, body = r.status, r.headers, r.body
    else:
        auth = None if token is None else f"Bearer {token}"
        status, headers, body = connect(idgw, "api.test:443", auth)
    assert status == 407
    assert headers["proxy-authenticate"] == 'Bearer realm="custody"'
    answer = json.loads(body)
    assert answer["error"] == "unauthenticated" and answer["decision"] == "deny"
    assert answer["reason"] == reason
    recorded = idgw.event(answer["event_id"])
    assert recorded["effect"] == "deny" and recorded["reason"] == reason
    assert recorded["subject"] is None
    assert recorded["kind"] == ("decision" if transport == "http" else "connect")


@pytest.mark.parametrize(
    "how",
    ["bearer", "basic"],
)
def test_proxy_authorization_forms(idgw, token, how):
    t = token(groups=["analysts"])
    header = f"Bearer {t}" if how == "bearer" else "Basic " + base64.b64encode(f"agent:{t}".encode()).decode()
    r = idgw.curl(None, "http://api.test/items", "-H", f"Proxy-Authorization: {header}")
    assert r.status == 200, r.body


def test_identity_from_the_connect_holds_for_the_whole_tunnel(idgw, token, upstream):
    s = idgw.session(token(groups=["analysts"]))
    before = len(upstream.received)
    for n in range(3):
        assert s.get(f"https://api.test/items/{n}").status_code == 200
    assert len(upstream.received) == before + 3
    assert all("proxy-authorization" not in got.headers for got in upstream.received[before:])


def test_a_tunnel_does_not_outlive_its_token(idgw, keys, jwks):
    """The tunnel was opened with a valid token; requests after it expires are refused."""
    t = keys["rsa"].token(jwks.issuer, ttl=2)
    context = ssl.create_default_context(cafile=str(idgw.ca))
    with socket.create_connection(("127.0.0.1", idgw.port), timeout=10) as raw:
        raw.sendall(f"CONNECT api.test:443 HTTP/1.1\r\nProxy-Authorization: Bearer {t}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname="api.test") as tls:
            conn = http.client.HTTPConnection("api.test")
            conn.sock = tls
            conn.request("GET", "/items/1")
            assert conn.getresponse().read() and True
            time.sleep(3.2)  # past exp + leeway (1 s)
            conn.request("GET", "/items/2")
            late = conn.getresponse()
            assert late.status == 407
            assert json.loads(late.read())["reason"] == "token expired"


def test_es256_and_discovery_issuer(idgw, rotating, upstream):
    t = rotating.keys[0].token(rotating.issuer, audience="other")
    assert idgw.session(t).get("http://api.test/items").status_code == 200


def test_key_rotation_without_restart(idgw, rotating):
    old, new = rotating.keys[0], SigningKey("rot-b", "ES256")
    s_old = idgw.session(old.token(rotating.issuer))
    assert s_old.get("http://api.test/items").status_code == 200
    s_new = idgw.session(new.token(rotating.issuer))
    assert s_new.get("http://api.test/items").status_code == 407  # not published yet
    rotating.keys = [old, new]
    time.sleep(0.3)  # past jwks_min_interval: the next unknown kid fetches again
    assert s_new.get("http://api.test/items").status_code == 200
    # the old key is withdrawn: once the gateway sees the new set, old tokens stop working
    rotating.keys = [new]
    time.sleep(0.3)
    probe = idgw.session(SigningKey("rot-c", "ES256").token(rotating.issuer))
    assert probe.get("http://api.test/items").status_code == 407  # triggers a refresh
    r = idgw.session(old.token(rotating.issuer)).get("http://api.test/items")
    assert r.status_code == 407 and r.json()["reason"] == "unknown signing key id 'rot-a'"
    rotating.keys = [old]


def test_jwks_down_cached_keys_work_unknown_keys_fail_closed(idgw, rotating):
    known = rotating.keys[0]
    time.sleep(0.3)
    assert idgw.session(known.token(rotating.issuer)).get("http://api.test/items").status_code == 200
    rotating.down = True
    try:
        time.sleep(0.3)
        hits = rotating.hits
        assert idgw.session(known.token(rotating.issuer, sub="another")).get("http://api.test/items").status_code == 200
        r = idgw.session(SigningKey("rot-z", "ES256").token(rotating.issuer)).get("http://api.test/items")
        assert r.status_code == 407
        assert r.json()["reason"].startswith("unknown signing key id 'rot-z' (JWKS unavailable: HTTPError")
        assert rotating.hits > hits  # it did try
        # rate-limited: a burst of unknown kids fetches at most once per jwks_min_interval (200ms)
        hits, began = rotating.hits, time.monotonic()
        with ThreadPoolExecutor(20) as pool:  # at once: the burst fits in few intervals even on a busy machine
            list(pool.map(lambda n: idgw.session(SigningKey(f"rot-{n}", "ES256").token(rotating.issuer))
                          .get("http://api.test/items"), range(20)))
        windows = (time.monotonic() - began) / 0.2
        assert rotating.hits - hits <= min(1 + windows, 19)  # unlimited, each of the 20 would fetch
    finally:
        rotating.down = False


@pytest.mark.parametrize(
    "authorization, reason",
    [
        (None, "no token: send Authorization: Bearer"),
        ("Bearer not-a-jwt", "malformed token"),
        ("Bearer eyJ\xff.e30.sig", "malformed token"),  # a byte that is not UTF-8 (sent as latin-1)
        ("Basic Zm9vOmJhcg==", "no token: send Authorization: Bearer"),
    ],
)
def test_bearer_connections_answer_401(idgw, nothing_reached, authorization, reason):
    headers = {"Authorization": authorization} if authorization else {}
    r = idgw.session(None).get("https://kube.test/api/v1/pods", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="custody"'
    assert r.json()["reason"] == reason


def test_without_a_token_other_connections_refuse_the_tunnel(idgw, nothing_reached):
    status, headers, body = connect(idgw, "api.test:443", None)
    assert status == 407 and json.loads(body)["reason"] == "no token: send Proxy-Authorization"


def test_development_issuer_tokens_and_its_published_jwks(tmp_path, servers):
    gw = standard_gateway(tmp_path, servers, identity={"dev_issuer": {"enabled": True, "key_file": "dev.pem"}}).start()
    try:
        minted = gw.custody("token", "--sub", "crew-analyst", "--groups", "analysts", "--model", "gpt-4o", check=True)
        token = minted.stdout.strip()
        assert gw.session(token).get("http://api.test/items").status_code == 200
        anonymous = gw.session(None)
        discovery = anonymous.get("https://custody.gateway/.well-known/openid-configuration").json()
        assert discovery["issuer"] == "http://custody.gateway"
        assert discovery["jwks_uri"] == "http://custody.gateway/.well-known/jwks.json"
        (key,) = anonymous.get(discovery["jwks_uri"]).json()["keys"]
        claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"], audience="custody")
        assert (claims["sub"], claims["model"]) == ("crew-analyst", "gpt-4o")
        recorded = gw.events("kind = 'decision' AND subject = 'crew-analyst'")[-1]
        assert recorded["model"] == "gpt-4o" and recorded["effect"] == "allow"
    finally:
        gw.stop()


# malformed token input, case by case: a refusal with its reason, never a failure (502)


@pytest.mark.parametrize("token, shaped", [
    ("aGVhZA.Ym9keQ.c2ln", True),
    ("aGVhZA.Ym9keQ.", True),  # unsigned (alg none): refused for its algorithm, not its shape
    ("aGVhZA==.Ym9keQ.c2ln", True),  # padding PyJWT accepts
    ("", False),
    ("aGVhZA.Ym9keQ", False),
    ("aGVhZA.Ym9keQ.c2ln.c2ln", False),
    (".Ym9keQ.c2ln", False),
    ("aGVhZA..c2ln", False),
    ("aGVh ZA.Ym9keQ.c2ln", False),
    ("aGVhZA.Ym9keQ.c2ln ", False),
    ("aGVhZA.Ym9keQ.c2ln\n", False),
    ("aGVhZA.Ym9keQ.c2ln\r\nX-Custody-Task: injected", False),
    ("aGVhZA.Ym9keQ.c2l+", False),  # base64, not base64url
    ("aGVh\u00e9ZA.Ym9keQ.c2ln", False),
    ("aGVh\udcffZA.Ym9keQ.c2ln", False),  # a byte that was not UTF-8, as mitmproxy decodes it
    ("aGVhZA.Ym9keQ.c2ln\x00", False),
])
def test_only_a_token_shaped_as_a_jwt_is_well_formed(token, shaped):
    assert well_formed(token) is shaped


DEV_ISSUER = "https://dev.test"


@pytest.fixture(scope="module")
def dev_key(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dev") / "dev.pem")
    return path, devissuer.ensure_key(path), devissuer.public_jwk(devissuer.ensure_key(path))["kid"]


def signed(dev_key, header: dict | None = None, **claims) -> str:
    """A token signed by the dev issuer's key, with `claims` over good ones (None drops one)."""
    _, key, kid = dev_key
    now = int(time.time())
    payload = {"iss": DEV_ISSUER, "aud": "custody", "sub": "crew-analyst", "iat": now, "exp": now + 600,
               "groups": ["analysts"], **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm="ES256",
                      headers={"kid": kid, **(header or {})})


def unsigned(header: dict | bytes, payload: dict | bytes) -> str:
    """A token with these segments, as written (a signature PyJWT never gets to check)."""
    return f"{b64(header)}.{b64(payload)}.c2ln"


MALFORMED = {
    # not shaped as a JWT
    "bytes that are not ASCII": (lambda k: "eyJ\u00e9.e30.c2ln", "malformed token"),
    "a byte that was not UTF-8": (lambda k: "eyJ\udcff.e30.c2ln", "malformed token"),
    "a line break and a header": (lambda k: signed(k) + "\r\nX-Custody-Task: injected", "malformed token"),
    "a space inside": (lambda k: signed(k).replace(".", " .", 1), "malformed token"),
    "two segments": (lambda k: signed(k).rsplit(".", 1)[0], "malformed token"),
    "four segments": (lambda k: signed(k) + ".c2ln", "malformed token"),
    "an empty header": (lambda k: "." + signed(k).split(".", 1)[1], "malformed token"),
    "too large": (lambda k: "a" * 9000, "token too large (9000 bytes, limit 8192)"),
    # shaped as one, but what the segments hold is not
    "a header that is not JSON": (lambda k: unsigned(b"{", {}), "malformed token"),
    "a header that is a list": (lambda k: unsigned(b"[1]", {}), "malformed token"),
    "a header nested deeper than it should": (lambda k: unsigned(b"[" * 1500 + b"]" * 1500, {}), "malformed token"),
    "a payload that is a list": (lambda k: unsigned({"alg": "ES256"}, b"[1]"), "malformed token"),
    "a payload that is not UTF-8": (lambda k: unsigned({"alg": "ES256"}, b'{"iss": "\xff"}'), "malformed token"),
    "a payload number past what int() reads": (lambda k: unsigned({"alg": "ES256"}, b'{"iss": ' + b"9" * 5000 + b"}"),
                                               "malformed token"),
    "a kid that is a number": (lambda k: unsigned({"alg": "ES256", "kid": 7}, {"iss": DEV_ISSUER}), "malformed token"),
    "an alg that is a list": (lambda k: unsigned({"alg": ["ES256"]}, {"iss": DEV_ISSUER}),
                              "algorithm ['ES256'] is not allowed"),
    "an issuer that is a list": (lambda k: unsigned({"alg": "ES256"}, {"iss": [DEV_ISSUER]}),
                                 "token has no issuer (iss)"),
    # signed by the issuer, with claims of the wrong type
    "an expiry too large for a time": (lambda k: signed(k, exp=10**400), "token expiry (exp) is not a time"),
    "an expiry that is a list": (lambda k: signed(k, exp=[1]),
                                 "invalid token: Expiration Time claim (exp) must be an integer."),
    "an expiry that is not a number": (lambda k: signed(k, exp="soon"),
                                       "invalid token: Expiration Time claim (exp) must be an integer."),
    "an issue time that is an object": (lambda k: signed(k, iat={}), "token issue time (iat) is not a time"),
    "a not-before that is a list": (lambda k: signed(k, nbf=[]),
                                    "invalid token: Not Before claim (nbf) must be an integer."),
    "a subject that is a list": (lambda k: signed(k, sub=["a"]), "invalid token: Subject must be a string"),
    "a token id that is an object": (lambda k: signed(k, jti={}), "invalid token: JWT ID must be a string"),
    "an audience of numbers": (lambda k: signed(k, aud=[1]), "token audience is not accepted"),
    "groups that are not names": (lambda k: signed(k, groups=[["analysts"]]),
                                  "claim 'groups' is not a list of group names"),
    "groups nested deeply": (lambda k: signed(k, groups=json.loads("[" * 1000 + "]" * 1000)),
                             "claim 'groups' is not a list of group names"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_token_is_refused_with_its_reason_never_a_failure(dev_key, case):
    make, reason = MALFORMED[case]
    path, _, _ = dev_key
    verifier = Verifier(IdentityConfig((Issuer(DEV_ISSUER, ("custody",), key_file=path),), None))
    with pytest.raises(TokenError) as refused:
        asyncio.run(verifier.verify(make(dev_key)))
    assert str(refused.value) == reason


def test_the_verifier_table_starts_from_a_token_it_accepts(dev_key):
    path, _, _ = dev_key
    verifier = Verifier(IdentityConfig((Issuer(DEV_ISSUER, ("custody",), key_file=path),), None))
    assert asyncio.run(verifier.verify(signed(dev_key))).subject == "crew-analyst"


def basic(user: bytes, token: bytes = b"tok") -> str:
    return "Basic " + base64.b64encode(user + b":" + token).decode()


def attributes_user(document: bytes) -> bytes:
    return b"x-custody." + base64.urlsafe_b64encode(document).rstrip(b"=")


@pytest.mark.parametrize("value, credentials", [
    ("Bearer  tok ", ("tok", {})),
    ("bearer tok", ("tok", {})),
    ("Basic !!!", ("", {})),  # not base64
    ("Basic \u00e9t\u00e9", ("", {})),  # not even ASCII
    (basic(b"\xff\xfe"), ("", {})),  # a user name that is not UTF-8
    ("Digest tok", ("", {})),
    (basic(b"agent"), ("tok", {})),
    (basic(attributes_user(b'{"task": "restock"}')), ("tok", {"task": "restock"})),
    (basic(b"x-custody.!!!"), ("tok", {})),  # attributes that are not base64url
    (basic(attributes_user(b'"restock"')), ("tok", {})),  # not an object
    (basic(attributes_user(b'{"task": NaN, "agent": "a"}')), ("tok", {"task": "nan", "agent": "a"})),
    (basic(attributes_user(b"\xff")), ("tok", {})),  # not UTF-8
    (basic(attributes_user(b"[" * 30000 + b"]" * 30000)), ("tok", {})),  # nested past what json parses
    (basic(attributes_user(b'{"task": ' + b"[" * 30000 + b"]" * 30000 + b"}")), ("tok", {})),
])
def test_proxy_credentials_of_any_shape_give_a_token_or_none(value, credentials):
    assert proxy_credentials(Headers(proxy_authorization=value)) == credentials


@pytest.mark.parametrize("contract", [POSTGRES, SSH], ids=["pg_bridge", "ssh_bridge"])
@pytest.mark.parametrize("password", ["not-a-jwt", "a.b.c\r\nX-Custody-Task: injected",
                                      "a.b.c\r\n\r\nPOST http://db.prod.internal/connect HTTP/1.1", "\u00e9.b.c"])
def test_a_bridge_refuses_a_password_that_is_not_a_jwt_before_it_reaches_the_gateway(contract, password):
    with socket.socket() as unused:  # a port nothing listens on: a connection attempt would be Unreachable
        unused.bind(("127.0.0.1", 0))
        link = Link("127.0.0.1", unused.getsockname()[1])
        with pytest.raises(Refusal) as refused:
            asyncio.run(step(link, contract, "db.prod.internal", "connect", password, "s", {}))
    assert (refused.value.status, refused.value.identity, refused.value.reason) == (407, True, "custody: malformed token")
    assert refused.value.body["error"] == Error.UNAUTHENTICATED and link.writer is None
