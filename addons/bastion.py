"""
mcp-bastion: the whole bundle, loaded by one script.

    ACME_MCP_TOKEN=... mitmdump -s addons/bastion.py --mode reverse:http://127.0.0.1:9000@8080 \\
        --set ruleset=rulesets/default.yaml --set oidc_issuer=https://idp.example.com \\
        --set upstream_token_env=ACME_MCP_TOKEN

The addons, their order and their wiring come from `mcp_bastion.bundle.bundle()`
(see its docstring, and addons/mcp_bastion/README.md for the design): Gateway,
Auth, Admission, Policy, Pipeline, Gate, UpstreamCheck, UpstreamToken, Recorder,
AuditLog, Mitmweb, ContentView. mitmproxy calls each hook on them in that order.
"""

from mcp_bastion.bundle import bundle

addons = bundle()
