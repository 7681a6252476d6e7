// pinhole approver pages: WebAuthn ceremonies. No inline script (strict CSP).
"use strict";

async function post(url, body) {
  const res = await fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  const data = await res.json().catch(() => ({error: "bad response from broker"}));
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function show(msg, ok) {
  const el = document.getElementById("status");
  el.textContent = msg;
  el.className = ok ? "ok" : "err";
}

async function register(base) {
  const opts = await post(base + "/begin", {});
  const cred = await navigator.credentials.create({publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(opts)});
  await post(base + "/finish", {credential: cred.toJSON()});
  return "Security key registered. You can close this page.";
}

async function assertWith(base, extra) {
  const opts = await post(base + "/begin", extra);
  const cred = await navigator.credentials.get({publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(opts)});
  return post(base + "/finish", Object.assign({}, extra, {credential: cred.toJSON()}));
}

async function run(btn) {
  const page = document.body.dataset;
  const base = location.pathname;
  document.querySelectorAll("button").forEach(b => b.disabled = true);
  try {
    let msg;
    if (page.kind === "invite") {
      msg = await register(base);
    } else if (page.kind === "inviteconfirm") {
      const inv = await assertWith(base, {});
      msg = "Invite confirmed. Send this one-time link to " + inv.user + " (valid until " + inv.expires_at + "): " + inv.url;
    } else if (page.kind === "enroll") {
      await assertWith(base, {});
      msg = "Workstation confirmed. You can close this page.";
    } else {
      const r = await assertWith(base, {decision: btn.dataset.decision, view_hash: page.view});
      msg = btn.dataset.decision === "approve" ? "Approved (" + r.state + ")." : "Denied.";
    }
    show(msg, true);
  } catch (e) {
    show("Failed: " + e.message, false);
    document.querySelectorAll("button").forEach(b => b.disabled = false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button[data-action]").forEach(b => b.addEventListener("click", () => run(b)));
});
