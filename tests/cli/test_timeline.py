"""`scripts/replay timeline` stays readable in a 100-column terminal: nothing wider, nothing cut to "…"."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from mcp_bastion.cli import forensics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recordings


def render(flows, width: int) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, highlight=False, color_system=None, force_terminal=False)
    forensics.render_timeline(flows, ["/var/lib/bastion/sessions/20260921T120000Z_alice_sess-1.mitm"], console)
    return buf.getvalue().splitlines()


def table_rows(lines: list[str]) -> list[str]:
    """The lines of the table below its header rule, blank ones dropped."""
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    return [line for line in lines[rule + 1:] if line.strip()]


@pytest.mark.parametrize("subjects", [("alice",), ("alice", "carol-from-the-contractors-group")])
@pytest.mark.parametrize("width", [100, 80, 120])
def test_no_line_is_wider_than_the_console_and_no_cell_is_cut(subjects, width):
    lines = render(recordings.session(subjects), width)
    assert max(cell_len(line) for line in lines) <= width
    assert "…" not in "\n".join(lines)  # rich's mark of a cell cut short


def cells(lines: list[str], name: str) -> list[str]:
    """The text of column `name` for every row of the table, its wrapped lines read back together.

    Columns are found by where their titles start in the header (the `ms` column is the last one); a row
    starts at a line whose time column is not blank.
    """
    header = next(line for line in lines if line.startswith("time (UTC)"))
    titles = [t for t in ("time (UTC)", "who", "message", "action", "rule", "status", "ms") if f" {t} " in
              f" {header} "]
    starts = [header.index(t) if t != "ms" else len(header.rstrip()) - 2 for t in titles]
    i = titles.index(name)
    begin, end = starts[i], (starts[i + 1] if i + 1 < len(starts) else None)
    out: list[list[str]] = []
    for line in table_rows(lines):
        if line[:12].strip():
            out.append([])
        out[-1].append(line[begin:end].strip())
    return [" ".join(part for part in parts if part) for parts in out]


def squeezed(text: str) -> str:
    return "".join(text.split())


def test_at_100_columns_every_value_is_there_whole():
    flows = recordings.session()
    lines = render(flows, 100)
    rows = forensics.timeline_rows(flows)
    assert len(cells(lines, "time (UTC)")) == len(rows)
    # A long word may be folded onto the next line of its cell, never cut: read back, every value is whole.
    for row, message, action, rule, status in zip(rows, cells(lines, "message"), cells(lines, "action"),
                                                  cells(lines, "rule"), cells(lines, "status"), strict=True):
        detail = forensics._detail(row)
        assert squeezed(message) == squeezed(f"→ {forensics._message(row)} {detail}")
        assert action == row["action"] and squeezed(rule) == row["rule"]
        assert squeezed(status) == squeezed(forensics._rec_status(row))
    assert cells(lines, "time (UTC)")[0] == rows[0]["time"][11:23]
    assert set(cells(lines, "ms")) == {"12"}
    # Identifiers are kept whole where there is room: the longest tool name and most rule ids.
    text = "\n".join(lines)
    assert "search_logs_across_every_region" in text and "engineering-deploy-prod" in text
    # One subject: it is named in the header, not repeated on every line.
    assert "subject   alice" in text and "who" not in next(line for line in lines if "time (UTC)" in line)


def test_at_100_columns_each_message_starts_its_own_line_with_its_time():
    flows = recordings.session()
    body = table_rows(render(flows, 100))
    starts = [line for line in body if line[:2].isdigit()]
    assert len(starts) == len(flows)  # one message per flow here, each starting with HH:MM:SS.mmm
    for line in starts:
        assert line[2] == ":" and line[8] == "." and "→" in line


def test_several_subjects_get_a_who_column():
    lines = render(recordings.session(("alice", "carol")), 100)
    header = next(line for line in lines if "time (UTC)" in line)
    assert "who" in header and any("carol" in line for line in table_rows(lines))


def test_a_wide_console_keeps_one_column_per_field():
    lines = render(recordings.session(), 180)
    header = next(line for line in lines if "time (UTC)" in line)
    for col in ("+s", "who", "message", "action", "rule", "status", "ms", "detail"):
        assert col in header
    assert max(cell_len(line) for line in lines) <= 180


def test_columns_sets_the_width_of_a_pipe(monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: False
    monkeypatch.setenv("COLUMNS", "100")
    console = forensics.console_for(out)
    assert console.width == 100 and not console.soft_wrap
    monkeypatch.delenv("COLUMNS")
    console = forensics.console_for(out)
    assert console.width == 160 and console.soft_wrap  # a pipe without COLUMNS: long lines stay whole for grep
