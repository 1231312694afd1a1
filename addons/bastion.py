"""
mcp-bastion: the whole bundle, loaded by one script.

    mitmdump -s addons/bastion.py --mode reverse:http://127.0.0.1:8000@8080 \\
        --set ruleset=rulesets/allow-all.yaml

Order matters: the data path first, enforcement in between, the Gate last
among the enforcing addons, recording after it (so it records what the
client actually received).
"""

from mcp_bastion.gate import Gate
from mcp_bastion.gateway import Gateway

addons = [
    Gateway(),
    Gate(),
]
