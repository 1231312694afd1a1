"""
mcp-bastion: the whole bundle, loaded by one script.

    ACME_MCP_TOKEN=... mitmdump -s addons/bastion.py --mode reverse:http://127.0.0.1:9000@8080 \\
        --set ruleset=rulesets/default.yaml --set oidc_issuer=https://idp.example.com \\
        --set upstream_token_env=ACME_MCP_TOKEN

The addons, their order and their wiring come from `mcp_bastion.bundle.bundle()`
(see its docstring, and addons/mcp_bastion/README.md for the design): Gateway,
Auth, Approvals, Pinning, Sessions, Admission, Policy, Masking, Pipeline, Gate,
UpstreamCheck, UpstreamToken, Recorder, AuditLog, DecisionLog, Metrics, Tracing,
Mitmweb, ContentView, Timing. mitmproxy sees them as one addon (`glue.dispatch`),
which calls each hook on them in that order and fails closed when one raises.
Load it before any other script with flow hooks: it refuses to start behind one.
"""

from mcp_bastion.bundle import as_addon

addons = [as_addon(entry=__file__)]
