// The activation screen's pure logic (../logic.js: formatCode, activationView), without a
// browser: `node --test tv-agent/assets/tests/*.test.js`.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");

const L = require("../logic.js");

test("a user code reads as ABCD-EFGH", () => {
  assert.equal(L.formatCode("BCDF-GHJK"), "BCDF-GHJK");
  assert.equal(L.formatCode("bcdfghjk"), "BCDF-GHJK");
  assert.equal(L.formatCode(""), "");
  assert.equal(L.formatCode(undefined), "");
});

test("a code counts down and says when it has run out", () => {
  const a = { state: "code", user_code: "BCDF-GHJK", expires_in_s: 900, expires_at_ms: 1_000_000, number: 1 };
  const v = L.activationView(a, 1_000_000 - 14 * 60_000 - 59_500);
  assert.equal(v.code, "BCDF-GHJK");
  assert.ok(v.lead.includes("operator"), v.lead);
  assert.equal(v.valid, "Valid for 14:59");
  assert.ok(v.status.includes("approve"));
  assert.equal(v.bad, false);
  const gone = L.activationView(a, 1_000_001);
  assert.ok(gone.valid.includes("new one"), gone.valid);
});

test("retries, refusals and the approval have their own words", () => {
  const r = L.activationView({ state: "retrying", reason: "connection refused", retry_in_ms: 4000, retry_at: 10_000 }, 7_500);
  assert.ok(r.status.includes("connection refused") && r.status.includes("in 3 s"), r.status);
  assert.equal(r.bad, true);
  const no = L.activationView({ state: "refused", reason: "the operator refused this TV" }, 0);
  assert.ok(no.status.startsWith("The operator refused this TV.") && no.status.includes("OK for a new code"), no.status);
  assert.equal(no.code, "Refused");
  assert.ok(no.lead.includes("did not activate"), no.lead);
  assert.equal(no.bad, true);
  const ok = L.activationView({ state: "enrolled", user_id: 2002 }, 0);
  assert.ok(ok.status.includes("2002"));
  const first = L.activationView({ state: "requesting" }, 0);
  assert.ok(first.status.includes("Asking"));
  assert.ok(L.activationView(null, 0).status.includes("Asking"));
});
