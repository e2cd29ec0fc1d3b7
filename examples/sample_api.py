"""A small inventory API for the walkthrough: the upstream behind the `sample-api` connection.

It only answers requests that carry the credential the gateway holds (from --token-file),
so a request that did not come through Custody gets 401.

    python examples/sample_api.py --port 8081 --token-file .custody/sample-api.token
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEMS = {
    1: {"id": 1, "name": "bolt M6", "quantity": 1200, "supplier_email": "sales@boltco.example"},
    2: {"id": 2, "name": "nut M6", "quantity": 800, "supplier_email": "orders@nutsandco.example"},
    3: {"id": 3, "name": "washer 6mm", "quantity": 5000, "supplier_email": "hello@washers.example"},
}
ORDER_IDS = itertools.count(1001)


class Handler(BaseHTTPRequestHandler):
    token = ""

    def _send(self, status: int, document: object | None = None) -> None:
        body = b"" if document is None else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        expected = f"Bearer {self.token}"
        if hmac.compare_digest(self.headers.get("authorization", ""), expected):
            return True
        self._send(401, {"error": "missing or wrong credential"})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["items"]:
            self._send(200, list(ITEMS.values()))
        elif len(parts) == 2 and parts[0] == "items" and parts[1].isdigit() and int(parts[1]) in ITEMS:
            self._send(200, ITEMS[int(parts[1])])
        elif parts[:1] == ["admin"]:
            self._send(200, {"users": ["root"]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        length = int(self.headers.get("content-length", 0))
        try:
            order = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"error": "body is not JSON"})
            return
        if self.path.split("?")[0] != "/orders":
            self._send(404, {"error": "not found"})
            return
        self._send(201, {"order_id": next(ORDER_IDS), **order})

    def do_DELETE(self) -> None:
        if self._authorised():
            self._send(204)

    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token-file", required=True)
    args = parser.parse_args()
    with open(args.token_file) as fh:
        Handler.token = fh.read().strip()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"sample API listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
