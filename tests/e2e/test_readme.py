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


def running_blocks() -> tuple[str, str]:
    """The README's two 'Running the gateway' blocks: start everything; get a token and call."""
    section = README[README.index("## Running the gateway"):README.index("The same script loads in `mitmweb")]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def test_the_gateway_command_works_as_pasted(tmp_path):
    """The two blocks run as written, in bash from the checkout, with only their ports and `var` moved."""
    import os
    import signal

    from harness import free_port, wait_port

    start, call = running_blocks()
    ports = {"9000": str(free_port()), "9100": str(free_port()), "8080": str(free_port())}

    def moved(text: str) -> str:
        for old, new in ports.items():
            text = re.sub(rf"(?<=[:@ ]){old}\b", new, text)
        return text.replace("mkdir -p var", f"mkdir -p {tmp_path}/var").replace("=var/", f"={tmp_path}/var/")

    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    gateway = subprocess.Popen(["bash", "-c", moved(start)], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(int(ports["8080"]), timeout=60, proc=gateway)
        wait_port(int(ports["9100"]), timeout=30)
        out = subprocess.run(["bash", "-c", moved(call)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert '"serverInfo"' in out.stdout and "bastion-sdk-test-server" in out.stdout, out.stdout
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait(5)
    assert (tmp_path / "var" / "audit.jsonl").read_text()
