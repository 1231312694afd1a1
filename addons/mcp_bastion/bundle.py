"""
The one ordered list of mcp-bastion's addons.

`addons/bastion.py` (what `mitmdump -s` and `mitmweb -s` load), the demo, the
benchmark and every end-to-end test use `bundle()`; nothing else assembles addons.
"""

from __future__ import annotations

from mcp_bastion.addons.auditlog import AuditLog
from mcp_bastion.addons.auth import Auth, UpstreamToken
from mcp_bastion.addons.contentview import ContentView
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import Gateway, UpstreamCheck
from mcp_bastion.addons.policy import Policy
from mcp_bastion.addons.recorder import Recorder


def bundle() -> list:
    """A fresh instance of every addon, in the order mitmproxy runs their hooks."""
    return [
        Gateway(),
        Auth(),
        Policy(),
        Gate(),
        UpstreamCheck(),
        UpstreamToken(),
        Recorder(),
        AuditLog(),
        ContentView(),
    ]
