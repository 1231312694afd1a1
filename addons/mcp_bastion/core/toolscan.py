"""
Scanning tool, prompt and template definitions for text aimed at the model.

A definition's text (its name, title, description, and every description, title,
enum value, default, example and property name in its schemas) reaches the model
as instructions. `scan` reports:

- `instructions`: text that addresses the model rather than describing the tool:
  `<IMPORTANT>`-style blocks, asking it to keep something from the user, to
  ignore other instructions, to read keys or configuration files, to call other
  tools or change how they behave, or to send data somewhere;
- `invisible`: characters a reviewer does not see: Unicode tag characters,
  zero-width and bidi controls, variation selectors that can carry data, ANSI
  escapes and other control characters;
- `deceptive_name`: a name with characters outside the portable tool-name set
  (`A-Z a-z 0-9 _ - .`), such as a look-alike letter from another script;
- `oversized`: a description longer than the limit (a place to bury a payload);
- `shadowing`: a name another upstream already uses (added by the caller, which
  knows the other upstreams);
- `unscanned`: a definition larger or deeper than the scanner reads (a text past
  64 K characters, nesting past 64 levels, more than 2,000 texts).

Every pattern runs on RE2 (linear time, whatever the text), over text cut to a
bounded length, so an upstream cannot make a scan slow. Pure: no mitmproxy import.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mcp_bastion.core.detectors import compile_pattern

INSTRUCTIONS, INVISIBLE, DECEPTIVE_NAME, OVERSIZED, SHADOWING, UNSCANNED = (
    "instructions", "invisible", "deceptive_name", "oversized", "shadowing", "unscanned")
CHECKS = (INSTRUCTIONS, INVISIBLE, DECEPTIVE_NAME, OVERSIZED, SHADOWING, UNSCANNED)
DESCRIPTION_LIMIT = 4096  # characters
MAX_TEXT = 64 * 1024  # characters of any one text that are read
MAX_TEXTS = 2000  # texts read per definition
MAX_DEPTH = 64  # as deep as the gateway parses JSON at all
PORTABLE_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


@dataclass(frozen=True)
class Finding:
    check: str
    where: str  # "description", "inputSchema.properties.path.description", ...
    detail: str  # what was found, shortened and with invisible characters shown as escapes

    def record(self) -> dict[str, str]:
        return {"check": self.check, "where": self.where, "detail": self.detail}


# --- instructions --------------------------------------------------------------------

_NEGATED = compile_pattern(r"\b(do\s*n[o']t|never|must\s*not|should\s*not|shall\s*not|cannot|can't|no)\s+"
                           r"(\w+\s+){0,2}$", ignore_case=True)
_SENSITIVE_PATH = (r"((~|\$home|%userprofile%)[/\\]\.?[\w.-]*|[/\\]\.(ssh|aws|gnupg|kube|docker|cursor|codeium|azure)"
                   r"\b[/\\]?[\w./-]*|\bid_(rsa|dsa|ecdsa|ed25519)\b|/etc/(passwd|shadow|sudoers)\b|"
                   r"\bmcp\.json\b|\bclaude_desktop_config\.json\b|\.git-credentials\b|\.netrc\b|\bwallet\.dat\b|"
                   r"\.aws/credentials\b)")
_EXFIL_VERBS = (r"(read|cat|include|send|pass|attach|upload|extract|collect|copy|append|forward|post|transmit|leak|"
                r"embed)")
# The same verbs in other languages models read (no word boundaries: CJK has none).
_FOREIGN_VERBS = (r"(lee|leer|lire|lis\b|lies\b|lesen|leggi|leia|ler\b|pasa|envoie|env[ií]a|sende|schick|gib|f[üu]ge|"
                  r"读取|读|讀取|发送|發送|填入|上传|上傳|読み|送信|읽)")
# (why, pattern, negatable): a negatable match preceded by "do not", "never" ... is a warning to the model, not
# an instruction to leak ("never include secret values in your reply").
_INSTRUCTION_PATTERNS: list[tuple[str, Any, bool]] = [(why, compile_pattern(p, ignore_case=True), neg)
                                                    for why, p, neg in [
    ("a tag addressing the model",
     r"<\s*/?\s*(important|system|instructions?|secret|hidden|admin|sudo|critical|urgent|assistant|context|"
     r"directive|override|priority|mandatory|rules?|policy)(\s[^<>]{0,80})?>", False),
    ("a heading or marker addressing the model",
     r"(^|\n)\s*(#{1,6}\s*|\[|\*\*|!!+\s*)(important|system|(ai|assistant|model|agent)[- ]notes?|"
     r"note to (the )?(ai|assistant|model|llm|agent)|"
     r"instructions? for (the )?(ai|assistant|model|llm|agent)|ai (instructions?|note)|critical instructions?)\b",
     False),
    ("a role marker addressing the model",
     r"(^|[\n(\[\"'{]|\.\s)\s*(system|assistant|ai|model)\s*:\s*\S|\"role\"\s*:\s*\"(system|developer)\"", False),
    ("a note addressing the model",
     r"\b(note|notes|remarque|hinweis|nota|guidance|instructions?|message|reminder|aviso|consigne)\s+(pour|for|an|"
     r"para|to|f[uü]r|per)\s+(l['’]\s*|the\s+|den\s+|die\s+|el\s+|la\s+|all['’]\s*)?(ai|assistant|assistente|"
     r"asistente|assistenten|model|modelo|llm|agent|agente|coding\s+assistants?|ia)\b", False),
    ("a comment hiding text", r"<!--[^>]{0,1000}(ai|assistant|model|llm|agent|instruction|must|always|never)", False),
    ("keeping something from the user",
     r"\b(do\s*n[o']t|never|must\s*not|should\s*not|shall\s*not|without)\s+(ever\s+)?"
     r"(tell|telling|inform|informing|mention|mentioning|reveal|revealing|notify|notifying|alert|alerting|show|"
     r"showing|let|letting|disclose|disclosing|explain|explaining|ask|asking)\b[^.\n]{0,40}\b(user|human|them|anyone|"
     r"operator|customer)", False),
    ("keeping something from the user",
     r"\b(do\s*n[o']t|never|must\s*not|need\s*not|needs?\s*not|does\s*not\s*need\s*to|should\s*not|shall\s*not)"
     r"\s+(be\s+)?(describe|mention|say|surface|surfaced|shown|show|report|reported|disclose|disclosed|reveal|"
     r"revealed|displayed|logged\s+to\s+the\s+user|ask\s+for\s+(confirmation|permission))\b", False),
    ("keeping something from the user",
     r"\b(user|human)\s+(must|should|need|does|will)\s*(not|n't)\s+(know|see|be told|be informed|notice|find out)",
     False),
    ("keeping something from the user",
     r"\b(keep|keeping)\s+(this|it|these|that)\s+(a\s+)?(secret|hidden|confidential|between us)", False),
    ("keeping something from the user",
     r"\b(sans|sin|ohne|senza)\b[^.\n]{0,40}\b(utilisateur|usuario|benutzer|nutzer|utente)", False),
    ("keeping something from the user", r"\b(silently|secretly|covertly|quietly|invisibly)\s+(send|forward|copy|"
                                        r"include|add|read|upload|append|pass|attach|bcc|call|run|execute)", False),
    ("overriding other instructions",
     r"\b(ignore|disregard|forget|override|bypass)\s+(all\s+|any\s+)?(the\s+)?(previous|prior|above|earlier|"
     r"other|system|user'?s?|safety|existing)\s+(instructions?|rules|directions|guidelines|prompts?|restrictions|"
     r"query|request|question|message)", False),
    ("a step the model must take first",
     r"\b(before|prior\s+to)\s+(using|calling|running|invoking|executing|searching)\s*(this|any|the)?\s*(tool|"
     r"function)?\s*,?\s*(you\s+)?(must|should|need\s+to|have\s+to|are\s+required\s+to)?\s*(first\s+)?"
     r"(read|call|send|pass|include|fetch|open|cat|upload|retrieve|collect|list|provide\s+the\s+contents)\b"
     r"[^.\n]{0,80}\b(home|ssh|key|secret|password|credential|file|director|pass)", False),
    ("reading secrets or configuration", _EXFIL_VERBS + r"\b[^.\n]{0,60}" + _SENSITIVE_PATH, True),
    ("reading secrets or configuration", _SENSITIVE_PATH + r"[^.\n]{0,60}\b(and\s+|then\s+)?(pass|send|include|"
                                                          r"put|add|attach|upload|append)\b", True),
    ("reading secrets or configuration", _FOREIGN_VERBS + r"[^.\n。]{0,30}" + _SENSITIVE_PATH, False),
    ("persisting instructions for later sessions",
     r"\b(append|write|add|insert|save|put)\b[^.\n]{0,80}(agents\.md|\.cursorrules|claude\.md|copilot-instructions"
     r"\.md|\.windsurfrules|\.clinerules|gemini\.md)", False),
    ("keeping something from the user", r"\b(do|perform|run|make)\s+(this|it|that|these)\s+(step\s+)?(silently|"
                                        r"quietly|secretly|covertly|in\s+the\s+background)\b", False),
    ("reading secrets or configuration",
     r"\b(whenever|every\s+time|each\s+time|when)\s+you\s+(learn|see|find|encounter|receive|read|come\s+across|"
     r"are\s+given)\b[^.\n]{0,60}\b(passwords?|secrets?|keys?|tokens?|credentials)", False),
    ("reading secrets or configuration",
     r"\b(send|pass|attach|upload|extract|collect|forward|copy|exfiltrate|append)\b[^.\n]{0,60}\b(contents?\s+of\s+)?"
     r"(the\s+)?(user'?s\s+)?(ssh\s+keys?|private\s+keys?|api\s+keys?|secrets?|passwords?|credentials|tokens?|"
     r"environment\s+variables|config(uration)?\s+files?|\.env\s+files?)\b[^.\n]{0,40}\b(to|into|as|via)\s",
     True),
    ("collecting the conversation",
     r"\b(pass|send|include|copy|append|attach|upload|forward|put)\b[^.\n]{0,40}\b(entire|whole|full|complete|"
     r"verbatim|all(\s+of)?)\s+(the\s+)?(conversation|chat|history|transcript|messages|context|dialog(ue)?)", True),
    ("collecting the conversation", r"\b(the\s+)?user'?s\s+(last|previous|recent)\s+(\d+\s+)?(messages|prompts?)\b",
     True),
    ("sending data elsewhere",
     r"\b(send|sending|forward|forwarding|post|posting|upload|uploading|transmit|exfiltrate|copy|mirror|leak|report|"
     r"fetch|envoie|env[ií]a|sende)\b[^.\n]{0,80}\b(to|at|à|a|an)\s+(https?://|[a-z0-9._%+-]+@[a-z0-9-]+\.|(an?\s+|"
     r"the\s+)?(attacker|external|remote|third[- ]party|webhook|proxy)\b)", True),
    ("sending data elsewhere", r"\b(bcc|cc|copie\s+cach[ée]e|copia\s+oculta)\b[^.\n]{0,60}[a-z0-9._%+-]+@[a-z0-9-]+"
                               r"\.[a-z]{2,}|[a-z0-9._%+-]+@[a-z0-9-]+\.[a-z]{2,}[^.\n]{0,40}\b(bcc|cc)\b", True),
    ("sending data elsewhere",
     r"\b(all|every)\s+(of\s+)?(the\s+)?user'?s\s+(private|personal|internal)\b", False),
    ("changing how other tools behave",
     r"\b(when|whenever|if|every\s+time)\s+(the\s+)?(user|you|assistant|agent|model)\s+(calls?|uses?|invokes?|runs?)"
     r"\s+(the\s+|any\s+|another\s+|other\s+)?[`'\"]?[\w.\-]+[`'\"]?\s+(tool|function)[^.\n]{0,80}\b(must|should|"
     r"always|instead|also|first)\b", False),
    ("changing how other tools behave",
     r"\b(whenever|every\s+time|each\s+time|when(ever)?)\b[^.\n]{0,80}\b(is|are)\s+(called|used|invoked|run)\b"
     r"[^.\n]{0,60}\b(you\s+)?(must|should|need\s+to|always)\b", False),
    ("changing how other tools behave",
     r"\b(this|the)\s+tool\s+(has\s+a\s+)?(side\s+effects?\s+on|overrides?|replaces?|changes\s+the\s+behaviou?r\s+of|"
     r"modifies\s+the\s+behaviou?r\s+of)\b", False),
    ("changing how other tools behave",
     r"\b(of|to|for)\s+(this\s+tool\s+and\s+(of\s+)?)?(any|every|all)\s+other\s+(email\s+|messaging\s+|payment\s+)?"
     r"tools?\b", False),
    ("changing how other tools behave",
     r"\ball\s+(emails?|messages?|payments?|transfers?|requests?)\s+(must|should|shall)\s+(be\s+)?(sent|forwarded|"
     r"copied|routed|redirected)\s+to\b", False),
    ("asking for what the tool does not need",
     r"\b(pass|put|include|place|add|insert|provide)\b[^.\n]{0,60}\b(in|into|as)\s+(the\s+)?[`'\"]?"
     r"(sidenote|side_note|notes?|context|metadata|extra|debug|feedback|hints?)[`'\"]?\s+(parameter|param|field|"
     r"argument)", False),
    ("asking for what the tool does not need",
     r"\b(use|install)\s+(the\s+)?(package|library|module)\s+[`'\"]?[\w.-]+[`'\"]?\s+\(?(pip|npm|yarn|cargo|gem)\s+"
     r"(install|add)\b", False),
    ("encoded text to follow",
     r"\b(decode|base64|rot13|hex)\b[^.\n]{0,40}\b(follow|execute|obey|run|apply)\b|[A-Za-z0-9+/]{80,}={0,2}", False),
    ("addressing the model", r"\b(you\s+are\s+now|from\s+now\s+on,?\s+you|act\s+as\s+(an?\s+)?(admin|root|system))\b",
     False),
    ("addressing the model",
     r"\b(this\s+is\s+(very\s+|extremely\s+)?(important|critical)|very\s+important)\s*[:!]\s*(you|the\s+(assistant|"
     r"model|ai|agent))\s+(must|should|need)", False),
]]
# Every instruction pattern at once: most texts match none, and one search is far cheaper than thirty.
_ANY_INSTRUCTION = compile_pattern("|".join(f"(?:{p.pattern})" for _, p, _ in _INSTRUCTION_PATTERNS),
                                   ignore_case=True)
_PLAIN = re.compile(r"[\x20-\x7e\t\n\r]*")
# A property name that asks for something a tool has no business receiving.
_SUSPECT_NAME = compile_pattern(r"id_(rsa|dsa|ecdsa|ed25519)|contents?_?(of|from)|reading_|ssh_?key_?content|"
                                r"conversation_?history", ignore_case=True)

# --- invisible and control characters -------------------------------------------------


def _invisible(ch: str) -> str | None:
    o = ord(ch)
    if 0xE0000 <= o <= 0xE007F:
        return "a Unicode tag character"
    if 0xE0100 <= o <= 0xE01EF:
        return "a variation selector that can carry hidden data"
    if o in (0x200B, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x180E, 0x00AD, 0x034F,
             0x115F, 0x1160, 0x3164, 0xFFA0):
        return "a zero-width or invisible character"
    if 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069:
        return "a bidirectional control"
    if o == 0x1B:
        return "an ANSI escape"
    if (o < 0x20 and ch not in "\t\n\r") or 0x7F <= o <= 0x9F:
        return "a control character"
    if unicodedata.category(ch) in ("Co", "Cn") and not 0xE000 <= o <= 0xF8FF:
        return "an unassigned or private character"
    return None


def visible(text: str) -> str:
    """`text` with every invisible character written as a `\\uXXXX` escape."""
    return "".join(f"\\u{ord(ch):04x}" if _invisible(ch) and ch not in "\n" else ch for ch in text)


_JOINERS = "\u200c\u200d\u200e\u200f\u061c"  # ZWNJ, ZWJ, LRM, RLM, ALM: needed in Persian, Arabic, Hebrew, emoji


def _joiner_misused(text: str, i: int) -> str | None:
    """A joiner or mark that scripts and emoji need, used where none needs it: inside Latin words (to split
    a keyword), or several in a row (to encode data)."""
    if text[i] not in _JOINERS:
        return None
    before, after = text[i - 1] if i else " ", text[i + 1] if i + 1 < len(text) else " "
    if before.isascii() and before.isalnum() and after.isascii() and after.isalnum():
        return "a zero-width character inside a word"
    if after in _JOINERS or (after and after in "\u200b\u2060"):
        return "a run of zero-width characters"
    return None


def shown(text: str, limit: int = 120) -> str:
    """`text` shortened, with every invisible character written as a `\\uXXXX` escape."""
    out = []
    for ch in text[: limit * 2]:
        out.append(f"\\u{ord(ch):04x}" if _invisible(ch) else ch)
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --- walking a definition ----------------------------------------------------------------


class _Walk:
    """What `texts` left unread (a text past MAX_TEXT, a level past MAX_DEPTH, texts past MAX_TEXTS)."""

    def __init__(self) -> None:
        self.skipped: str | None = None


def texts(item: dict[str, Any], walk: _Walk | None = None) -> Iterator[tuple[str, str]]:
    """(where, text) for every text of a definition a model may read."""
    walk = walk if walk is not None else _Walk()
    count = 0
    stack: list[tuple[str, Any, int]] = [("", item, 0)]
    while stack:
        if count >= MAX_TEXTS:
            walk.skipped = f"more than {MAX_TEXTS} texts"
            return
        where, value, depth = stack.pop()
        if isinstance(value, str):
            count += 1
            if len(value) > MAX_TEXT:
                walk.skipped = f"{where or 'value'}: {len(value)} characters, of which {MAX_TEXT} were read"
            yield where or "value", value[:MAX_TEXT]
        elif depth >= MAX_DEPTH:
            if isinstance(value, (dict, list)) and value:
                walk.skipped = f"{where}: nested deeper than {MAX_DEPTH} levels"
            continue
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                if not isinstance(k, str):
                    continue
                path = f"{where}.{k}" if where else k
                if where.endswith("properties") or where.endswith("definitions") or where.endswith("$defs"):
                    if count >= MAX_TEXTS:
                        walk.skipped = f"more than {MAX_TEXTS} texts"
                        return
                    count += 1
                    yield f"{path} (name)", k[:MAX_TEXT]  # a property name is text the model reads too
                if k in ("_meta", "icons", "$schema", "$id", "$ref", "type", "format", "pattern"):
                    continue
                stack.append((path, v, depth + 1))
        elif isinstance(value, list):
            for i, v in reversed(list(enumerate(value))):
                stack.append((f"{where}[{i}]", v, depth + 1))


def scan(item: dict[str, Any], description_limit: int = DESCRIPTION_LIMIT) -> list[Finding]:
    """What a definition's texts hold that a reviewer should see (`shadowing` is the caller's)."""
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()

    def add(check: str, where: str, detail: str) -> None:
        if (check, where) not in seen and len(findings) < 50:
            seen.add((check, where))
            findings.append(Finding(check, where, detail))

    name = item.get("name")
    if isinstance(name, str) and not PORTABLE_NAME.fullmatch(name):
        odd = sorted({ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "_.-/"))})
        add(DECEPTIVE_NAME, "name", f"{shown(name)}: " + ", ".join(
            f"U+{ord(ch):04X} {unicodedata.name(ch, '?')}" for ch in odd[:5]))
    description = item.get("description")
    if isinstance(description, str) and len(description) > description_limit:
        add(OVERSIZED, "description", f"{len(description)} characters (limit {description_limit})")
    walk = _Walk()
    for where, text in texts(item, walk):
        if not _PLAIN.fullmatch(text):  # printable ASCII and ordinary white space have nothing to hide
            for i, ch in enumerate(text):
                why = _invisible(ch) or _joiner_misused(text, i)
                if why is not None:
                    add(INVISIBLE, where, f"{why} (U+{ord(ch):04X}) in {shown(text)!r}")
                    break
        folded = _readable(text)
        if where.endswith("(name)") and _SUSPECT_NAME.search(folded):
            add(INSTRUCTIONS, where, f"a parameter name asking for what a tool does not need: {shown(folded)!r}")
        if not _ANY_INSTRUCTION.search(folded):  # one pass for all patterns; which one, only on a hit
            continue
        for why, pattern, negatable in _INSTRUCTION_PATTERNS:
            m = next((m for m in pattern.finditer(folded)
                      if not (negatable and _NEGATED.search(folded[max(0, m.start() - 30):m.start()]))), None)
            if m is not None:
                start = max(0, m.start() - 20)
                add(INSTRUCTIONS, where, f"{why}: {shown(folded[start:m.end() + 20])!r}")
                break
    if walk.skipped is not None:  # what was not read cannot be vouched for
        add(UNSCANNED, "definition", f"not all of it could be read: {walk.skipped}")
    return findings


def _readable(text: str) -> str:
    """Text as a model reads it: invisible characters dropped, compatibility forms folded."""
    if text.isascii():
        return text
    kept = "".join(ch for ch in text if _invisible(ch) is None)
    return unicodedata.normalize("NFKC", kept)
