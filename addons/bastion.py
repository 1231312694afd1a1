"""
mcp-bastion: the whole bundle, loaded by one script.

    mitmdump -s addons/bastion.py --mode reverse:http://127.0.0.1:8000@8080 \\
        --set ruleset=rulesets/default.yaml --set oidc_issuer=https://idp.example.com

Order matters, because mitmproxy calls each hook on the addons in this order:

1. Gateway: claims MCP flows, checks Host/Origin, parses every body, streams SSE.
2. Auth: verifies the bearer token, removes it, puts the identity on the flow.
3. Policy: evaluates every message against the ruleset (masking and approval
   addons go right after it in the next wave).
4. Gate: nothing leaves unless every enforcement stage above marked the flow.
5. UpstreamCheck, UpstreamToken: only for requests that are really forwarded:
   answer a dead upstream with JSON, inject the upstream's own credential.
6. Recorder, AuditLog: record what the client actually received.
7. ContentView: the MCP view in mitmweb and the console.
"""

from mcp_bastion.bundle import bundle

addons = bundle()
