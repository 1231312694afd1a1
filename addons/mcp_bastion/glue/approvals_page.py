"""
The reviewer's page: the approval API's root, opened in a browser.

`GET /bastion/approvals` from a browser (an `Accept` naming `text/html`) gets
this page instead of JSON. It holds no data: its script asks the JSON API for
the requests the reviewer may see and decides them through it, with the
reviewer's own bearer token in the `Authorization` header (pasted once, kept in
the tab's `sessionStorage`, never in a cookie, so no other site can decide in
the reviewer's name). Everything shown is set as text, never as markup; a
content security policy with a per-response nonce allows only the page's own
script and requests to its own origin.

Without a token the page asks for one; the gateway serves it without one (it
is the same for everybody). No mitmproxy import.
"""

from __future__ import annotations

import secrets

PATH = "/bastion/approvals"


def wanted(method: str, path: str, accept: str) -> bool:
    """A browser asking for the page (rather than a program for the JSON list)."""
    if method not in ("GET", "HEAD") or path.split("?", 1)[0] not in (PATH, PATH + "/"):
        return False
    kinds = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    return "text/html" in kinds and ("application/json" not in kinds
                                     or kinds.index("text/html") < kinds.index("application/json"))


def render() -> tuple[bytes, dict[str, str]]:
    """The page and its headers (a fresh script nonce each time)."""
    nonce = secrets.token_urlsafe(16)
    headers = {
        "content-type": "text/html; charset=utf-8",
        "cache-control": "no-store",
        "content-security-policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                    "connect-src 'self'; img-src 'none'; form-action 'none'; "
                                    "frame-ancestors 'none'; base-uri 'none'"),
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    return _PAGE.replace("{{nonce}}", nonce).encode("utf-8"), headers


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mcp-bastion approvals</title>
<style nonce="{{nonce}}">
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .4em; text-align: left; vertical-align: top; }
pre { margin: 0; white-space: pre-wrap; word-break: break-all; max-width: 40em; }
.muted { color: #777; }
.error { color: #a00; }
button { margin: .1em; }
input[type=text], input[type=password] { width: 18em; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<h1>mcp-bastion: calls waiting for approval</h1>
<form id="signin" hidden>
  <p>Sign in with your own bearer token (the one your identity provider issues you; it stays in this tab).</p>
  <input id="token" type="password" autocomplete="off" placeholder="bearer token">
  <button id="signin-button" type="submit">Sign in</button>
</form>
<p id="who" class="muted" hidden><span id="who-text"></span> <button id="signout" type="button">Sign out</button></p>
<p id="status" class="error" role="status"></p>
<table id="requests" hidden>
  <thead><tr><th>Request</th><th>Requester</th><th>Call</th><th>Arguments</th><th>Rule</th><th>Expires</th>
  <th>Status</th><th>Decide</th></tr></thead>
  <tbody id="rows"></tbody>
</table>
<p id="empty" class="muted" hidden>Nothing is waiting for you.</p>
<script nonce="{{nonce}}">
"use strict";
const base = location.pathname.replace(/\\/+$/, "");
const $ = (id) => document.getElementById(id);
let shown = null;
function headers(extra) {
  const h = Object.assign({"accept": "application/json"}, extra || {});
  const token = sessionStorage.getItem("bastion-token");
  if (token) h["authorization"] = "Bearer " + token;
  return h;
}
function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value == null ? "" : String(value);
  if (cls) el.className = cls;
  return el;
}
function say(message) { $("status").textContent = message || ""; }
async function api(path, options) {
  const r = await fetch(base + path, Object.assign({cache: "no-store", credentials: "omit"}, options,
                                                   {headers: headers(options && options.headers)}));
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  return {status: r.status, body: body};
}
async function decide(id, verdict, reason) {
  const r = await api("/" + encodeURIComponent(id) + "/" + verdict, {method: "POST",
      headers: {"content-type": "application/json"}, body: JSON.stringify(reason ? {reason: reason} : {})});
  say(r.status === 200 ? "" : (r.body && r.body.error) || ("HTTP " + r.status));
  await load();
}
function row(a) {
  const tr = document.createElement("tr");
  tr.dataset.id = a.id;
  tr.appendChild(text("td", a.id));
  tr.appendChild(text("td", a.requester));
  tr.appendChild(text("td", (a.method || "") + " " + (a.tool || "")));
  const args = document.createElement("td");
  args.appendChild(text("pre", JSON.stringify(a.arguments, null, 2)));
  tr.appendChild(args);
  tr.appendChild(text("td", a.rule + (a.reason ? ": " + a.reason : "")));
  tr.appendChild(text("td", a.expires));
  tr.appendChild(text("td", a.status + (a.decided_by ? " by " + a.decided_by : "")));
  const cell = document.createElement("td");
  if (a.status === "pending" && a.can_decide !== false) {
    const reason = document.createElement("input");
    reason.type = "text"; reason.placeholder = "reason (needed to deny)"; reason.className = "reason";
    const approve = text("button", "Approve", "approve");
    approve.type = "button";
    approve.addEventListener("click", () => decide(a.id, "approve", reason.value.trim()));
    const deny = text("button", "Deny", "deny");
    deny.type = "button";
    deny.addEventListener("click", () => {
      if (!reason.value.trim()) { say("A denial needs a reason."); reason.focus(); return; }
      decide(a.id, "deny", reason.value.trim());
    });
    cell.append(reason, approve, deny);
  }
  tr.appendChild(cell);
  return tr;
}
async function load() {
  let r;
  try { r = await api("", {}); } catch (e) { say("The gateway did not answer: " + e); return; }
  if (r.status === 401 || r.status === 403) {
    shown = null;
    $("signin").hidden = false; $("who").hidden = true; $("requests").hidden = true; $("empty").hidden = true;
    if (sessionStorage.getItem("bastion-token")) say((r.body && r.body.error) || "That token was refused.");
    return;
  }
  if (r.status !== 200 || !Array.isArray(r.body)) { say((r.body && r.body.error) || ("HTTP " + r.status)); return; }
  $("signin").hidden = true;
  const me = await api("/me", {});
  if (me.status === 200 && me.body) {
    $("who-text").textContent = "Signed in as " + me.body.reviewer + " (" + (me.body.groups || []).join(", ") + ")";
    $("who").hidden = false;
  }
  const items = r.body.filter((a) => a.status === "pending").concat(r.body.filter((a) => a.status !== "pending"));
  const key = JSON.stringify(items.map((a) => [a.id, a.status, a.decided_by || ""]));
  if (key === shown) return;  // unchanged: keep what the reviewer is typing
  shown = key;
  $("rows").replaceChildren(...items.map(row));
  $("requests").hidden = items.length === 0;
  $("empty").hidden = items.some((a) => a.status === "pending");
}
$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem("bastion-token", token);
  $("token").value = "";
  say("");
  load();
});
$("signout").addEventListener("click", () => { sessionStorage.removeItem("bastion-token"); say(""); load(); });
load();
setInterval(load, 5000);
</script>
</body>
</html>
"""
