"""
Properties of core.masking: `Profile.mask` over random JSON values (hypothesis)
with secrets spliced into random strings, then the styles, escaped input,
values under secret-named keys, paths, and large or deep input.

A case noted "was a finding" failed before a fix and is kept as a regression case (see the module docstring of
test_detectors.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mcp_bastion.core.detectors import BUILTIN_PROFILES, SECRET_KEYS, Detector
from mcp_bastion.core.masking import MASK_PREFIX, MAX_FINDINGS, Finding, MaskingError, Profile, build_profile

KEY = b"test mask key, 32 bytes long...!"
PII = build_profile("pii", BUILTIN_PROFILES["pii"], {})
STYLED = {
    "redact": PII,
    "partial": build_profile("pii", BUILTIN_PROFILES["pii"], {}, default_style="partial"),
    "hash": build_profile("pii", BUILTIN_PROFILES["pii"], {}, default_style="hash", key=KEY),
}

PEM = """-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDWMycrwZcsrexVAl320MDmIgFY0XuecBILOlZXsoIM3oAoGCCqGSM49
AwEHoUQDQgAEBdCvmBK8BdJk7mXx5G5xqsGtka341YJCGBnPnWWw9A8YfF7TvI4N
LJNI4lbYw7ws6U+TQ4Si85AK06QVF15Aow==
-----END EC PRIVATE KEY-----"""
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")

# (text to splice, the secret in it that must not survive): one or more per built-in detector,
# all true positives of test_detectors.py that the detectors find.
CORPUS: list[tuple[str, str]] = [
    (PEM, PEM),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("key=AIzaD6JN6vXIPhjymRaOUBQ5uV1K_NmTRsOHkcI", "AIzaD6JN6vXIPhjymRaOUBQ5uV1K_NmTRsOHkcI"),
    ("ya29.a0AfB_byC7dQ4mN8sX2vR5tK9wL1pZ3hJ6", "ya29.a0AfB_byC7dQ4mN8sX2vR5tK9wL1pZ3hJ6"),
    ("AccountName=x;AccountKey=g3raVe792xoGTkrt+H9/D+IRUaIBzHmP2oyTzxsAr52HewbszBHTRcsea1qOTHS4gUTdL1RMyOfvwqi7S7Op3g==",
     "g3raVe792xoGTkrt+H9/D+IRUaIBzHmP2oyTzxsAr52HewbszBHTRcsea1qOTHS4gUTdL1RMyOfvwqi7S7Op3g=="),
    ("https://a.blob.core.windows.net/c/b?sv=2022-11-02&sig=Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0%2Bw4x%3D",
     "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0%2Bw4x"),
    ("ghp_Cp1Q5MwToGvIBgWtMuQhTgyzhmSiMjKMkqa5", "ghp_Cp1Q5MwToGvIBgWtMuQhTgyzhmSiMjKMkqa5"),
    ("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",
     "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"),
    ("PRIVATE-TOKEN: glpat-E8A3Lm5LfGiMf5R6kB4j", "glpat-E8A3Lm5LfGiMf5R6kB4j"),
    ("xoxb-1234567890123-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "XXXXXXXXXXXXXXXXXXXXXXXX"),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("sk-proj-8SQXRW66W8zh6MMFHyoW9MIN_fOFfZi9nTJVG40Eeg8maTLE0Bk51", "8SQXRW66W8zh6MMFHyoW9MIN_fOFfZi9nTJVG40Eeg8"),
    ("sk-ant-api03-Ro8w5mMMY3COl16wUrY8wEhVWSuzRfsi1BpLncC5CCsf21SgsNdFBlzo5P0pIjEHEDaceVvHhOMClIvX3O6GlyPUw31hRAA",
     "Ro8w5mMMY3COl16wUrY8wEhVWSuzRfsi1BpLncC5CCsf21SgsNdFBlzo5P0pIjEHEDaceVvHhOMClIvX3O6GlyPUw31hRAA"),
    (f"id_token={JWT}", JWT),
    ("Authorization: Bearer 2YotnFZFEjr1zCsicMWpAA", "2YotnFZFEjr1zCsicMWpAA"),
    ("Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
    ("postgres://app:s3cr3t-P4ss@db.internal:5432/app", "s3cr3t-P4ss"),
    ("mongodb+srv://admin:hunter2hunter2@cluster0.abcde.mongodb.net/test", "hunter2hunter2"),
    ("password=Tr0ub4dor-and-3", "Tr0ub4dor-and-3"),
    ('"api_key": "a1b2c3d4e5f6g7h8"', "a1b2c3d4e5f6g7h8"),
    ("client_secret: 7Fjfp0ZBr1KtDRbnfVdmIw", "7Fjfp0ZBr1KtDRbnfVdmIw"),
    ("4111 1111 1111 1111", "4111 1111 1111 1111"),
    ("5500-0000-0000-0004", "5500-0000-0000-0004"),
    ("378282246310005", "378282246310005"),
    ("6011 1111 1111 1117", "6011 1111 1111 1117"),
    ("alice.smith+tag@example.co.uk", "alice.smith+tag@example.co.uk"),
    ("+1 415 555 0100", "415 555 0100"),
    ("(415) 555-0100", "(415) 555-0100"),
    ("+44 20 7946 0958", "7946 0958"),
    ("+4915112345678", "4915112345678"),
    ("GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
    ("DE89370400440532013000", "DE89370400440532013000"),
    ("123-45-6789", "123-45-6789"),
]

SECRET_NAMED_KEYS = ["password", "api_key", "client_secret", "apiKey", "x-api-key", "X-Api-Key", "access_token",
                     "refreshToken", "passphrase", "db_password", "private_key", "clientSecret", "PASSWORD", "pwd"]


# --- strategies --------------------------------------------------------------------------

# random text, with now and then a lone surrogate (json.loads makes them; high ones only, so that no two
# make a pair JSON could not keep apart), a NUL, '--', or the separator the engine joins strings with
filler = st.lists(st.text(max_size=6) | st.sampled_from(["\ud800", "\udbff", "é", "\x00", "--", "\n\x00\n"]),
                  max_size=3).map("".join)
separator = st.sampled_from(["\n", "\r\n", "\n\n", " \n\t"])


@st.composite
def spliced(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A random string with 0 to 3 secrets of the corpus at random positions (on lines of their own)."""
    parts = [draw(filler)]
    secrets = []
    for _ in range(draw(st.integers(0, 3))):
        text, secret = draw(st.sampled_from(CORPUS))
        parts += [draw(separator), text, draw(separator), draw(filler)]
        secrets.append(secret)
    return "".join(parts), secrets


scalars = st.one_of(  # half of the leaves are strings with secrets spliced in
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    spliced().map(lambda t: t[0]))
keys = st.text(max_size=8) | st.sampled_from(["password", "api_key", "client_secret", "note", "id", "a b", "0"])
# A random JSON value (keys included) whose strings may hold secrets of the corpus.
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                         max_leaves=20)


# --- helpers ---------------------------------------------------------------------------------


def _path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{key!r}]"


def leaves(value: Any, path: str = "$") -> list[tuple[str, str | int | None, str]]:
    """(path, key in its container, string) of every string value (not key) of a JSON value."""
    out = []
    stack: list[tuple[Any, str, str | int | None]] = [(value, path, None)]
    while stack:
        node, p, key = stack.pop()
        if isinstance(node, str):
            out.append((p, key, node))
        elif isinstance(node, dict):
            stack.extend((v, _path(p, k), k) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, _path(p, i), i) for i, v in enumerate(node))
    return out


def strings(value: Any) -> dict[str, str]:
    return {p: text for p, _, text in leaves(value)}


WHOLE = re.compile(r"\[MASKED:password(?:#[0-9a-f]{12})?\]")


def assert_masked_like_alone(profile: Profile, value: Any, out: Any) -> None:
    """Each string of `out` is what masking that string alone gives (or, under a secret-named key, a whole mask)."""
    after = strings(out)
    for p, key, text in leaves(value):
        if isinstance(key, str) and SECRET_KEYS.search(key) and text and not text.startswith(MASK_PREFIX):
            assert WHOLE.fullmatch(after[p]), (p, after[p])
        else:
            assert after[p] == profile.mask_text(text)[0], p


def assert_same_shape(before: Any, after: Any) -> None:
    """Same containers, same keys in the same order, same non-string values; strings may differ."""
    stack = [(before, after)]
    while stack:
        a, b = stack.pop()
        assert type(a) is type(b)
        if isinstance(a, dict):
            assert list(a) == list(b)
            stack.extend((a[k], b[k]) for k in a)
        elif isinstance(a, list):
            assert len(a) == len(b)
            stack.extend(zip(a, b, strict=True))
        elif not isinstance(a, str):
            assert a == b


def leaks(value: Any, secrets: list[str]) -> list[str]:
    return [s for s in secrets for text in strings(value).values() if s in text]


# --- properties ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("style", "idempotent"), [
    ("redact", True),
    ("partial", True),
    ("hash", True),
])
@settings(max_examples=200, deadline=None)
@given(value=documents)
@example(value={"PASSWORD": "0"})
@example(value=[f"key:\n{PEM}"])
@example(value=["AKIAIOSFODNN7EXAMPLE", {"k": [True, None, 1.5, "alice@example.com"]}])
def test_mask_properties(value: Any, style: str, idempotent: bool) -> None:
    secrets = [secret for _, secret in CORPUS if any(secret in text for text in strings(value).values())]
    profile = STYLED[style]
    before = copy.deepcopy(value)
    out, findings = profile.mask(value)

    # the input is never mutated
    assert value == before
    assert_same_shape(before, value)
    # no secret survives
    assert leaks(out, secrets) == []
    # still JSON
    assert json.loads(json.dumps(out)) == out
    # containers, keys and non-string values are unchanged
    assert_same_shape(value, out)
    # findings name paths that exist in the output, where the masks are
    before_strings, after_strings = strings(value), strings(out)
    by_path: dict[str, int] = {}
    for f in findings:
        assert isinstance(f, Finding)
        assert f.path in after_strings, f
        assert f.count >= 1
        assert f"{MASK_PREFIX}{f.detector}" in after_strings[f.path]
        by_path[f.path] = by_path.get(f.path, 0) + f.count
    for p, text in after_strings.items():
        added = text.count(MASK_PREFIX) - before_strings[p].count(MASK_PREFIX)
        assert by_path.get(p, 0) == added, p
        if text != before_strings[p]:
            assert p in by_path
    # each string is masked as it would be alone: joining a message's strings for one scan changes nothing
    assert_masked_like_alone(profile, value, out)
    # nothing is copied that did not change: unchanged strings are the same objects, and so is the whole
    for p, text in after_strings.items():
        if text == before_strings[p]:
            assert text is before_strings[p]
    if not findings:
        assert out is value
    # idempotent: masking the output again changes nothing and finds nothing
    if not idempotent:
        return
    again, found_again = profile.mask(out)
    assert again == out
    assert found_again == []


@pytest.mark.parametrize(("style", "idempotent"), [
    ("redact", True),
    ("partial", True),
    ("hash", True),
    ("hash", False),
])
@settings(max_examples=200, deadline=None)
@given(text=spliced())
@example(text=(f"\n{PEM}\n", [PEM]))
def test_mask_text_properties(text: tuple[str, list[str]], style: str, idempotent: bool) -> None:
    value, secrets = text
    profile = STYLED[style]
    out, counts = profile.mask_text(value)
    assert not [s for s in secrets if s in out]
    assert sum(counts.values()) == out.count(MASK_PREFIX) - value.count(MASK_PREFIX)
    if not counts:
        assert out is value
    if idempotent:
        assert profile.mask_text(out) == (out, {})


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(SECRET_NAMED_KEYS), secret=st.text(min_size=1).filter(lambda s: not s.startswith("[")),
       other=st.text(max_size=8))
def test_value_under_secret_named_key_is_masked_whole(key: str, secret: str, other: str) -> None:
    doc = {"user": "alice", key: secret, "nested": [{key: secret, "n": 1}], "other": other}
    out, findings = PII.mask(doc)
    assert out[key] == "[MASKED:password]"
    assert out["nested"][0][key] == "[MASKED:password]"
    assert out["user"] == "alice" and out["nested"][0]["n"] == 1
    paths = {f.path for f in findings if f.detector == "password"}
    assert {_path("$", key), _path("$.nested[0]", key)} <= paths


@pytest.mark.parametrize("key", [
    *SECRET_NAMED_KEYS,
    "newPassword",  # was a finding; fixed
    "MYSQL_ROOT_PASSWORD",  # was a finding; fixed
    "aws_secret_access_key",  # was a finding; fixed
    "SecretAccessKey",  # was a finding; fixed
])
def test_secret_named_keys(key: str) -> None:
    out, _ = PII.mask({key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    assert out == {key: "[MASKED:password]"}


@pytest.mark.parametrize("key", ["password_hint", "api_key_id", "secretary", "passwords_enabled", "keyword", "pass"])
def test_other_keys_are_not_secret_named(key: str) -> None:
    doc = {key: "hello world"}
    out, findings = PII.mask(doc)
    assert out is doc
    assert findings == []


def test_keys_are_read_not_rewritten() -> None:
    doc = {"alice@example.com": "x", "4111 1111 1111 1111": ["y"]}
    out, findings = PII.mask(doc)
    assert out is doc and findings == []


def test_profile_without_password_does_not_mask_by_key_name() -> None:
    cards = build_profile("cards", ["card"], {})
    doc = {"password": "hunter2", "n": "4111 1111 1111 1111"}
    out, findings = cards.mask(doc)
    assert out == {"password": "hunter2", "n": "[MASKED:card]"}
    assert findings == [Finding("card", "$.n", 1)]


PEM_CUT = PEM[:PEM.index("LJNI")]  # a key in a tool's output truncated before its END line


@pytest.mark.parametrize("value", [
    ["Authorization: Bearer", "2YotnFZFEjr1zCsicMWpAA"],  # what only joining the strings would make
    ["password=", "hunter2hunter2"],
    ["4111 1111", "1111 1111"],
    ["alice@", "example.com"],
    {"a": "IBAN GB82 WEST", "b": "1234 5698 7654 32"},
    ["-----BEGIN PRIVATE KEY-----", "MIGHAgEAMBMGByqGSM49", "-----END PRIVATE KEY-----"],
    [PEM_CUT, "alice@example.com"],  # a key cut short, then more strings
    ["alice@example.com", PEM_CUT],
    ["--", PEM_CUT],
    [f"{PEM_CUT}\n\x00\n", "x"],
    # was a finding (fixed): a key cut short, then a later string holding '--'
    {"content": [{"type": "text", "text": PEM_CUT}, {"type": "text", "text": "-- end of output --"}]},
])
def test_a_message_is_masked_as_its_strings_alone(value: Any) -> None:
    out, findings = PII.mask(value)
    assert_masked_like_alone(PII, value, out)
    assert sum(f.count for f in findings) == sum(s.count(MASK_PREFIX) for s in strings(out).values())


def test_lone_surrogates() -> None:
    value = json.loads('["\\ud800 alice@example.com", "x\\udfff", "4111 1111 1111 1111\\ud83d", '
                       '{"password": "\\udc00"}]')
    out, findings = PII.mask(value)
    assert out == ["\ud800 [MASKED:email]", "x\udfff", "[MASKED:card]\ud83d", {"password": "[MASKED:password]"}]
    assert out[1] is value[1]
    assert json.loads(json.dumps(out)) == out
    assert len(findings) == 3


# --- styles -----------------------------------------------------------------------------------------


def test_redact() -> None:
    assert PII.mask_text("card 4111 1111 1111 1111, ssn 123-45-6789") == (
        "card [MASKED:card], ssn [MASKED:us_ssn]", {"card": 1, "us_ssn": 1})
    assert PII.mask_text("password=hunter2") == ("password=[MASKED:password]", {"password": 1})


PIN = Detector("pin", r"\bPIN (?P<v>\d{4,12})\b", keep=4)


@pytest.mark.parametrize(("text", "masked"), [
    ("card 4111 1111 1111 1111", "card [MASKED:card …1111]"),
    ("amex 3782 822463 10005", "amex [MASKED:card …0005]"),
    ("ssn 123-45-6789", "ssn [MASKED:us_ssn …6789]"),
    ("id AKIAIOSFODNN7EXAMPLE", "id [MASKED:aws_access_key …MPLE]"),
    ("mail alice@example.com", "mail [MASKED:email]"),  # keep=0: nothing kept
    (f"key {PEM}", "key [MASKED:private_key]"),
    ("password=hunter2hunter2", "password=[MASKED:password]"),
    ("PIN 123456789", "PIN [MASKED:pin …6789]"),
    ("PIN 12345678", "PIN [MASKED:pin]"),  # not longer than twice `keep`: nothing kept
    ("PIN 1234", "PIN [MASKED:pin]"),
])
def test_partial_keeps_the_last_keep_characters(text: str, masked: str) -> None:
    profile = build_profile("p", [*BUILTIN_PROFILES["pii"], "pin"], {"pin": PIN}, default_style="partial")
    out, counts = profile.mask_text(text)
    assert out == masked
    assert sum(counts.values()) == 1


def test_hash_pseudonyms() -> None:
    def pseudonym(text: str, key: bytes = KEY) -> str:
        out, _ = build_profile("h", ["card", "email"], {}, default_style="hash", key=key).mask_text(text)
        return out

    a = pseudonym("4111 1111 1111 1111")
    assert re.fullmatch(r"\[MASKED:card#[0-9a-f]{12}\]", a)
    assert pseudonym("4111 1111 1111 1111") == a  # same value, same key: same pseudonym
    assert pseudonym("paid with 4111 1111 1111 1111") == f"paid with {a}"
    assert pseudonym("4111 1111 1111 1111", b"another key") != a  # another key
    assert pseudonym("4242 4242 4242 4242") != a  # another value
    assert pseudonym("alice@example.com") != pseudonym("bob@example.com")
    digest = a.removeprefix("[MASKED:card#").removesuffix("]")
    for plain in ("4111 1111 1111 1111", "4111111111111111"):  # not a plain hash anyone can recompute
        assert digest not in (hashlib.sha256(plain.encode()).hexdigest(), hashlib.md5(plain.encode()).hexdigest())


@pytest.mark.parametrize("value", [{"password": "hunter2"}, {"note": f"key:\n{PEM}"}, f"key:\n{PEM}"])
def test_hash_style_is_idempotent(value: Any) -> None:
    hashed = STYLED["hash"]
    once, found = hashed.mask(value)
    assert found
    assert hashed.mask(once) == (once, [])


def test_hash_needs_a_key() -> None:
    with pytest.raises(MaskingError, match="key"):
        build_profile("h", BUILTIN_PROFILES["pii"], {}, default_style="hash", key=None)
    with pytest.raises(MaskingError, match="key"):
        build_profile("h", ["email"], {}, default_style="hash", key=b"")
    with pytest.raises(MaskingError, match="key"):
        build_profile("h", ["email", ("card", "hash")], {})
    build_profile("h", ["email", ("card", "partial")], {})  # no hash, no key needed


def test_styles_per_detector() -> None:
    profile = build_profile("mix", [("card", "partial"), ("email", "hash"), "us_ssn"], {}, key=KEY)
    out, counts = profile.mask_text("4111 1111 1111 1111 / alice@example.com / 123-45-6789")
    assert re.fullmatch(r"\[MASKED:card …1111\] / \[MASKED:email#[0-9a-f]{12}\] / \[MASKED:us_ssn\]", out)
    assert counts == {"card": 1, "email": 1, "us_ssn": 1}


def test_bad_profiles() -> None:
    with pytest.raises(MaskingError, match="unknown detector"):
        build_profile("x", ["nope"], {})
    with pytest.raises(MaskingError, match="style"):
        build_profile("x", ["card"], {}, default_style="shred")
    empty = build_profile("none", [], {})
    doc = {"password": "hunter2", "c": "4111 1111 1111 1111"}
    assert empty.mask(doc) == (doc, [])
    assert isinstance(empty, Profile) and empty.detectors == []


# --- escaped input, paths, size ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "detector", "secret"), [
    ('{"note": "card \\u0034111 1111 1111 111\\u0031 on file"}', "card", "4111 1111 1111 1111"),
    ('{"e": "alice\\u0040example.com"}', "email", "alice@example.com"),
    ('{"pw": "pass\\u0077ord=hunter2hunter2"}', "password", "hunter2hunter2"),
    (json.dumps({"key": PEM}), "private_key", PEM),
    (json.dumps({"key": PEM}, ensure_ascii=True).replace("-", "\\u002d"), "private_key", PEM),
    ('{"t": "Authorization:\\tBearer\\n2YotnFZFEjr1zCsicMWpAA"}', "bearer", "2YotnFZFEjr1zCsicMWpAA"),
    ('["\\u0031\\u0032\\u0033-45-6789"]', "us_ssn", "123-45-6789"),
])
def test_escaped_json_is_found_once_parsed(raw: str, detector: str, secret: str) -> None:
    value = json.loads(raw)
    out, findings = PII.mask(value)
    assert secret not in json.dumps(out) and secret not in str(out)
    assert detector in {f.detector for f in findings}


def test_paths() -> None:
    doc = {"a": [{"b c": "mail alice@example.com"}, "x", ["123-45-6789"]], "0": {"k": "4111 1111 1111 1111"},
           "ok": "nothing here"}
    out, findings = PII.mask(doc)
    assert sorted(tuple(f.record().values()) for f in findings) == sorted([
        ("email", "$.a[0]['b c']", 1), ("us_ssn", "$.a[2][0]", 1), ("card", "$['0'].k", 1)])
    assert out["ok"] is doc["ok"] and out["a"][1] is doc["a"][1]
    assert PII.mask("alice@example.com") == ("[MASKED:email]", [Finding("email", "$", 1)])
    assert PII.mask("alice@example.com", "$.params.text")[1] == [Finding("email", "$.params.text", 1)]
    assert PII.mask({"x": "bob@example.com bob@example.com"})[1] == [Finding("email", "$.x", 2)]


def test_findings_are_capped() -> None:
    doc = [f"user{i}@example.com" for i in range(MAX_FINDINGS + 50)]
    out, findings = PII.mask(doc)
    assert out == ["[MASKED:email]"] * len(doc)
    listed = [f for f in findings if f.path != "(more)"]
    assert len(listed) == MAX_FINDINGS
    assert sum(f.count for f in findings) == len(doc)


def test_one_megabyte_without_secrets_is_returned_as_is() -> None:
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit; version 1.2.3, build 10.0.19045, "
            "request 123e4567-e89b-12d3-a456-426614174000 at 2024-11-30T12:34:56Z took 1732924800000 ms.\n")
    big = (text * (2**20 // len(text) + 1))[:2**20]
    assert len(big) == 2**20
    out, findings = PII.mask(big)
    assert out is big and findings == []
    assert PII.mask_text(big)[0] is big
    doc = {"content": [{"type": "text", "text": big}], "n": 1}
    out, findings = PII.mask(doc)
    assert out is doc and findings == []


def test_one_megabyte_with_a_secret_at_the_end() -> None:
    big = "x " * (2**19) + "\npassword=hunter2hunter2"
    out, counts = PII.mask_text(big)
    assert counts == {"password": 1}
    assert out == "x " * (2**19) + "\npassword=[MASKED:password]"


def test_deep_nesting_does_not_recurse() -> None:
    depth = 5000
    doc: Any = "alice@example.com"
    for i in range(depth):
        doc = [doc] if i % 2 else {"k": doc}
    out, findings = PII.mask(doc)
    assert len(findings) == 1 and findings[0].detector == "email" and findings[0].path.startswith("$")
    node = out
    while not isinstance(node, str):
        node = node[0] if isinstance(node, list) else node["k"]
    assert node == "[MASKED:email]"
