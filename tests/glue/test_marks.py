"""Marks a reviewer reads in mitmweb and the console: text symbols, no emoji font needed."""

from __future__ import annotations

import pytest
from mitmproxy.utils.emoji import emoji

from mcp_bastion.core.vocab import Action
from mcp_bastion.glue.flowstate import MARKS

# Code points below U+2C00 whose default presentation is emoji (Unicode emoji-data.txt,
# Emoji_Presentation=Yes): they need an emoji font; everything from U+1F000 on does too.
EMOJI_PRESENTATION = [
    (0x231A, 0x231B), (0x23E9, 0x23EC), (0x23F0, 0x23F0), (0x23F3, 0x23F3), (0x25FD, 0x25FE),
    (0x2614, 0x2615), (0x2648, 0x2653), (0x267F, 0x267F), (0x2693, 0x2693), (0x26A1, 0x26A1),
    (0x26AA, 0x26AB), (0x26BD, 0x26BE), (0x26C4, 0x26C5), (0x26CE, 0x26CE), (0x26D4, 0x26D4),
    (0x26EA, 0x26EA), (0x26F2, 0x26F3), (0x26F5, 0x26F5), (0x26FA, 0x26FA), (0x26FD, 0x26FD),
    (0x2705, 0x2705), (0x270A, 0x270B), (0x2728, 0x2728), (0x274C, 0x274C), (0x274E, 0x274E),
    (0x2753, 0x2755), (0x2757, 0x2757), (0x2795, 0x2797), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
    (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
]


def needs_emoji_font(glyph: str) -> bool:
    cp = ord(glyph)
    return cp >= 0x1F000 or any(lo <= cp <= hi for lo, hi in EMOJI_PRESENTATION)


@pytest.mark.parametrize("action", list(MARKS))
def test_each_mark_is_one_text_symbol(action):
    code = MARKS[action]
    glyph = emoji.get(code)
    assert glyph is not None, f"{code} is not a mark mitmproxy knows (it would show its default mark)"
    assert len(glyph) == 1 and not needs_emoji_font(glyph), f"{code} -> {glyph!r} needs an emoji font"


def test_the_check_catches_emoji():
    assert needs_emoji_font(emoji[":no_entry:"]) and needs_emoji_font(emoji[":hourglass:"])
    assert needs_emoji_font("\N{PERFORMING ARTS}")


def test_marks_are_distinct_and_cover_the_severe_actions():
    assert set(MARKS) == {Action.ERROR, Action.DENY, Action.APPROVE, Action.MASK}
    assert len(set(MARKS.values())) == len(MARKS)
