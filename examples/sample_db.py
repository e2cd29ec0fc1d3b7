"""A sample PostgreSQL database for the walkthrough: the upstream behind `prod-db`.

A real PostgreSQL server (initdb/pg_ctl, as the tests start one) with a `shop` database:
customers with emails, phone numbers and password hashes, and orders. The role `app` owns
it; its password is written to PASSWORD_FILE, which only the gateway reads (agents log in
to pg_bridge with their token instead).

    python examples/sample_db.py --port 5433 --password-file .custody/sample-db.password
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from examples.samples.postgres import PostgresServer  # noqa: E402

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text, phone text,
                        password_hash text, notes text);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, item text,
                     quantity int, status text DEFAULT 'open');
INSERT INTO customers (name, email, phone, password_hash, notes)
SELECT 'Customer ' || g, 'customer' || g || '@example.com', '+1 415 555 ' || lpad(g::text, 4, '0'),
       md5('pw' || g), CASE WHEN g % 10 = 0 THEN 'prefers email: customer' || g || '@example.com' END
FROM generate_series(1, 250) g;
INSERT INTO orders (customer_id, item, quantity) SELECT 1 + g % 250, 'widget', 1 + g % 7 FROM generate_series(1, 1000) g;
"""


def password(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=5433)
    p.add_argument("--password-file", type=Path, default=Path(".custody/sample-db.password"))
    args = p.parse_args()
    app_password = password(args.password_file)
    server = PostgresServer(secrets.token_urlsafe(16), port=args.port, log_statements=False)
    try:
        server.execute("CREATE DATABASE shop")
        server.execute(f"CREATE ROLE app LOGIN PASSWORD '{app_password}'")
        server.execute("ALTER DATABASE shop OWNER TO app")
        with psycopg.connect(server.dsn("shop", "app", app_password), autocommit=True) as conn:
            conn.execute(SCHEMA)
        print(f"sample database on 127.0.0.1:{args.port} (database shop, role app)", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
