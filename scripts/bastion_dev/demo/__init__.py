"""The demo: a realistic MCP server, a dev issuer, and a scripted session through the gateway."""
