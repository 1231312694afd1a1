"""The README stays honest: its set-up commands, its commands' flags, its options all exist."""

import re
import shlex
import subprocess

import pytest

from harness import MITMDUMP, ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
          if lang in ("", "bash", "console", "sh")]


def command_lines() -> list[str]:
    """Every `scripts/...` command in the README's code blocks, continuation lines joined."""
    out = []
    for block in BLOCKS:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("scripts/"):
                out.append(line.split("#", 1)[0].strip())
    return out


def test_the_first_block_is_the_two_setup_commands_and_ci_runs_the_second():
    first = [line.split("#")[0].strip() for line in BLOCKS[0].strip().splitlines()]
    assert first == ["scripts/demo", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test\s*$", ci, re.M)


@pytest.mark.parametrize("line", command_lines())
def test_every_readme_command_and_flag_exists(line):
    words = shlex.split(line)
    script = ROOT / words[0]
    assert script.exists(), words[0]
    sub = [w for w in words[1:2] if not w.startswith("-")]
    proc = subprocess.run([str(script), *sub, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for flag in {w.split("=")[0] for w in words if w.startswith("--")}:
        assert flag in proc.stdout, f"{flag} is not an option of {words[0]} {' '.join(sub)}"


def test_the_shipped_rulesets_named_in_the_readme_check_clean():
    files = sorted(str(p) for p in (ROOT / "rulesets").rglob("*.yaml"))
    proc = subprocess.run([str(ROOT / "scripts" / "policy"), "check", *files], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in re.findall(r"`(rulesets/[\w./-]+\.yaml)`", README):
        assert (ROOT / name).exists(), name


@pytest.fixture(scope="module")
def bundle_options() -> str:
    proc = subprocess.run([MITMDUMP, "-s", str(ROOT / "addons" / "bastion.py"), "--options"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_option_the_readme_names_is_declared(bundle_options):
    declared = set(re.findall(r"^(\w+):", bundle_options, re.M))
    named = set(re.findall(r"--set (\w+)=", README))
    for table in re.findall(r"^\| option \|.*?(?=^[^|])", README, re.S | re.M):  # the option tables
        named |= set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    named -= {"flow_detail"}  # mitmproxy's own, not the bundle's
    assert named and named <= declared, sorted(named - declared)
