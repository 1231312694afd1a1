"""
Demo upstream: "acme-ops", an MCP server whose tools touch the kind of data an
organisation worries about. Nothing here is real, but it looks real enough for
detectors and rules to have something to do:

- `lookup_customer`: customer records with card numbers, emails and phone numbers
- `read_file`: a file reader whose files include a private key and an .env with secrets
- `search_logs`: log lines with tokens in them
- `deploy` and `drop_table`: destructive tools (nothing is actually deployed or dropped)
- a runbook resource and an incident-summary prompt

Run: python -m bastion_dev.demo.server --port 9000 [--transport streamable-http|sse]
"""

from __future__ import annotations

import argparse

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

CUSTOMERS = {
    "c-1001": {
        "id": "c-1001",
        "name": "Dana Whitfield",
        "email": "dana.whitfield@example.com",
        "phone": "+1 415 555 0142",
        "card": "4111 1111 1111 1111",
        "plan": "enterprise",
    },
    "c-1002": {
        "id": "c-1002",
        "name": "Marcus Oyelaran",
        "email": "m.oyelaran@example.org",
        "phone": "+44 20 7946 0958",
        "card": "5500-0000-0000-0004",
        "plan": "team",
    },
    "c-1003": {
        "id": "c-1003",
        "name": "Sofia Lindqvist",
        "email": "sofia@lindqvist.example",
        "phone": "+46 8 123 456 78",
        "card": "378282246310005",
        "plan": "free",
    },
}

# A syntactically valid PEM block with throw-away content: detectors key on its framing.
_FAKE_KEY_BODY = "\n".join(
    ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"]
    + ["MIIBCgKCAQEA" + "demoDEMOdemoDEMO" * 3 + "AB" for _ in range(6)]
    + ["kQIDAQAB"]
)

FILES = {
    "/srv/app/README.md": "# billing-api\n\nServes invoices. Deploy with `deploy billing-api prod`.\n",
    "/srv/app/.env": (
        "DATABASE_URL=postgres://billing:S3cr3t-pa55@db.internal:5432/billing\n"
        "STRIPE_SECRET_KEY=sk_live_51DemoDemoDemoDemoDemoDemo00\n"
        "AWS_ACCESS_KEY_ID=AKIADEMODEMODEMO1234\n"
    ),
    "/etc/ssl/private/deploy.pem": "-----BEGIN PRIVATE KEY-----\n" + _FAKE_KEY_BODY + "\n-----END PRIVATE KEY-----\n",
}

LOGS = [
    "2026-11-24T09:12:03Z INFO  billing-api request id=8f2 path=/invoices user=dana.whitfield@example.com",
    "2026-11-24T09:12:04Z WARN  billing-api retrying charge card=4111111111111111 attempt=2",
    "2026-11-24T09:13:44Z ERROR auth-proxy upstream refused Authorization: Bearer "
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJl",
    "2026-11-24T09:15:10Z INFO  deployer rolled out billing-api v2.14.1 to staging",
]


def build_server() -> MCPServer:
    mcp = MCPServer(
        "acme-ops",
        instructions="Operations tools for the ACME billing platform (demo data only).",
        version="1.0.0",
    )

    @mcp.tool(description="Look up a customer record by id (c-1001...) or email.")
    def lookup_customer(query: str) -> dict:
        for record in CUSTOMERS.values():
            if query in (record["id"], record["email"]):
                return record
        return {"error": f"no customer matches {query!r}"}

    @mcp.tool(description="List all customers (id, name, email, card on file).")
    def list_customers() -> dict:
        return {"customers": list(CUSTOMERS.values())}

    @mcp.tool(description="Read a file from the application host.")
    def read_file(path: str) -> str:
        if path not in FILES:
            raise ValueError(f"no such file: {path}")
        return FILES[path]

    @mcp.tool(description="Search recent log lines for a substring.")
    def search_logs(query: str) -> str:
        return "\n".join(line for line in LOGS if query.lower() in line.lower()) or "(no matches)"

    @mcp.tool(description="Deploy a service to an environment (destructive in prod).")
    def deploy(service: str, env: str) -> str:
        return f"deployment of {service} to {env} started (demo: nothing was deployed)"

    @mcp.tool(description="Drop a database table. Irreversible.")
    def drop_table(table: str) -> str:
        return f"table {table} dropped (demo: nothing was dropped)"

    @mcp.resource("acme://runbooks/oncall", description="The on-call runbook.")
    def oncall_runbook() -> str:
        return "1. Check dashboards.\n2. Page the owner.\n3. Never run drop_table during an incident.\n"

    @mcp.prompt(description="Summarise an incident for the status page.")
    def incident_summary(service: str) -> str:
        return f"Write a short, calm status-page summary of the ongoing incident affecting {service}."

    return mcp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="The demo upstream: acme-ops, an MCP server with realistic sensitive data.")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--transport", choices=("streamable-http", "sse"), default="streamable-http")
    args = ap.parse_args(argv)
    # The server only listens on loopback, behind the gateway, which enforces Host/Origin itself.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*"],
    )
    build_server().run(args.transport, host="127.0.0.1", port=args.port, transport_security=security)


if __name__ == "__main__":
    main()
