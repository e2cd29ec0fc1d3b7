"""Masking accuracy and speed on the labelled corpus (tests/data/masking_corpus.jsonl).

In one run: Custody's masker (string leaves, triggers, Presidio and our recognizers) masks
every document, and plain Presidio (`AnalyzerEngine.analyze` over the whole serialized body,
with the same recognizers and a blank spaCy pipeline) analyses the same documents. Prints
precision and recall per entity for both, throughput (MB/s) for both, and the ratio.

    .venv/bin/python bench/masking.py [--baseline-docs 40]

Goals: >= 50x plain Presidio's throughput at equal or better recall; recall >= 0.99 on
secrets with precision >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addons.engine.detectors import Detector, pii_recognizers, secret_recognizers  # noqa: E402
from addons.engine.masks import PII_ENTITIES, SECRET_ENTITIES, Masker, parse_all  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "masking_corpus.jsonl"
ENTITIES = SECRET_ENTITIES + PII_ENTITIES
MASKS = parse_all([{"detect": ["secrets", "pii"]}])


class Recording:
    """A finder that remembers what it found, for scoring."""

    def __init__(self, detector: Detector) -> None:
        self.detector, self.found = detector, []

    def find(self, text, entities, threshold, name=""):
        findings = self.detector.find(text, entities, threshold, name)
        self.found += [(f.entity, text[f.start:f.end]) for f in findings]
        return findings


def overlaps(found: str, value: str) -> bool:
    escaped = json.dumps(value)[1:-1]
    return bool(found) and (found in value or value in found or found in escaped or escaped in found)


def score(found: list[tuple[str, str]], labels: list[dict], tally: dict) -> None:
    for label in labels:
        hit = any(e == label["entity"] and overlaps(m, label["value"]) for e, m in found)
        tally[label["entity"]]["tp" if hit else "fn"] += 1
    for entity, matched in found:
        if not any(label["entity"] == entity and overlaps(matched, label["value"]) for label in labels):
            tally[entity]["fp"] += 1


def stock_pii():
    """Presidio's own recognizers for the personal-data entities, its PhoneRecognizer included."""
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    return [EmailRecognizer(), CreditCardRecognizer(), IbanRecognizer(), PhoneRecognizer(), UsSsnRecognizer(), IpRecognizer()]


def presidio_engine(pii=pii_recognizers):
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    class BlankSpacy(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in secret_recognizers() + pii():
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(registry=registry, supported_languages=["en"],
                          nlp_engine=BlankSpacy(models=[{"lang_code": "en", "model_name": "blank"}]))


def table(name: str, tally: dict) -> dict:
    def pr(t):
        p = t["tp"] / (t["tp"] + t["fp"]) if t["tp"] + t["fp"] else 1.0
        r = t["tp"] / (t["tp"] + t["fn"]) if t["tp"] + t["fn"] else 1.0
        return p, r
    out = {}
    for group, entities in (("secrets", SECRET_ENTITIES), ("pii", PII_ENTITIES)):
        total = Counter()
        for e in entities:
            total.update(tally[e])
        out[group] = pr(total)
    out.update({e: pr(tally[e]) for e in ENTITIES})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-docs", type=int, default=160, help="documents plain Presidio analyses (it is slow)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    docs = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    size = sum(len(d["body"].encode()) for d in docs)

    detector = Detector()
    for d in docs[:4]:  # warm up imports and compiled patterns, not the per-string cache
        Masker(MASKS, detector, b"k").body(d["body"].encode(), d["content_type"])
    timings = []
    for _ in range(args.repeats):
        detector._cache.clear()
        start = time.perf_counter()
        for d in docs:
            Masker(MASKS, detector, b"k").body(d["body"].encode(), d["content_type"])
        timings.append(time.perf_counter() - start)
    ours_s = min(timings)
    ours = {e: Counter() for e in ENTITIES}
    recording = Recording(Detector())
    for d in docs:
        recording.found = []
        Masker(MASKS, recording, b"k").body(d["body"].encode(), d["content_type"])
        score(recording.found, d["labels"], ours)

    subset = docs[: args.baseline_docs]
    base_size = sum(len(d["body"].encode()) for d in subset)
    baselines = {}
    for label, pii in (("same recognizers", pii_recognizers), ("stock PII recognizers", stock_pii)):
        engine = presidio_engine(pii)
        engine.analyze("warm up", language="en")
        tally = {e: Counter() for e in ENTITIES}
        start = time.perf_counter()
        results = [engine.analyze(d["body"], language="en", entities=list(ENTITIES), score_threshold=0.5) for d in subset]
        elapsed = time.perf_counter() - start
        for d, found in zip(subset, results):
            score([(r.entity_type, d["body"][r.start:r.end]) for r in found], d["labels"], tally)
        baselines[label] = (elapsed, tally)
    base_s, base = baselines["same recognizers"]

    ours_t, base_t = table("custody", ours), table("presidio", base)
    labels = Counter(label["entity"] for d in docs for label in d["labels"])
    print(f"\nMasking: {len(docs)} documents, {size / 1e6:.2f} MB, {sum(labels.values())} planted values "
          f"(plain Presidio on {len(subset)} documents, {base_size / 1e6:.2f} MB)\n")
    print(f"{'entity':<24} {'planted':>7}   {'custody P':>9} {'R':>6}   {'presidio P':>10} {'R':>6}")
    for key in ("secrets", "pii", *ENTITIES):
        p, r = ours_t[key]
        bp, br = base_t[key]
        count = sum(labels[e] for e in (SECRET_ENTITIES if key == "secrets" else PII_ENTITIES)) if key in ("secrets", "pii") else labels[key]
        print(f"{key:<24} {count:>7}   {p:>9.3f} {r:>6.3f}   {bp:>10.3f} {br:>6.3f}")
    ours_mbs = size / ours_s / 1e6
    print(f"\nthroughput: custody {ours_mbs:.2f} MB/s")
    for label, (elapsed, tally) in baselines.items():
        mbs = base_size / elapsed / 1e6
        secrets_r, pii_r = table("", tally)["secrets"][1], table("", tally)["pii"][1]
        print(f"plain Presidio, {label:<22} {mbs:.3f} MB/s  ratio {ours_mbs / mbs:5.1f}x  "
              f"(its recall: secrets {secrets_r:.3f}, pii {pii_r:.3f})")


if __name__ == "__main__":
    main()
