"""`scripts/audit verify` over several logs (one per gateway replica, each its own chain)."""

from __future__ import annotations

import json

from mcp_bastion.cli.forensics import main
from mcp_bastion.core import audit

KEY = b"k" * 32


def chain(path, n: int, name: str) -> None:
    c = audit.Chain(KEY)
    with open(path, "wb") as f:
        for i in range(n):
            f.write(audit.line_of(c.seal(audit.lifecycle_record("test", f"{name} {i}"))))
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(KEY, c.seq, c.prev))


def verify(tmp_path, *logs, capsys) -> tuple[int, str]:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    code = main(["audit", "verify", *map(str, logs), "--key-file", str(key)])
    return code, capsys.readouterr().out


def test_every_chain_of_a_set_must_verify(tmp_path, capsys):
    a, b = tmp_path / "replica-a.jsonl", tmp_path / "replica-b.jsonl"
    chain(a, 3, "a")
    chain(b, 5, "b")
    code, out = verify(tmp_path, a, b, capsys=capsys)
    assert code == 0 and f"OK {a}: 3 records" in out and f"OK {b}: 5 records" in out
    assert "2 logs: every chain intact" in out

    lines = b.read_text().splitlines()
    record = json.loads(lines[1])
    record["reason"] = "edited"
    lines[1] = json.dumps(record, separators=(",", ":"))
    b.write_text("\n".join(lines) + "\n")
    code, out = verify(tmp_path, a, b, capsys=capsys)
    assert code == 1 and f"OK {a}" in out and f"TAMPERED {b}: first bad record at line 2" in out
    assert "2 logs: 1 tampered, 1 intact" in out


def test_one_log_reads_as_before_and_a_log_named_twice_counts_once(tmp_path, capsys):
    a = tmp_path / "audit.jsonl"
    chain(a, 2, "a")
    code, out = verify(tmp_path, a, capsys=capsys)
    assert code == 0 and out.startswith(f"OK {a}: 2 records") and "logs:" not in out
    code, out = verify(tmp_path, a, a, capsys=capsys)
    assert code == 0 and out.count(f"OK {a}") == 1


def test_a_chain_cut_at_its_end_in_a_set_is_caught_by_its_head(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    chain(a, 2, "a")
    chain(b, 4, "b")
    b.write_text("".join(b.read_text().splitlines(keepends=True)[:3]))  # the last record removed
    code, out = verify(tmp_path, a, b, capsys=capsys)
    assert code == 1 and f"TAMPERED {b}" in out
