"""Builds tests/data/masking_corpus.jsonl: a labelled corpus for measuring masking.

Seeded, so the committed file can be rebuilt byte for byte:

    .venv/bin/python tests/data/make_corpus.py

Each line is one response: {"kind", "content_type", "body", "labels": [{"entity", "value"}],
"negatives": [value, ...]}. Labels are planted secrets and personal data with valid formats
(Luhn-valid cards, mod-97-valid IBANs, real-looking tokens); negatives are values that look
technical but are not sensitive (UUIDs, hashes, timestamps, ids) and must not be masked.
"""

from __future__ import annotations

import base64
import json
import random
import string
from pathlib import Path

OUT = Path(__file__).parent / "masking_corpus.jsonl"
R = random.Random(20261129)
ALNUM = string.ascii_letters + string.digits
FIRST = ["ana", "bo", "chen", "dana", "eli", "farah", "goran", "hana", "ivan", "jo", "kofi", "lena", "mei", "noor"]
LAST = ["okafor", "silva", "novak", "tanaka", "moreau", "haddad", "kowalski", "nguyen", "berg", "costa"]
DOMAINS = ["gmail.com", "acme-corp.com", "northwind.io", "example.co.uk", "mail.de", "contoso.org"]


def rand(alphabet: str, n: int) -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


def luhn_card(prefix: str = "4", length: int = 16) -> str:
    digits = prefix + rand(string.digits, length - len(prefix) - 1)
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2 == 0:
            n *= 2
            n -= 9 if n > 9 else 0
        total += n
    number = digits + str((10 - total % 10) % 10)
    return " ".join(number[i:i + 4] for i in range(0, 16, 4)) if R.random() < 0.5 else number


def bad_luhn(n: int = 16) -> str:
    while True:
        s = rand(string.digits, n)
        total = sum(int(d) * (2 if i % 2 else 1) - (9 if int(d) * (2 if i % 2 else 1) > 9 else 0)
                    for i, d in enumerate(reversed(s)))
        if total % 10:
            return s


def iban() -> str:
    country, bban = R.choice([("DE", rand(string.digits, 18)), ("GB", "NWBK" + rand(string.digits, 14)),
                              ("FR", rand(string.digits, 23))])
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


def email() -> str:
    return f"{R.choice(FIRST)}.{R.choice(LAST)}{R.randint(1, 99)}@{R.choice(DOMAINS)}"


def phone() -> str:
    area = R.choice(["212", "415", "646", "312", "617"])
    exchange = R.randint(200, 989)
    if exchange == 555:
        exchange = 556
    return R.choice([f"+1 {area}-{exchange}-{R.randint(1000, 9999)}", f"({area}) {exchange}-{R.randint(1000, 9999)}",
                     f"+1 {area} {exchange} {R.randint(1000, 9999)}"])


def ssn() -> str:
    return f"{R.randint(100, 665):03d}-{R.randint(10, 99):02d}-{R.randint(1000, 9999):04d}"


def ip() -> str:
    return f"{R.randint(11, 190)}.{R.randint(1, 254)}.{R.randint(1, 254)}.{R.randint(1, 254)}"


def jwt() -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    sig = base64.urlsafe_b64encode(R.randbytes(32)).rstrip(b"=").decode()
    return f"{enc({'alg': 'RS256', 'typ': 'JWT'})}.{enc({'sub': rand(ALNUM, 8), 'exp': R.randint(1_700_000_000, 1_900_000_000)})}.{sig}"


def pem() -> str:
    lines = [base64.b64encode(R.randbytes(48)).decode() for _ in range(5)]
    kind = R.choice(["", "RSA ", "EC "])
    return f"-----BEGIN {kind}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {kind}PRIVATE KEY-----"


def aws_secret() -> str:
    while True:
        s = rand(ALNUM + "/+", 40)
        if any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s):
            return s


SECRET_MAKERS = {
    "AWS_ACCESS_KEY_ID": lambda: "AKIA" + rand(string.ascii_uppercase + "234567", 16),
    "GITHUB_TOKEN": lambda: R.choice(["ghp_", "gho_", "ghs_"]) + rand(ALNUM, 36),
    "GITLAB_TOKEN": lambda: "glpat-" + rand(ALNUM + "_-", 20),
    "SLACK_TOKEN": lambda: f"xoxb-{R.randint(10**11, 10**12)}-{R.randint(10**11, 10**12)}-{rand(ALNUM, 24)}",
    "JWT": jwt,
    "PRIVATE_KEY": pem,
}


def negatives() -> list[str]:
    return [
        f"{R.getrandbits(128):032x}",
        "-".join(f"{R.getrandbits(b):0{b // 4}x}" for b in (32, 16, 16, 16, 48)),
        f"{R.getrandbits(160):040x}",
        f"2026-{R.randint(1, 12):02d}-{R.randint(1, 28):02d}T{R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}Z",
        f"order-{R.randint(10**6, 10**7)}",
        f"v{R.randint(0, 9)}.{R.randint(0, 30)}.{R.randint(0, 99)}",
        str(R.randint(10**8, 10**9 - 1)),
        bad_luhn(),
        rand(string.ascii_lowercase, 12),
    ]


def json_users(doc_id: int) -> dict:
    labels, negs, users = [], [], []
    for i in range(R.randint(5, 40)):
        u = {"id": R.randint(1, 10**6), "uuid": (n := negatives())[1], "created": n[3], "status": R.choice(["active", "invited"]),
             "name": f"{R.choice(FIRST).title()} {R.choice(LAST).title()}", "order": n[4], "build": n[5]}
        negs += [n[1], n[3], n[4], n[5]]
        if R.random() < 0.5:
            u["email"] = email()
            labels.append({"entity": "EMAIL_ADDRESS", "value": u["email"]})
        if R.random() < 0.2:
            u["phone"] = phone()
            labels.append({"entity": "PHONE_NUMBER", "value": u["phone"]})
        if R.random() < 0.1:
            u["card"] = luhn_card()
            labels.append({"entity": "CREDIT_CARD", "value": u["card"]})
        if R.random() < 0.1:
            u["iban"] = iban()
            labels.append({"entity": "IBAN_CODE", "value": u["iban"]})
        if R.random() < 0.05:
            u["ssn"] = ssn()
            labels.append({"entity": "US_SSN", "value": u["ssn"]})
        if R.random() < 0.1:
            u["last_login_ip"] = ip()
            labels.append({"entity": "IP_ADDRESS", "value": u["last_login_ip"]})
        if R.random() < 0.15:
            u["notes"] = f"ref {n[0]} checksum {n[2]} id {n[6]} account {n[7]}"
            negs += [n[0], n[2], n[6], n[7]]
        users.append(u)
    return {"kind": "json", "content_type": "application/json",
            "body": json.dumps({"page": doc_id, "users": users}), "labels": labels, "negatives": negs}


def json_config(doc_id: int) -> dict:
    labels, negs = [], []
    doc: dict = {"service": f"svc-{doc_id}", "replicas": R.randint(1, 9), "image": f"registry.local/app:{negatives()[5]}"}
    for entity, make in SECRET_MAKERS.items():
        if R.random() < 0.5:
            value = make()
            doc[f"{entity.lower()}_{doc_id}"] = value
            labels.append({"entity": entity, "value": value})
    if R.random() < 0.5:
        secret = aws_secret()
        doc["aws_secret_access_key"] = secret
        labels.append({"entity": "AWS_SECRET_ACCESS_KEY", "value": secret})
    if R.random() < 0.6:
        password = rand(ALNUM + "!#%", 14)
        doc["database_url"] = f"postgres://svc_{doc_id}:{password}@db-{doc_id}.internal:5432/app"
        labels.append({"entity": "URL_CREDENTIAL", "value": password})
    if R.random() < 0.5:
        token = rand(ALNUM + "-._", 32)
        doc["upstream_headers"] = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        labels.append({"entity": "AUTH_CREDENTIAL", "value": token})
    if R.random() < 0.5:
        value = rand(ALNUM, 24)
        doc["env"] = ["LOG_LEVEL=info", f"API_KEY={value}", "REGION=eu-west-1"]
        labels.append({"entity": "GENERIC_SECRET", "value": value})
    if R.random() < 0.5:
        value = rand(ALNUM + "-_", 28)
        doc["client_secret"] = value
        labels.append({"entity": "GENERIC_SECRET", "value": value})
    n = negatives()
    doc["checksum"], doc["release"], doc["deployed"] = n[2], n[1], n[3]
    negs += [n[2], n[1], n[3]]
    return {"kind": "json", "content_type": "application/json", "body": json.dumps(doc), "labels": labels, "negatives": negs}


def sql_rows(doc_id: int) -> dict:
    labels, negs, rows = [], [], []
    for _ in range(R.randint(10, 60)):
        n = negatives()
        row = [R.randint(1, 10**6), n[1], email() if R.random() < 0.6 else None, n[3], R.choice(["paid", "open"]),
               luhn_card() if R.random() < 0.1 else n[7]]
        if row[2]:
            labels.append({"entity": "EMAIL_ADDRESS", "value": row[2]})
        if row[5] != n[7]:
            labels.append({"entity": "CREDIT_CARD", "value": row[5]})
        else:
            negs.append(n[7])
        negs += [n[1], n[3]]
        rows.append(row)
    return {"kind": "sql", "content_type": "application/json",
            "body": json.dumps({"columns": ["id", "uuid", "email", "created_at", "state", "card"], "rows": rows}),
            "labels": labels, "negatives": negs}


def log_text(doc_id: int) -> dict:
    labels, negs, lines = [], [], []
    for _ in range(R.randint(20, 80)):
        n = negatives()
        roll = R.random()
        if roll < 0.05:
            token = SECRET_MAKERS["GITHUB_TOKEN"]()
            lines.append(f"{n[3]} WARN git push with token {token} failed for {n[4]}")
            labels.append({"entity": "GITHUB_TOKEN", "value": token})
        elif roll < 0.1:
            key = SECRET_MAKERS["AWS_ACCESS_KEY_ID"]()
            lines.append(f"{n[3]} INFO assumed role with access key {key}")
            labels.append({"entity": "AWS_ACCESS_KEY_ID", "value": key})
        elif roll < 0.15:
            password = rand(ALNUM, 16)
            lines.append(f"{n[3]} DEBUG connecting to mysql://app:{password}@10.0.0.7:3306/shop")
            labels.append({"entity": "URL_CREDENTIAL", "value": password})
            labels.append({"entity": "IP_ADDRESS", "value": "10.0.0.7"})
        elif roll < 0.2:
            address = email()
            lines.append(f"{n[3]} INFO sent receipt for {n[4]} to {address}")
            labels.append({"entity": "EMAIL_ADDRESS", "value": address})
        elif roll < 0.23:
            value = SECRET_MAKERS["SLACK_TOKEN"]()
            lines.append(f"{n[3]} ERROR slack notify failed token={value}")
            labels.append({"entity": "SLACK_TOKEN", "value": value})
        else:
            lines.append(f"{n[3]} INFO request {n[1]} took {R.randint(1, 900)}ms build {n[5]} sha {n[2]}")
            negs += [n[1], n[5], n[2]]
    return {"kind": "log", "content_type": "text/plain", "body": "\n".join(lines) + "\n", "labels": labels,
            "negatives": negs}


def main() -> None:
    docs = []
    for i in range(40):
        docs += [json_users(i), json_config(i), sql_rows(i), log_text(i)]
    with OUT.open("w") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    labels = sum(len(d["labels"]) for d in docs)
    print(f"{OUT}: {len(docs)} documents, {sum(len(d['body']) for d in docs)} bytes, {labels} labels")


if __name__ == "__main__":
    main()
