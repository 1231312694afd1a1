"""
What the Recorder and the AuditLog are made of, without mitmproxy's addon machinery.

- `sessions`: who a flow belongs to and which MCP session (names of recordings, audit records).
- `scrub`: credentials replaced with a marker in a flow's serialised state.
- `spool`: the bytes a client received on an event stream, in memory then on disk.
- `tnet`: a flow's state encoded as mitmproxy's tnetstring, in pieces (a spooled body stays on disk).
- `files`: the append-only session files, their naming and retention.
- `flowfile`: one finished flow, scrubbed and annotated, appended to its session file.
- `facts`: the plain facts of a flow that audit records are built from.
- `audit_writer`: the open, HMAC-chained audit log and its head file.

The command-line tools (`cli.forensics`) use these modules and import no addon.
"""
