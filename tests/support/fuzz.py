"""Malformed protocol messages for the listeners' fuzz (tests/test_limits.py): HTTP request
heads, PostgreSQL startup and frontend messages, SSH banners and packets. Each generator
takes a seeded `random.Random` and returns the bytes one client sends, so a failing case
can be found again from its seed and number. Then `send()` plays one case against a port
and returns everything the server said before it closed."""

from __future__ import annotations

import base64
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD", b"PATCH"]
ODD_METHODS = [b"CONNECT", b"PRI", b"G\x00T", b"", b"get", b"X" * 300, b"GET GET"]
TARGETS = [b"http://api.test/items", b"http://api.test/orders", b"http://api.test/admin/x", b"http://unknown.test/",
           b"http://api.test/a/../admin", b"http://api.test/%2e%2e/admin", b"http://api.test:8080/x", b"/items",
           b"http://custody.gateway/approvals", b"/approvals", b"/approvals/0123456789abcdef01234567/approve",
           b"http://secure.test/items", b"http://127.0.0.1:53/", b"http://api.test/a\\b"]
ODD_TARGETS = [b"*", b"api.test:443", b"http://[::1/", b"http://api.test:99999/", b"\xff\xfe", b"/" + b"a" * 9000, b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]
ODD_VERSIONS = [b"HTTP/2.0", b"HTTP/9.9", b"HTTP/1.1 extra", b"HTTX/1.1", b""]
FIELDS = [b"Host: api.test", b"Host: other.test", b"Host: custody.gateway", b"Host: api.test\r\nHost: other.test",
          b"Content-Length: 5", b"Transfer-Encoding: chunked", b"X-Fold: a\r\n b", b"X-Ctl: \x07\x1b",
          b"Upgrade: h2c", b"Upgrade: websocket\r\nConnection: Upgrade", b"Upgrade: SPDY/3.1", b"Expect: 100-continue",
          b"Proxy-Authorization: Basic !!!", b"Proxy-Authorization: Bearer x.y.z", b"Authorization: Bearer x.y.z",
          b"X-Custody-Task: " + b"t" * 4000, b"X-Custody-Agent: a\r\nX-Custody-Agent: b", b"Connection: close",
          b"X-Long: " + b"v" * 70000, b"Content-Type: application/json", b"Cookie: a=b"]
DEEP_ATTRIBUTES = b"x-custody." + base64.urlsafe_b64encode(b"[" * 12000 + b"]" * 12000) + b":x.y.z"
ODD_FIELDS = [b"Bad Name: x", b": no-name", b"\xc3\x28: \xc3\x28", b"Content-Length: -1", b"Content-Length: 99999999999",
              b"Content-Length: 3\r\nContent-Length: 4", b"Transfer-Encoding: gzip, chunked", b"X-Nul: a\x00b",
              # tokens that are not: other bytes, a lone dot, attributes nested past what json parses
              b"Proxy-Authorization: Bearer e\xffJ.e30.c2ln", b"Proxy-Authorization: Bearer a.b.c.d",
              b"Authorization: Bearer \xc3\xa9.e30.", b"Proxy-Authorization: Basic " + base64.b64encode(DEEP_ATTRIBUTES)]
BODIES = [b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nhello\r\n", b'{"amount": 5000}']
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CREDENTIALS = b"X-Fuzz-Credentials: here"
"""Where an HTTP case carries a valid agent's credentials: the test puts them in after the
case is made, so that the cases (their cuts and flips) do not depend on a token's length."""


def pick(rng: random.Random, usual: list[bytes], odd: list[bytes], odds: float) -> bytes:
    return rng.choice(odd if rng.random() < odds else usual)


def http_case(rng: random.Random) -> bytes:
    """One HTTP/1 request, odd in a few places: most parse, and go on to what the chain
    decides (some with a valid agent's CREDENTIALS); some break the parser; some are cut,
    flipped, piled up, or not HTTP at all."""
    shape = rng.randrange(12)
    if shape == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    if shape == 1:
        return H2_PREFACE + rng.randbytes(rng.randrange(0, 512))
    line = b" ".join([pick(rng, METHODS, ODD_METHODS, 0.15), pick(rng, TARGETS, ODD_TARGETS, 0.15),
                      pick(rng, VERSIONS, ODD_VERSIONS, 0.1)])
    fields = [pick(rng, FIELDS, ODD_FIELDS, 0.1) for _ in range(rng.randrange(0, 5))]
    if rng.random() < 0.6:
        fields.append(CREDENTIALS)
    if shape == 2:
        fields += [f"x-h{i}: v".encode() for i in range(rng.choice([90, 101, 500, 5000]))]
    if shape == 3:
        fields += [b"x-custody-" + rng.randbytes(8).hex().encode() + b": v" for _ in range(rng.randrange(50, 3000))]
    head = line + b"\r\n" + b"".join(f + b"\r\n" for f in fields)
    body = rng.choice(BODIES) if rng.random() < 0.3 else b""
    data = head + (b"\r\n" if rng.random() < 0.9 else rng.choice([b"\n", b""])) + body
    if shape == 4:  # cut anywhere
        data = data[:rng.randrange(1, len(data) + 1)]
    if shape == 5:  # flip some bytes
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        data = bytes(flipped)
    if shape == 6:  # several requests in one go
        data = data * rng.randrange(2, 5)
    return data


def pg_message(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    return kind + struct.pack("!I", len(body) + 4 if length is None else length) + body


def pg_startup(parameters: dict[bytes, bytes], version: int = 196608, length: int | None = None) -> bytes:
    body = struct.pack("!I", version) + b"".join(k + b"\0" + v + b"\0" for k, v in parameters.items()) + b"\0"
    return struct.pack("!I", len(body) + 4 if length is None else length) + body


def pg_case(rng: random.Random, token: str = "") -> bytes:
    """What a PostgreSQL client sends before and around its login: startup packets with
    wrong lengths, versions and parameters, SSL and GSSAPI requests, cancel requests,
    password messages that are not, and messages before any login."""
    good = {b"user": b"agent", b"database": b"shop"}
    shape = rng.randrange(9)
    if shape == 0:
        return rng.randbytes(rng.randrange(1, 2048))
    if shape == 1:  # a length that lies
        return pg_startup(good, length=rng.choice([0, 3, 7, 8, 9, 10001, 2**31, 2**32 - 1]))[:rng.randrange(4, 64)]
    if shape == 2:
        return pg_startup(good, version=rng.choice([0, 1, 131072, 196609, 262144, 80877103, 2**32 - 1]))
    if shape == 3:  # SSL or GSSAPI first, then junk
        return struct.pack("!II", 8, rng.choice([80877103, 80877104])) + rng.randbytes(rng.randrange(0, 300))
    if shape == 4:  # a cancel request for a session nobody has
        return struct.pack("!IIII", 16, 80877102, rng.getrandbits(32), rng.getrandbits(32))
    if shape == 5:  # parameters that are not
        body = struct.pack("!I", 196608) + rng.randbytes(rng.randrange(0, 600))
        return struct.pack("!I", len(body) + 4) + body
    if shape == 6:  # frontend messages with no login at all
        return b"".join(pg_message(rng.choice(b"QPBDESXHFpdcf").to_bytes(1, "big"), rng.randbytes(rng.randrange(0, 40)))
                        for _ in range(rng.randrange(1, 5)))
    login = pg_startup({**good, **({b"options": b"-c custody.task=" + rng.randbytes(20).hex().encode()}
                                   if rng.random() < 0.3 else {})})
    if shape == 7:  # a password message that is not one, or lies about its length
        kind = rng.choice([b"p", b"Q", b"X", b"\0"])
        return login + pg_message(kind, rng.randbytes(rng.randrange(0, 100)),
                                  length=rng.choice([None, 0, 3, 2**31, 2**28]))
    secret = (token or rng.randbytes(30).hex()).encode()  # a login the gateway refuses: nobody may connect
    return login + pg_message(b"p", secret + b"\0") + b"".join(
        pg_message(rng.choice(b"QPBESH").to_bytes(1, "big"), rng.randbytes(rng.randrange(0, 50)))
        for _ in range(rng.randrange(0, 4)))


def ssh_packet(payload: bytes, rng: random.Random, length: int | None = None) -> bytes:
    padding = rng.randbytes(rng.randrange(4, 20))
    size = len(payload) + len(padding) + 1
    return struct.pack("!IB", size if length is None else length, len(padding)) + payload + padding


def ssh_case(rng: random.Random) -> bytes:
    """An SSH client's first bytes: banners that are not, and binary packets whose lengths,
    padding and message types are wrong."""
    banner = rng.choice([b"SSH-2.0-OpenSSH_9.2p1\r\n", b"SSH-2.0-x\n", b"SSH-1.5-old\r\n", b"SSH-2.0-" + b"x" * 300 + b"\r\n",
                         b"hello\r\nSSH-2.0-late\r\n", b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-\0\r\n", b"\r\n" * 50])
    shape = rng.randrange(6)
    if shape == 0:
        return rng.randbytes(rng.randrange(1, 2048))
    if shape == 1:
        return banner
    if shape == 2:  # banner, then packets of random types and contents
        return banner + b"".join(ssh_packet(bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 200)), rng)
                                 for _ in range(rng.randrange(1, 4)))
    if shape == 3:  # a packet length that lies
        return banner + ssh_packet(b"\x14" + rng.randbytes(40), rng,
                                   length=rng.choice([0, 1, 5, 35000, 2**31, 2**32 - 1]))
    if shape == 4:  # a KEXINIT whose name-lists are junk
        lists = b"".join(struct.pack("!I", n) + rng.randbytes(min(n, 64)) for n in
                         (rng.choice([0, 4, 64, 2**20]) for _ in range(10)))
        return banner + ssh_packet(b"\x14" + rng.randbytes(16) + lists + b"\0" + b"\0\0\0\0", rng)
    return banner + rng.randbytes(rng.randrange(1, 400))


def http_responses(said: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The whole HTTP/1 responses `said` starts with: status, fields, body (a cut one is left out)."""
    out = []
    while True:
        head, sep, rest = said.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1."):
            return out
        lines = head.split(b"\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(fields[b"content-length"]) if fields.get(b"content-length", b"").isdigit() else 0
        if len(rest) < length:
            return out
        out.append((int(lines[0][9:12]) if lines[0][9:12].isdigit() else 0, fields, rest[:length]))
        said = rest[length:]


def http_answered(said: bytes) -> bool:
    """Does `said` hold a whole final (not 1xx) HTTP/1 response?"""
    return any(status >= 200 for status, _, _ in http_responses(said))


def send(port: int, data: bytes, tls_host: str | None = None, ca: str | None = None,
         answered: Callable[[bytes], bool] | None = None, quiet: float = 0.5, timeout: float = 15) -> bytes:
    """One client: connect, send `data`, and read what the server says until it closes.

    With `answered`, the client waits for a whole answer (or `quiet` seconds without one)
    before it says it is done: mitmproxy takes a client's half-close as a disconnect, and
    drops the answer. Then it half-closes, and the server ends the connection. All of it
    within `timeout` seconds: a server that keeps the client longer (by dripping, say)
    raises TimeoutError, so a case costs at most `timeout` whatever the server does."""
    deadline = time.monotonic() + timeout
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock: socket.socket = raw
    received = b""
    try:
        if tls_host is not None:
            sock = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=tls_host)
        try:
            sock.sendall(data)
            if answered is not None:
                sock.settimeout(quiet)
                try:
                    while not answered(received) and time.monotonic() < deadline and (chunk := sock.recv(65536)):
                        received += chunk
                except TimeoutError:
                    pass
                sock.settimeout(timeout)
            # the TCP half-close under TLS too (SSLSocket.shutdown would drop the TLS state,
            # and the server's last words are still to be read through it)
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except (OSError, ssl.SSLError):
            pass  # the server hung up first: read what it said
        while True:
            if (left := deadline - time.monotonic()) <= 0:
                raise TimeoutError(f"the server kept the client past {timeout:g}s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            received += chunk
    except (ssl.SSLError, ConnectionResetError):
        pass  # refused during the handshake
    finally:
        sock.close()
        raw.close()
    return received
