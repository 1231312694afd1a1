"""
What the masking stage looks for: detectors, and the two built-in profiles.

Pure: no mitmproxy import. A `Detector` is an RE2 pattern (linear time: no
input can make it backtrack) with an optional validator for values that
carry a checksum (Luhn for card numbers, mod-97 for IBANs, the SSA's ranges
for US social security numbers), so innocent look-alikes (order numbers,
UUIDs, hex digests, timestamps, version strings) are left alone. A pattern
may name the part to mask with a group `(?P<v>...)` (`password=` stays,
the password goes); otherwise the whole match is the value.

Two profiles exist without any declaration: `secrets` (private keys, cloud
and SaaS tokens, JWTs, bearer and basic credentials, passwords in
connection strings and assignments, card numbers) and `pii` (all of
`secrets` plus e-mail addresses, phone numbers, IBANs and US SSNs). A
ruleset's `masking:` section may add detectors and profiles and redefine
these two (see `core.rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import re2

STYLES = ("redact", "partial", "hash")


class PatternError(ValueError):
    """A pattern the linear-time engine cannot compile."""


def _options() -> re2.Options:
    opts = re2.Options()
    opts.log_errors = False
    opts.max_mem = 64 << 20
    return opts


def compile_pattern(pattern: str | bytes, *, ignore_case: bool = False) -> re2._Regexp:
    """Compile with RE2 (linear time); PatternError says why it cannot be."""
    opts = _options()
    opts.case_sensitive = not ignore_case
    try:
        return re2.compile(pattern, opts)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"not a pattern the linear-time engine (RE2) accepts: {reason}") from None


# --- validators ----------------------------------------------------------------


def _digits(value: str) -> str:
    return "".join(c for c in value if c.isdigit())


def luhn(value: str) -> bool:
    digits = _digits(value)
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_number(value: str) -> bool:
    """A payment card number: 13 to 19 digits, a known issuer prefix and length, and the Luhn checksum."""
    d = _digits(value)
    n = len(d)
    if not 13 <= n <= 19 or len(set(d)) == 1:
        return False
    groups = value.replace("-", " ").split()
    if len(groups) > 1 and min(map(len, groups[:-1])) < 3:
        return False  # cards are written in groups of four (4-6-5 for Amex), not digit by digit
    two, three, four = int(d[:2]), int(d[:3]), int(d[:4])
    known = (
        (d[0] == "4" and n in (13, 16, 19))  # Visa
        or ((51 <= two <= 55 or 2221 <= four <= 2720) and n == 16)  # Mastercard
        or (two in (34, 37) and n == 15)  # American Express
        or ((d.startswith("6011") or two == 65 or 644 <= three <= 649) and 16 <= n <= 19)  # Discover
        or (3528 <= four <= 3589 and 16 <= n <= 19)  # JCB
        or ((300 <= three <= 305 or two in (36, 38)) and n == 14)  # Diners Club
        or (d[:2] in ("50", "56", "57", "58", "63", "67") and 12 <= n <= 19)  # Maestro
    )
    return known and luhn(d)


def iban(value: str) -> bool:
    """An IBAN whose mod-97 check digits hold (ISO 13616)."""
    s = "".join(value.split()).upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def us_ssn(value: str) -> bool:
    """A US social security number in a range the SSA issues (not 000, 666 or 9xx; no zero group or serial)."""
    parts = value.split("-")
    if [len(p) for p in parts] != [3, 2, 4] or not all(p.isdigit() for p in parts):
        return False
    area, group, serial = parts
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def phone(value: str) -> bool:
    d = _digits(value)
    return 8 <= len(d) <= 15 and len(set(d)) > 2


# --- detectors -------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """One kind of sensitive value."""

    name: str
    pattern: str  # RE2; `(?P<v>...)` names the part to mask, else the whole match
    validate: Callable[[str], bool] | None = None
    keep: int = 4  # characters the `partial` style keeps (the last ones)
    ignore_case: bool = False
    description: str = ""

    def compiled(self) -> re2._Regexp:
        return compile_pattern(self.pattern, ignore_case=self.ignore_case)


_KEYWORDS = r"(?:password|passwd|passphrase|secret|client[_-]?secret|api[_-]?key|apikey|access[_-]?key|" \
            r"access[_-]?token|auth[_-]?token|refresh[_-]?token|private[_-]?key|secret[_-]?access[_-]?key)"

# A quoted value may hold spaces; an unquoted one ends at white space or punctuation, and never starts
# with "--" (a PEM block after `PRIVATE_KEY=` is the private_key detector's).
_ASSIGNED = (r"(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'](?P<w>[^\"'\n\\]{3,})\\?[\"']"
             r"|(?:\\?[\"'])?(?P<v>-?[^\s\"',;&}\-$<{%*][^\s\"',;&}]{2,}))")


def token_like(value: str) -> bool:
    """A credential, not a word: it has a digit or a token character, or mixes upper and lower case."""
    return (any(c.isdigit() for c in value) or any(c in "._~+/=-" for c in value)
            or (value.lower() != value and value.upper() != value))


_FILE_TLDS = frozenset("png jpg jpeg gif svg webp ico bmp tif tiff css js mjs ts tsx jsx json html htm md txt pdf "
                       "xml yml yaml toml lock zip gz tar py rb go rs java kt swift".split())


def email_address(value: str) -> bool:
    """An e-mail address, not a file name such as logo@2x.png."""
    domain = value.rsplit("@", 1)[-1].lower()
    return domain.rsplit(".", 1)[-1] not in _FILE_TLDS


BUILTIN: dict[str, Detector] = {d.name: d for d in (
    Detector("private_key",
             r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
             r"(?:[A-Za-z-]+: [^\n\\]*|\\[nr]|[A-Za-z0-9+/=\s])*"
             r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|-{1,5}(?:E(?:N(?:D[^\n\\\"]*)?)?)?$)?",
             keep=0, description="PEM, OpenSSH and PGP private keys (also cut short)"),
    Detector("aws_access_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[0-9A-Z]{16}\b",
             description="AWS access key ids"),
    Detector("aws_secret_key",
             r"(?i)(?:aws_?secret_?(?:access_?)?key|secret_?access_?key)(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?"
             r"(?P<v>[A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)",
             keep=0, description="AWS secret access keys (after their name)"),
    Detector("gcp_api_key", r"\bAIza[0-9A-Za-z_-]{35}", description="Google API keys"),
    Detector("gcp_oauth_token", r"\bya29\.[0-9A-Za-z._-]{20,}", keep=0, description="Google OAuth access tokens"),
    Detector("azure_storage_key", r"(?i)AccountKey=(?P<v>[A-Za-z0-9+/]{86}==)", keep=0,
             description="Azure storage account keys in connection strings"),
    Detector("azure_sas", r"[?&]sig=(?P<v>[A-Za-z0-9%+/]{30,}(?:%3[Dd]|=){0,2})", keep=0,
             description="Azure shared access signatures"),
    Detector("github_token", r"\b(?:(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})",
             description="GitHub tokens"),
    Detector("gitlab_token", r"\bglpat-[A-Za-z0-9_-]{20,}", description="GitLab personal access tokens"),
    Detector("slack_token", r"\b(?:xox[abposre]-[A-Za-z0-9-]{10,}|xapp-\d-[A-Za-z0-9-]{10,})",
             description="Slack tokens"),
    Detector("slack_webhook", r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+",
             keep=0, description="Slack incoming webhooks"),
    Detector("stripe_key", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}", description="Stripe secret keys"),
    Detector("openai_key", r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}",
             description="OpenAI- and Anthropic-style API keys"),
    Detector("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", keep=0,
             description="JSON Web Tokens"),
    Detector("bearer", r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9._~+/-]{12,}=*)", token_like, keep=0,
             description="bearer credentials (Authorization: Bearer ...)"),
    Detector("basic_auth", r"(?i)\bbasic\s+(?P<v>[A-Za-z0-9+/]{12,}={0,2})", token_like, keep=0,
             description="basic credentials (Authorization: Basic ...)"),
    Detector("url_password", r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:(?P<v>[^\s@/]+)@", keep=0,
             description="passwords in connection strings and URLs (scheme://user:password@host)"),
    Detector("password", r"(?i)\b(?:[A-Za-z0-9]+[_.-])*" + _KEYWORDS + _ASSIGNED, keep=0,
             description="password=, DB_PASSWORD: secret = '...' and similar assignments"),
    Detector("card", r"(?:^|[^+0-9])(?P<v>\d(?:[ -]?\d){12,18})\b", card_number,
             description="payment card numbers (Luhn)"),
    Detector("email",
             r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
             email_address, keep=0, description="e-mail addresses"),
    Detector("phone",
             r"(?:\+[1-9]\d{7,14}\b|\+[1-9]\d{0,2}(?:[ .-]\(?\d{1,4}\)?){2,5}\b"
             r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}\b|\b[2-9]\d{2}[.-]\d{3}[.-]\d{4}\b)",
             phone, description="phone numbers (international, or North American formatted)"),
    Detector("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", iban, description="IBANs (mod-97)"),
    Detector("us_ssn", r"\b\d{3}-\d{2}-\d{4}\b", us_ssn, keep=4, description="US social security numbers"),
)}

# Names of JSON object keys whose string value is a secret however it looks ({"password": "hunter2"},
# {"newPassword": ...}, {"MYSQL_ROOT_PASSWORD": ...}, {"SecretAccessKey": ...}).
SECRET_KEYS = compile_pattern(r"(?i)(?:password|passwd|^pwd|passphrase|secret|api[_-]?key|access[_-]?key|"
                              r"access[_-]?token|auth[_-]?token|refresh[_-]?token|id[_-]?token|session[_-]?token|"
                              r"bearer[_-]?token|private[_-]?key|secret[_-]?key|credentials?)$")


SECRETS = ("private_key", "aws_access_key", "aws_secret_key", "gcp_api_key", "gcp_oauth_token",
           "azure_storage_key", "azure_sas", "github_token", "gitlab_token", "slack_token", "slack_webhook",
           "stripe_key", "openai_key", "jwt", "bearer", "basic_auth", "url_password", "password", "card")
PII = (*SECRETS, "email", "phone", "iban", "us_ssn")
BUILTIN_PROFILES: dict[str, tuple[str, ...]] = {"secrets": SECRETS, "pii": PII}
