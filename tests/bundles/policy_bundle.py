"""
The bundle with identity and policy, for the policy end-to-end tests (until
addons/bastion.py lists them):

    mitmdump -s tests/bundles/policy_bundle.py --mode reverse:http://127.0.0.1:PORT@LISTEN \\
        --set ruleset=rulesets/default.yaml [--set oidc_issuer=... --set oidc_audience=...]
"""

from mcp_bastion.auth import Auth
from mcp_bastion.gate import Gate
from mcp_bastion.gateway import Gateway
from mcp_bastion.policy import Policy

addons = [
    Gateway(),
    Auth(),
    Policy(),
    Gate(),
]
