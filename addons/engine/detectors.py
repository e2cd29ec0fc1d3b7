"""Content detection: Presidio recognizers for personal data, and our own for secrets.

Offline by construction: no spaCy model is loaded (recognizers are called directly, so no
NLP pipeline is needed), and tldextract, which Presidio's e-mail recognizer uses, is pinned
to the public-suffix snapshot bundled with it. When an NER model package is installed and
configured (`masking.ner_model`, e.g. `en_core_web_sm`), PERSON and LOCATION come from it.

Speed comes from not asking what cannot match: every entity has a cheap test (mostly
plain substring tests); a string no test passes is never handed to a recognizer, which is
almost every string in an API response. What does fire is checked by Presidio's own
recognizers (regex plus checksums: Luhn for cards, mod-97 for IBANs) or ours (patterns,
entropy). Strings are analysed with their field name in front ("password: hunter2…"), so
a key names the context the way a human reader would use it; matches inside the name are
dropped. As in Presidio's own context enhancer, a recognizer's context word ("phone",
"ssn") in the field name or just before a match raises its score.

This module imports Presidio and is loaded in the masking worker processes and in tools,
never on the gateway's event loop.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
import regex

os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""  # before tldextract is first imported

import tldextract.tldextract  # noqa: E402
from presidio_analyzer import (  # noqa: E402
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerResult,
)
from presidio_analyzer.predefined_recognizers import (  # noqa: E402
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
    UsSsnRecognizer,
)

from addons.engine.masks import NER_ENTITIES as NER  # noqa: E402

tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


# A name that says "secret": api_key, db-password, x_auth_token, clientSecret ... (not monkey).
SECRET_NAMES = (r"(?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_-])*"
                r"(?:api[_-]?key|apikey|access[_-]?key|secret(?:[_-]?key)?|private[_-]?key|token|password|passwd|pwd|credentials?)")


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values()) if value else 0.0


class SecretRecognizer(PatternRecognizer):
    """A pattern recognizer for one kind of secret, optionally demanding randomness.
    Case-sensitive (Presidio's default is not): token prefixes and key ids have a case."""

    def __init__(self, entity: str, patterns: list[Pattern], min_entropy: float = 0.0) -> None:
        self.min_entropy = min_entropy
        super().__init__(supported_entity=entity, patterns=patterns, name=f"custody_{entity.lower()}",
                         global_regex_flags=re.DOTALL | re.MULTILINE)

    def invalidate_result(self, pattern_text: str) -> bool:
        return self.min_entropy > 0 and entropy(pattern_text) < self.min_entropy


def secret_recognizers() -> list[EntityRecognizer]:
    P = Pattern
    return [
        SecretRecognizer("AWS_ACCESS_KEY_ID", [P("aws key id", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b", 0.95)]),
        SecretRecognizer("AWS_SECRET_ACCESS_KEY", [
            P("aws secret with name", r"(?i)(?<=aws_?secret_?(?:access_?)?key[\"'\s]{0,3}[:=][\"'\s]{0,3})[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", 0.95),
            P("aws secret shape", r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])(?=[A-Za-z0-9/+=]*[0-9])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", 0.6),
        ], min_entropy=4.0),
        SecretRecognizer("GITHUB_TOKEN", [P("github", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", 0.95)]),
        SecretRecognizer("GITLAB_TOKEN", [P("gitlab", r"\bgl(?:pat|ptt|dt|rt|cbt|oas)-[A-Za-z0-9_\-]{20,}", 0.95)]),
        SecretRecognizer("SLACK_TOKEN", [
            P("slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0.95),
            P("slack webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}", 0.95),
        ]),
        SecretRecognizer("JWT", [P("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}", 0.95)]),
        SecretRecognizer("PRIVATE_KEY", [P("pem", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", 1.0)]),
        SecretRecognizer("AUTH_CREDENTIAL", [P("bearer or basic", r"(?i)(?<=\b(?:bearer|basic)\s{1,3})[A-Za-z0-9\-._~+/]{12,}=*", 0.85)], min_entropy=3.0),
        SecretRecognizer("URL_CREDENTIAL", [P("url password", r"(?<=\b[a-zA-Z][a-zA-Z0-9+.\-]{1,20}://[^/\s:@]{1,256}:)[^/\s@]{1,256}(?=@)", 0.95)]),
        SecretRecognizer("GENERIC_SECRET", [P("named secret", r"(?i)(?<=" + SECRET_NAMES + r"[\"']?\s{0,3}[:=]\s{0,3}[\"']?)[^\s\"',;&]{8,}", 0.8)], min_entropy=3.0),
    ]


class PhoneNumbers(EntityRecognizer):
    """Phone numbers, validated by python-phonenumbers as Presidio's PhoneRecognizer does,
    but only on phone-shaped candidates and stopping at the first region that validates:
    Presidio's runs the full matcher once per region over the whole text, which is most of
    its cost on a data path."""

    CANDIDATE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)\s?|\d{2,4}[\s.\-/])\d{3,4}[\s.\-]?\d{3,4}(?![\w])")
    REGIONS = PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS if hasattr(PhoneRecognizer, "DEFAULT_SUPPORTED_REGIONS") else (
        "US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")
    SCORE = 0.4  # Presidio's: a number alone is weak evidence; context raises it

    def __init__(self) -> None:
        super().__init__(supported_entities=["PHONE_NUMBER"], name="custody_phone", context=list(PhoneRecognizer.CONTEXT))

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        results = []
        for m in self.CANDIDATE.finditer(text):
            for region in self.REGIONS:
                try:
                    number = phonenumbers.parse(m.group(), region)
                except phonenumbers.NumberParseException:
                    continue
                if phonenumbers.is_valid_number(number):
                    results.append(RecognizerResult("PHONE_NUMBER", m.start(), m.end(), self.SCORE))
                    break
        return results


class EmailAddresses(EmailRecognizer):
    """Presidio's e-mail recognizer, with its domain check (tldextract: does the host end in
    a public suffix?) kept per domain: a response holds many addresses at few domains, and
    the check is most of the recognizer's cost. Without URL syntax in the match,
    tldextract's host of "local@domain" is the domain itself, so the answer is the same; a
    match with URL syntax is checked whole, as Presidio does."""

    URL_SYNTAX = re.compile(r"[/?#:\[]")

    def validate_result(self, pattern_text: str) -> bool:
        if self.URL_SYNTAX.search(pattern_text):
            return super().validate_result(pattern_text)
        return _has_public_suffix(pattern_text.rpartition("@")[2])


@functools.lru_cache(maxsize=4096)
def _has_public_suffix(domain: str) -> bool:
    return tldextract.extract(domain).fqdn != ""


def pii_recognizers() -> list[EntityRecognizer]:
    return [EmailAddresses(), CreditCardRecognizer(), IbanRecognizer(), PhoneNumbers(), UsSsnRecognizer(), IpRecognizer()]


class Compiled:
    """A Presidio PatternRecognizer run without the per-call bookkeeping (explanations,
    timing, metadata) that dominates its cost on short strings. The recognizer supplies
    everything that decides a result: its patterns and scores, its flags, and its
    validate_result / invalidate_result (checksums, entropy), applied as Presidio does."""

    def __init__(self, recognizer: PatternRecognizer) -> None:
        self.recognizer = recognizer
        self.entity = recognizer.supported_entities[0]
        self.context = recognizer.context
        self.patterns = [(regex.compile(p.regex, flags=recognizer.global_regex_flags), p.score)
                         for p in recognizer.patterns]

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:
        best: dict[tuple[int, int], float] = {}
        for compiled, score in self.patterns:
            for m in compiled.finditer(text):
                start, end = m.span()
                if start == end:
                    continue
                matched = text[start:end]
                valid = self.recognizer.validate_result(matched)
                if valid is not None:
                    score = EntityRecognizer.MAX_SCORE if valid else EntityRecognizer.MIN_SCORE
                if self.recognizer.invalidate_result(matched):
                    score = EntityRecognizer.MIN_SCORE
                if score > EntityRecognizer.MIN_SCORE and score > best.get((start, end), -1):
                    best[(start, end)] = score
        return [RecognizerResult(self.entity, s, e, score) for (s, e), score in best.items()]


# A cheap scan per entity: where it finds nothing, that entity cannot be. The scans are
# plain regular expressions, mostly literals; only the recognizers of entities whose scan
# finds something run on a string. Each is a superset of what its recognizer's patterns
# can match, and no wider than needed: a scan that fires on technical values (timestamps,
# UUIDs, hashes) costs a recognizer run on every one of them.
AWS_SECRET_SHAPE = (r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])(?=[A-Za-z0-9/+=]*[0-9])"
                    r"[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
SCANS = {
    "EMAIL_ADDRESS": (r"@",),
    "AWS_ACCESS_KEY_ID": (r"AKIA|ASIA|ABIA|ACCA|A3T",),
    "GITHUB_TOKEN": (r"gh[pousr]_", r"github_pat_"),
    "GITLAB_TOKEN": (r"gl(?:pat|ptt|dt|rt|cbt|oas)-",),
    "SLACK_TOKEN": (r"xox[abposr]-", r"hooks\.slack\.com"),
    "JWT": (r"eyJ",),
    "PRIVATE_KEY": (r"PRIVATE KEY-----",),
    "URL_CREDENTIAL": (r"://",),
    # the recognizer's own pattern without its word boundaries: groups of 3 to 5 digits, so
    # Amex's 4-6-5 ("3782 822463 10005") too; not a 13-digit number starting with 1 (epoch ms)
    "CREDIT_CARD": (r"(?!1\d{12}(?!\d))[13456]\d{3}[- ]?\d{3,4}[- ]?\d{3,4}[- ]?\d{3,5}",),
    "IBAN_CODE": (r"[A-Z]{2}\d{2} ?[A-Z0-9]{4}",),
    # the part of PhoneNumbers.CANDIDATE every match has (not "+\d": "+02:00" ends timestamps)
    "PHONE_NUMBER": (r"\(\d{2,4}\)", r"\d{2,4}[\s.\-/]\d{3,4}[\s.\-]?\d{3,4}"),
    "US_SSN": (r"\d{3}[- .]\d{2}[- .]\d{4}",),
    # every IPv6 form Presidio matches has "::" or six groups ("h:h:h:h:h:h:" before a last
    # group or an IPv4 tail); a time of day ("12:34:56") has neither
    "IP_ADDRESS": (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", r"::|(?:[0-9A-Fa-f]{1,4}:){6}"),
    # the unnamed shape exactly as the recognizer has it (hex hashes have no capitals)
    "AWS_SECRET_ACCESS_KEY": (AWS_SECRET_SHAPE,),
}
# Scanned in lower-cased text: literals run much faster than case-insensitive patterns.
LOWER_SCANS = {
    "AUTH_CREDENTIAL": (r"bearer|basic",),
    "GENERIC_SECRET": (r"key|secret|token|passw|pwd|credential",),
    "AWS_SECRET_ACCESS_KEY": (r"aws_?secret_?(?:access_?)?key",),  # the named form: any 40 characters after it
}
GATES: dict[str, Callable[[str], bool]] = {
    # What a string must have for a scan to match it, tested first: a count of characters
    # costs a fraction of a regular expression's search, and most strings fail one.
    SCANS["IP_ADDRESS"][0]: lambda s: s.count(".") >= 3,
    SCANS["IP_ADDRESS"][1]: lambda s: s.count(":") >= 2,
    SCANS["US_SSN"][0]: lambda s: s.count("-") + s.count(" ") + s.count(".") >= 2,
    SCANS["PHONE_NUMBER"][0]: lambda s: "(" in s,
    SCANS["IBAN_CODE"][0]: lambda s: not s.islower(),  # [A-Z]: no capital in an all-lower-case string
    AWS_SECRET_SHAPE: lambda s: len(s) >= 40,
}
"""For some scans, a necessary condition (a test checks each against its scan)."""
SCANNERS = tuple((e, re.compile(p), GATES.get(p)) for e, ps in SCANS.items() for p in ps)
LOWER_SCANNERS = tuple((e, re.compile(p)) for e, ps in LOWER_SCANS.items() for p in ps)
LOWER_SCANNERS_UNICODE = tuple((e, re.compile(scan.pattern, re.IGNORECASE)) for e, scan in LOWER_SCANNERS)


def candidates(subject: str) -> set[str]:
    """The entities that could be in `subject` (a superset: recognizers decide)."""
    found: set[str] = set()
    for e, scan, gate in SCANNERS:
        if e not in found and (gate is None or gate(subject)) and scan.search(subject):
            found.add(e)
    if subject.isascii():  # lower-casing keeps positions only for ASCII
        lower = subject.lower()
        for e, scan in LOWER_SCANNERS:
            if e not in found and scan.search(lower):
                found.add(e)
    else:
        for e, scan in LOWER_SCANNERS_UNICODE:
            if e not in found and scan.search(subject):
                found.add(e)
    return found


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    entity: str
    score: float


class Detector:
    """Finds entities in strings; one per process, with a cache of recent answers."""

    CACHE_SIZE = 20000

    def __init__(self, ner_model: str | None = None) -> None:
        self.by_entity: dict[str, list] = {}
        for recognizer in secret_recognizers() + pii_recognizers():
            runner = Compiled(recognizer) if isinstance(recognizer, PatternRecognizer) else recognizer
            for entity in recognizer.supported_entities:
                self.by_entity.setdefault(entity, []).append(runner)
        self.nlp = None
        if ner_model:
            import spacy
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer

            engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": ner_model}])
            engine.nlp = {"en": spacy.load(ner_model)}  # never spacy.cli.download
            self.nlp = engine
            ner = SpacyRecognizer(supported_entities=list(NER))
            for entity in NER:
                self.by_entity[entity] = [ner]
        self._cache: OrderedDict[tuple, list[Finding]] = OrderedDict()

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(self.by_entity)

    def find(self, text: str, entities: frozenset[str], threshold: float, name: str = "") -> list[Finding]:
        """Entities in `text` scoring at least `threshold`; `name` is the field it came from."""
        key = (text, name, entities, threshold)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        findings = self._find(text, entities, threshold, name)
        self._cache[key] = findings
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return findings

    def _find(self, text: str, entities: frozenset[str], threshold: float, name: str) -> list[Finding]:
        prefix = f"{name}: " if name else ""
        subject = prefix + text
        wanted = [e for e in entities if e in NER] + sorted(candidates(subject) & entities)
        if not wanted:
            return []
        artifacts = self.nlp.process_text(subject, "en") if self.nlp and any(e in NER for e in wanted) else None
        found: list[Finding] = []
        seen: set[int] = set()
        for entity in wanted:
            for recognizer in self.by_entity.get(entity, ()):
                if id(recognizer) in seen and entity not in NER:
                    continue
                seen.add(id(recognizer))
                words = [w.lower() for w in (recognizer.context or ())]
                for r in recognizer.analyze(subject, [entity], artifacts):
                    start, end = r.start - len(prefix), r.end - len(prefix)
                    score = min(1.0, r.score + CONTEXT_BOOST) if words and _in_context(subject, r.start, words) else r.score
                    if r.entity_type in entities and score >= threshold and end > 0:
                        found.append(Finding(max(start, 0), end, r.entity_type, score))
        return resolve(found)


CONTEXT_BOOST = 0.35  # what Presidio's context enhancer adds when a context word is near
CONTEXT_WINDOW = 48


def _in_context(subject: str, start: int, words: list[str]) -> bool:
    """A recognizer's context word ("phone", "ssn", ...) in the field name or just before."""
    window = subject[max(0, start - CONTEXT_WINDOW):start].lower()
    return any(w in window for w in words)


def resolve(findings: list[Finding]) -> list[Finding]:
    """Non-overlapping findings, preferring higher scores, then longer spans."""
    chosen: list[Finding] = []
    for f in sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start)):
        if all(f.end <= c.start or f.start >= c.end for c in chosen):
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.start)


