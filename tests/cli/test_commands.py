"""
Every command a user runs, called in-process: --help and --version, and every way its input can be
wrong (missing, a directory, empty, garbage bytes, unreadable, a bad option value) ends with ONE line on
stderr and exit status 2, never a traceback. The same commands run as real processes are in
tests/e2e/test_commands_e2e.py.
"""

from __future__ import annotations

import builtins
import importlib.metadata
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion_dev import bench, cluster, issuer, load
from bastion_dev.demo import __main__ as demo
from mcp_bastion.cli import approvals, common, forensics, pins, policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recordings

ROOT = Path(__file__).resolve().parents[2]
RULESET = str(ROOT / "rulesets" / "allow-all.yaml")
VERSION = importlib.metadata.version("mcp-bastion")

# name -> (prog, main taking argv)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "policy": ("scripts/policy", policy.main),
    "audit": ("scripts/audit", lambda argv: forensics.main(["audit", *argv])),
    "replay": ("scripts/replay", lambda argv: forensics.main(["replay", *argv])),
    "approvals": ("scripts/approvals", approvals.main),
    "pins": ("scripts/pins", pins.main),
    "bench": ("scripts/bench", bench.main),
    "load": ("scripts/load", load.main),
    "cluster": ("scripts/cluster", cluster.main),
    "demo": ("scripts/demo", demo.main),
    "issuer": ("python -m bastion_dev.issuer", issuer.main),  # the README's dev issuer
}


def invoke(capsys, name: str, *argv: str) -> tuple[int, str, str]:
    _, main = COMMANDS[name]
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, --version, a bad argument
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


# --- --help and --version ---------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_version_comes_from_the_package(capsys, name):
    code, out, err = invoke(capsys, name, "--version")
    assert code == 0 and err == ""
    assert out == f"{COMMANDS[name][0]} (mcp-bastion) {VERSION}\n"


def test_the_version_is_the_one_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{common.version()}"\n' in text


@pytest.mark.parametrize("name", COMMANDS)
def test_help_exits_0_and_names_the_command(capsys, name):
    code, out, _ = invoke(capsys, name, "--help")
    assert code == 0 and out.startswith(f"usage: {COMMANDS[name][0]}") and "--version" in out


@pytest.mark.parametrize("name,argv", [
    ("policy", ["bogus"]),
    ("policy", []),
    ("audit", ["export", "x.jsonl", "--format", "xml"]),
    ("audit", []),
    ("replay", ["server", "x.mitm", "--port", "99999"]),
    ("replay", ["server", "x.mitm", "--port", "http"]),
    ("approvals", ["list", "--timeout", "-1"]),
    ("approvals", ["list", "--timeout", "soon"]),
    ("pins", ["diff", "x", "--kind", "resource"]),
    ("bench", ["--samples", "0"]),
    ("bench", ["--duration", "nan"]),
    ("bench", ["--configs", "direct,proxy"]),
    ("bench", ["--configs", ","]),
    ("load", ["--clients", "x"]),
    ("demo", ["--bogus"]),
    ("issuer", ["--port", "99999"]),
    ("issuer", ["--ttl", "0"]),
])
def test_a_bad_argument_is_one_line_and_exit_2(capsys, name, argv):
    code, out, err = invoke(capsys, name, *argv)
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith(COMMANDS[name][0]) and line.endswith("--help)"), line


# --- wrong input ------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Inputs that are wrong in every way, and a good recording and key to go with them."""
    f = {
        "missing": tmp_path / "nothing-here",
        "dir": tmp_path / "a-directory",
        "empty": tmp_path / "empty",
        "garbage": tmp_path / "garbage",
        "unreadable": tmp_path / "unreadable",
        "key": tmp_path / "audit.key",
        "key_dir": tmp_path / "key-dir",
        "short_key": tmp_path / "short.key",
        "recording": recordings.write(recordings.session(), tmp_path / "session.mitm"),
    }
    f["dir"].mkdir()
    f["key_dir"].mkdir(mode=0o700)
    f["empty"].write_bytes(b"")
    f["garbage"].write_bytes(bytes(range(256)) * 3)
    f["unreadable"].write_text("version: 1\nrules: []\n")
    f["unreadable"].chmod(0)
    for key, data in (("key", b"k" * 32), ("short_key", b"k")):
        f[key].write_bytes(data)
        f[key].chmod(0o600)
    if os.geteuid() == 0:  # root reads a file of mode 000: make opening it fail as it would for anyone else
        real_open = builtins.open
        target = str(f["unreadable"])

        def refusing_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == target:
                raise PermissionError(13, "Permission denied", target)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    for var in ("BASTION_AUDIT_KEY", "BASTION_GATEWAY", "BASTION_APPROVER_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return {k: str(v) for k, v in f.items()}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def busy_port() -> Iterator[str]:
    """A port something already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield str(s.getsockname()[1])


# (command, argv with {placeholders} from `files`, what the line says)
WRONG = [
    ("policy", ["check", "{missing}"], "cannot read ruleset {missing}: No such file or directory"),
    ("policy", ["check", "{dir}"], "ruleset {dir} is a directory"),
    ("policy", ["check", "{unreadable}"], "Permission denied"),
    ("policy", ["explain", "{missing}", "{{}}"], "cannot read ruleset"),
    ("policy", ["explain", "{dir}", "{{}}"], "is a directory"),
    ("policy", ["explain", "{empty}", "{{}}"], "ruleset refused: {empty}"),
    ("policy", ["explain", "{garbage}", "{{}}"], "not valid UTF-8"),
    ("policy", ["explain", "{unreadable}", "{{}}"], "Permission denied"),
    ("policy", ["explain", RULESET, "@{garbage}"], "is not UTF-8 text"),
    ("policy", ["explain", RULESET, "@{dir}"], "is a directory"),
    ("policy", ["explain", RULESET, "@{missing}"], "cannot read message file"),
    ("policy", ["explain", RULESET, "@{unreadable}"], "Permission denied"),
    ("policy", ["explain", RULESET, "@{empty}"], "the gateway would refuse this body"),
    ("policy", ["explain", RULESET, "@"], "@ needs a file name"),
    ("policy", ["explain", RULESET, "http:"], "give an HTTP method after http:"),
    ("policy", ["explain", RULESET, "--identity", '{{"sub": "a", "groups": 5}}', "{{}}"], "groups must be a list"),
    ("policy", ["what-if", RULESET, "{garbage}"], "is not a mitmproxy flow file"),
    ("policy", ["what-if", RULESET, "{dir}"], "is a directory"),
    ("policy", ["what-if", RULESET, "{missing}"], "cannot read session"),
    ("policy", ["what-if", RULESET, "{unreadable}"], "Permission denied"),
    ("audit", ["verify", "{missing}", "--key-file", "{key}"], "cannot read audit log {missing}"),
    ("audit", ["verify", "{dir}", "--key-file", "{key}"], "audit log {dir} is a directory"),
    ("audit", ["verify", "{unreadable}", "--key-file", "{key}"], "Permission denied"),
    ("audit", ["verify", "{empty}"], "no key"),
    ("audit", ["verify", "{empty}", "--key-file", "{missing}"], "does not exist"),
    ("audit", ["verify", "{empty}", "--key-file", "{key_dir}"], "is a directory"),
    ("audit", ["verify", "{empty}", "--key-file", "{short_key}"], "shorter than"),
    ("audit", ["export", "{garbage}", "--key-file", "{key}", "--no-verify"], "line 1 is not an audit record"),
    ("audit", ["export", "{empty}", "--key-file", "{key}", "--no-verify", "-o", "{dir}"], "is a directory"),
    ("audit", ["export", "{empty}", "--key-file", "{key}", "--no-verify", "-o", "{missing}/out.csv"],
     "does not exist"),
    ("audit", ["export", "{empty}", "--key-file", "{key}", "--since", "last tuesday"], "not a time"),
    ("replay", ["timeline", "{missing}"], "cannot read recording {missing}: No such file or directory"),
    ("replay", ["timeline", "{dir}"], "recording {dir} is a directory"),
    ("replay", ["timeline", "{garbage}"], "{garbage} is not a mitmproxy flow file"),
    ("replay", ["timeline", "--json", "{garbage}"], "is not a mitmproxy flow file"),
    ("replay", ["timeline", "{unreadable}"], "Permission denied"),
    ("replay", ["client", "{garbage}"], "is not a mitmproxy flow file"),
    ("replay", ["client", "{recording}", "--header", "no colon"], "--header expects 'Name: value'"),
    ("replay", ["client", "{recording}", "--header", "Bad Name: x"], "is not an HTTP header name"),
    ("replay", ["client", "{recording}", "--to", "ftp://example.org"], "give a base URL"),
    ("replay", ["client", "{recording}", "--to", "http://[::1"], "Invalid IPv6 URL"),
    ("replay", ["client", "{recording}", "--save", "{dir}"], "is a directory"),
    ("replay", ["server", "{missing}"], "cannot read recording"),
    ("replay", ["server", "{recording}", "--port", "{busy}"],
     "cannot listen on 127.0.0.1:{busy}: Address already in use"),
    ("approvals", ["list"], "give the gateway's base URL"),
    ("approvals", ["list", "--gateway", "http://[::1", "--token", "t"], "not a usable gateway URL"),
    ("approvals", ["list", "--gateway", "http://gw:123456", "--token", "t"], "not a usable gateway URL"),
    ("approvals", ["list", "--gateway", "{closed}"], "no token"),
    ("approvals", ["list", "--gateway", "{closed}", "--token", "two words"], "does not hold a bearer token"),
    ("approvals", ["list", "--gateway", "{closed}", "--token-file", "{missing}"], "cannot read the token file"),
    ("approvals", ["list", "--gateway", "{closed}", "--token-file", "{dir}"], "is a directory"),
    ("approvals", ["list", "--gateway", "{closed}", "--token-file", "{empty}"], "is empty"),
    ("approvals", ["list", "--gateway", "{closed}", "--token-file", "{garbage}"], "does not hold a token"),
    ("approvals", ["list", "--gateway", "{closed}", "--token-file", "{unreadable}"], "Permission denied"),
    ("approvals", ["show", "../../etc", "--gateway", "{closed}", "--token", "t"], "not a request id"),
    ("approvals", ["list", "--gateway", "{closed}", "--token", "t"], "cannot reach the gateway"),
    ("pins", ["list", "--store", "{missing}"], "does not exist"),
    ("pins", ["accept", "x", "--store", "{missing}"], "does not exist"),
    ("pins", ["list", "--store", "{dir}"], "is a directory"),
    ("pins", ["list", "--store", "{empty}"], "pin store"),
    ("pins", ["list", "--store", "{garbage}"], "pin store"),
    ("pins", ["list", "--store", "{unreadable}"], "pin store"),
    ("pins", ["list", "--gateway", "{closed}", "--token-file", "{garbage}"], "does not hold a token"),
    ("bench", ["--json", "{dir}"], "is a directory"),
    ("bench", ["--json", "{garbage}/results.json"], "is not a directory"),
    ("bench", ["--configs", "bundle", "--script", "{missing}"], "no such file"),
    ("load", ["--json", "{dir}"], "is a directory"),
    ("issuer", ["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
]


@pytest.mark.parametrize("name,argv,says", WRONG, ids=[f"{n} {' '.join(a)}" for n, a, _ in WRONG])
def test_wrong_input_is_one_line_and_exit_2(capsys, files, busy_port, name, argv, says):
    values = {**files, "closed": closed_port_url(), "busy": busy_port}
    code, _, err = invoke(capsys, name, *(a.format(**values) for a in argv))
    line = one_line(err)
    assert code == 2, line
    assert line.startswith(COMMANDS[name][0]), line
    assert says.format(**values) in line


def test_check_reports_an_unreadable_file_and_still_checks_the_others(capsys, files):
    code, out, err = invoke(capsys, "policy", "check", files["missing"], RULESET)
    assert code == 2 and one_line(err).endswith("No such file or directory")
    assert out.strip() == f"{RULESET}: ok (1 rules, default deny)"


def test_an_empty_recording_has_no_flows_and_is_no_error(capsys, files):
    code, out, err = invoke(capsys, "replay", "timeline", files["empty"])
    assert (code, out.strip(), err) == (0, "no flows", "")


# --- the last line of defence: common.run ---------------------------------------------------


@pytest.mark.parametrize("exc,status,says", [
    (common.CannotRun("no key"), 2, "prog: no key"),
    (FileNotFoundError(2, "No such file or directory", "/x"), 2, "prog: /x: No such file or directory"),
    (RuntimeError("boom"), 2, "prog: unexpected error: RuntimeError: boom (set BASTION_DEBUG=1 for the traceback)"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
])
def test_run_turns_what_escapes_into_one_line(capsys, monkeypatch, exc, status, says):
    monkeypatch.delenv(common.DEBUG_ENV, raising=False)

    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        common.run(main, "prog")
    assert e.value.code == status
    assert one_line(capsys.readouterr().err) == says


def test_run_shows_the_traceback_when_debugging(monkeypatch):
    monkeypatch.setenv(common.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError):
        common.run(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "prog")
