"""
The bundle with recording, audit log and the MCP content view, for the
forensics end-to-end tests (until addons/bastion.py lists them):

    mitmdump -s tests/bundles/recording_bundle.py --mode reverse:http://127.0.0.1:PORT@LISTEN \\
        --set record_dir=... --set audit_log=... --set audit_key_file=...
"""

from mcp_bastion.auditlog import AuditLog
from mcp_bastion.contentview import ContentView
from mcp_bastion.gate import Gate
from mcp_bastion.gateway import Gateway
from mcp_bastion.recorder import Recorder

addons = [
    Gateway(),
    Gate(),
    Recorder(),
    AuditLog(),
    ContentView(),
]
