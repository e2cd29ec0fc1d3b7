"""Content detection on its own: the cheap scans that decide which recognizers run must
never hide a value a recognizer would find, and should not wake recognizers for the
technical values every response is full of."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from addons.engine import detectors
from addons.engine.detectors import Detector, EmailAddresses, candidates
from addons.engine.masks import PII_ENTITIES, SECRET_ENTITIES, Masker, parse_all

CORPUS = Path(__file__).parent / "data" / "masking_corpus.jsonl"
ENTITIES = frozenset(SECRET_ENTITIES + PII_ENTITIES)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(None)


def subjects(detector: Detector) -> list[tuple[str, str]]:
    """Every string the masker asks about in the corpus, with the field it came from."""
    asked: list[tuple[str, str]] = []

    class Asking:
        def find(self, text, entities, threshold, name=""):
            asked.append((text, name))
            return detector.find(text, entities, threshold, name)

    masks = parse_all([{"detect": ["secrets", "pii"]}])
    for line in CORPUS.read_text().splitlines():
        doc = json.loads(line)
        Masker(masks, Asking(), b"k").body(doc["body"].encode(), doc["content_type"])
    return asked


def test_the_scans_change_no_finding_on_the_corpus(monkeypatch):
    asked = subjects(Detector(None))
    scanned = Detector(None)
    found = [scanned.find(text, ENTITIES, 0.5, name) for text, name in asked]
    monkeypatch.setattr(detectors, "candidates", lambda subject: set(ENTITIES))  # every recognizer on every string
    unscanned = Detector(None)
    assert found == [unscanned.find(text, ENTITIES, 0.5, name) for text, name in asked]
    assert sum(map(len, found)) > 2000  # the corpus plants 2,483 values


@pytest.mark.parametrize(
    "name, value, entity",
    [
        ("", "2001:db8::1", "IP_ADDRESS"),
        ("", "fe80::1ff:fe23:4567:890a%eth0", "IP_ADDRESS"),
        ("", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IP_ADDRESS"),
        ("", "::ffff:192.0.2.128", "IP_ADDRESS"),
        ("", "0:0:0:0:0:ffff:192.0.2.128", "IP_ADDRESS"),
        ("", "64:ff9b::192.0.2.33", "IP_ADDRESS"),
        ("", "::1", "IP_ADDRESS"),
        ("", "1::", "IP_ADDRESS"),
        ("", "10.1.2.3", "IP_ADDRESS"),
        ("", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY"),
        ("", "aws_secret_access_key=wjalrxutnfemi/k7mdeng/bpxrficyexamplekey", "AWS_SECRET_ACCESS_KEY"),
        ("", "AWS_SECRET_KEY: '0123456789abcdefghijklmnopqrstuvwxyz/+=A'", "AWS_SECRET_ACCESS_KEY"),
        ("phone", "+1 212 717 6491", "PHONE_NUMBER"),
        ("phone", "(212) 717-6491", "PHONE_NUMBER"),
        ("phone", "030 12345678", "PHONE_NUMBER"),
        ("", "goran.tanaka77@mail.de", "EMAIL_ADDRESS"),
        ("", "4111 1111 1111 1111", "CREDIT_CARD"),
        ("", "3782 822463 10005", "CREDIT_CARD"),  # Amex's own grouping
        ("", "4222 222 222 222", "CREDIT_CARD"),
        ("", "6011-0009-9013-9424", "CREDIT_CARD"),
    ],
)
def test_each_spelling_is_scanned_and_found(detector, name, value, entity):
    assert entity in candidates(f"{name}: {value}" if name else value)
    assert [f.entity for f in detector.find(value, frozenset({entity}), 0.5, name)] == [entity]


@pytest.mark.parametrize(
    "value",
    [
        "2026-02-16T04:03:15Z",
        "2026-02-16T04:03:15+02:00",
        "2026-02-16 04:03:15,123 INFO took 1234 ms",
        "12:34:56",
        "Tue, 01 Dec 2026 23:59:59 GMT",
        "f6466d5f-0b8e-6510-4e69-c4e0b822b63b",
        "da39a3ee5e6b4b0d3255bfef95601890afd80709",  # sha1
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # sha256
        "registry.local/app:v1.23.37",
        "order-7343222",
        "1764633600123",  # epoch milliseconds
    ],
)
def test_technical_values_wake_no_recognizer(value):
    assert candidates(value) == set()


@pytest.mark.parametrize(
    "text",
    [
        "goran.tanaka77@mail.de",
        "lena.silva57@example.co.uk",
        "ops@localhost.localdomain",
        "someone@no-such-suffix.invalidtld",
        "first.last@sub.domain.example.com",
        "a/b@mail.de",
        "a?b@mail.de",
        "a#b@mail.de",
        "user@x.co.uk",
        "user@dyndns.org",
        "user@192.168.1.1",
    ],
)
def test_the_kept_domain_check_answers_as_presidios_own(text):
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    assert EmailAddresses().validate_result(text) == EmailRecognizer().validate_result(text)


def strings_near_every_scan(count: int) -> list[str]:
    """Random strings of the characters the gated scans are made of, with a fixed seed."""
    rng = random.Random(7)
    alphabet = "0123456789....::::--  ()AZaz/+=é٣"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 48))) for _ in range(count)]


@pytest.mark.parametrize("pattern", list(detectors.GATES), ids=[p[:30] for p in detectors.GATES])
def test_a_scan_gate_refuses_no_string_its_scan_would_match(pattern):
    scan, gate = re.compile(pattern), detectors.GATES[pattern]
    strings = [text for text, _ in subjects(Detector(None))] + strings_near_every_scan(20000) + [
        "1.2.3.4", "::", "1:2:3:4:5:6:", "123-45-6789", "123 45 6789", "123.45.6789", "(212)", "DE89 3704",
        "x" * 39 + "A", "A1" * 20, "0" * 40,
    ]
    matched = [s for s in strings if scan.search(s)]
    assert matched and all(gate(s) for s in matched), [s for s in matched if not gate(s)][:5]
