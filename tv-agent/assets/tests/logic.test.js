// The page's pure logic (../logic.js), without a browser: node's built-in test runner
// (node 18 or later): `node --test tv-agent/assets/tests/*.test.js`.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");

const L = require("../logic.js");
const O = require("../outcomes.js");

const CALL = O.call_state;
const END = O.end;
const DIAL = O.dial_failed;

test("the call follows the agent's events", () => {
  let call = L.idleCall(0);
  assert.equal(call.state, CALL.IDLE);
  assert.ok(L.isIdle(call));
  call = L.nextCall(call, { event: "incoming", call_id: 5, caller: 2002 }, 100);
  assert.deepEqual(call, { state: CALL.RINGING_IN, id: 5, peer: 2002, since: 100, muted: false });
  assert.ok(!L.onCallScreen(call), "an incoming call rings over the current screen");
  call = L.nextCall(call, { event: "answered", call_id: 5, peer: 2002, peer_media: "x" }, 200);
  assert.equal(call.state, CALL.IN_CALL);
  assert.ok(L.onCallScreen(call));
  const muted = L.nextCall(call, { event: "muted", call_id: 5, muted: true }, 250);
  assert.equal(muted.muted, true);
  assert.equal(call.muted, false, "the old state is not changed");
  assert.equal(muted.since, 200, "muting keeps the call's start");
  // An event for another call or an unrelated one leaves the call alone.
  assert.equal(L.nextCall(muted, { event: "ended", call_id: 4, outcome: END.HUNG_UP }, 300), muted);
  assert.equal(L.nextCall(muted, { event: "presence", states: [] }, 300), muted);
  const ended = L.nextCall(muted, { event: "ended", call_id: 5, outcome: END.HUNG_UP_BY_PEER }, 400);
  assert.deepEqual(ended, L.idleCall(400));
});

test("a dial rings out, and a snapshot restores the call", () => {
  const call = L.nextCall(L.idleCall(0), { event: "ringing", call_id: 9, callee: 3003 }, 10);
  assert.deepEqual(call, { state: CALL.RINGING_OUT, id: 9, peer: 3003, since: 10, muted: false });
  assert.ok(L.onCallScreen(call));
  const st = { user: 1001, registered: true, call_state: CALL.IN_CALL, call_id: 9, peer: 3003, since_ms: 77, muted: true };
  assert.deepEqual(L.callFromStatus(st), { state: CALL.IN_CALL, id: 9, peer: 3003, since: 77, muted: true });
});

test("cached calls merge into the missed list without duplicates, oldest first", () => {
  const a = { call_id: 1, user_id: 2002, user_netstate: 1, reason: O.missed.OFFLINE };
  const b = { call_id: 2, user_id: 3003, user_netstate: null, reason: O.missed.NO_ANSWER };
  const c = { call_id: 3, user_id: 2002, user_netstate: 0, reason: O.missed.BUSY };
  const list = [a];
  const merged = L.mergeMissed(list, [a, b, c, b]);
  assert.deepEqual(merged.map((m) => m.call_id), [1, 2, 3]);
  assert.deepEqual(list, [a], "the old list is not changed");
  assert.deepEqual(L.mergeMissed([], []), []);
  assert.deepEqual(L.presenceOf([a, b, c]), [[2002, O.presence.ONLINE], [2002, O.presence.OFFLINE]]);
  assert.equal(L.unseenCount(merged, 1), 2);
  assert.equal(L.unseenCount(merged, 3), 0);
  assert.equal(L.newestCallId(merged), 3);
  assert.equal(L.newestCallId([]), 0);
  assert.equal(L.reasonText(O.missed.OFFLINE), "while your TV was off");
  assert.equal(L.reasonText("future_reason"), "future_reason", "an unknown reason shows as is");
});

test("every call outcome has its own text", () => {
  const inCall = { state: CALL.IN_CALL, id: 5, peer: 2002, since: 0, muted: false };
  const texts = new Set();
  for (const outcome of Object.values(END)) {
    const text = L.endedText(outcome, "Gran", inCall);
    assert.ok(text.length > 0, outcome);
    texts.add(text);
  }
  assert.equal(texts.size, Object.values(END).length, "no two outcomes read the same");
  assert.equal(L.endedText(END.HUNG_UP_BY_PEER, "Gran", inCall), "Gran hung up.");
  assert.equal(L.endedText(END.REJECTED, "Gran", inCall), "Gran declined the call.");
  assert.equal(L.endedText("something_new", "Gran", inCall), "Call ended.");
  // Ringing here: rejected by us, otherwise missed.
  const ringingIn = { state: CALL.RINGING_IN, id: 6, peer: 2002, since: 0, muted: false };
  assert.equal(L.endedText(END.REJECTED, "Gran", ringingIn), "Call rejected.");
  assert.equal(L.endedText(END.NO_ANSWER, "Gran", ringingIn), "Missed call from Gran.");
  assert.equal(L.endedText(END.HUNG_UP_BY_PEER, "Gran", ringingIn), "Missed call from Gran.");
});

test("the ended toast gives the talk time of a hung-up call", () => {
  const inCall = { state: CALL.IN_CALL, id: 5, peer: 2002, since: 1000, muted: false };
  assert.deepEqual(L.endedToast(inCall, { outcome: END.HUNG_UP }, "Gran", 1000 + 65_000), { text: "Call ended. (1:05)", kind: "info" });
  assert.deepEqual(L.endedToast(inCall, { outcome: END.HUNG_UP_BY_PEER }, "Gran", 1000 + 3_600_000), { text: "Gran hung up. (1:00:00)", kind: "bad" });
  assert.deepEqual(L.endedToast(inCall, { outcome: END.PEER_LOST }, "Gran", 5000), { text: "The call with Gran was cut off.", kind: "bad" });
  const ringingOut = { state: CALL.RINGING_OUT, id: 5, peer: 2002, since: 1000, muted: false };
  assert.deepEqual(L.endedToast(ringingOut, { outcome: END.HUNG_UP }, "Gran", 9000), { text: "Call ended.", kind: "info" });
});

test("every dial failure has its own text", () => {
  const texts = new Set();
  for (const outcome of Object.values(DIAL)) {
    texts.add(L.dialFailedText({ outcome, callee: 4004, message: "odd reply" }, "TV 4004"));
  }
  assert.equal(texts.size, Object.values(DIAL).length);
  assert.equal(L.dialFailedText({ outcome: DIAL.UNKNOWN_USER, callee: 4004 }, "TV 4004"), "There is no TV with number 4004.");
  assert.equal(L.dialFailedText({ outcome: DIAL.FAILED, callee: 4004, message: "odd reply" }, "TV 4004"), "Cannot call TV 4004: odd reply");
});

test("durations read as m:ss or h:mm:ss", () => {
  assert.equal(L.mmss(0), "0:00");
  assert.equal(L.mmss(-5), "0:00");
  assert.equal(L.mmss(59_999), "0:59");
  assert.equal(L.mmss(3_599_000), "59:59");
  assert.equal(L.mmss(3_661_000), "1:01:01");
  assert.equal(L.stateText(O.presence.ONLINE), "TV on");
  assert.equal(L.stateText(O.presence.OFFLINE), "TV off");
  assert.equal(L.stateText(O.presence.BUSY), "Busy");
  assert.equal(L.stateText(undefined), "…");
  for (const w of Object.values(O.presence)) assert.notEqual(L.stateText(w), "…", w);
  assert.ok(L.reachable(O.presence.BUSY) && !L.reachable(O.presence.MOBILE));
});

test("news about a person takes down a message about them, and only then", () => {
  const P = O.presence;
  // The toast "TV 2002 is off. Your call is saved" while 2002 comes on, calls or answers.
  assert.ok(L.outdates(2002, { event: "presence", user: 2002, state: P.ONLINE }, P.OFFLINE));
  assert.ok(L.outdates(2002, { event: "incoming", call_id: 9, caller: 2002 }, P.OFFLINE));
  assert.ok(L.outdates(2002, { event: "ringing", call_id: 9, callee: 2002 }, P.OFFLINE));
  assert.ok(L.outdates(2002, { event: "answered", call_id: 9, peer: 2002 }, P.OFFLINE));
  // A fresh full state that says the same, or news about someone else, leaves it.
  assert.ok(!L.outdates(2002, { event: "presence", user: 2002, state: P.OFFLINE, full: true }, P.OFFLINE));
  assert.ok(!L.outdates(2002, { event: "presence", user: 3003, state: P.ONLINE }, P.OFFLINE));
  assert.ok(!L.outdates(2002, { event: "incoming", call_id: 9, caller: 3003 }, P.OFFLINE));
  assert.ok(!L.outdates(null, { event: "incoming", call_id: 9, caller: 2002 }, undefined));
});

test("the page's scripts spell no agent word themselves", () => {
  const words = new Set();
  for (const list of Object.values(O)) for (const w of Object.values(list)) words.add(w);
  assert.ok(words.has("hung_up_by_peer") && words.has("in_call") && words.has("offline"));
  for (const file of ["../logic.js", "../app.js"]) {
    const text = fs.readFileSync(path.join(__dirname, file), "utf8");
    for (const w of words) {
      for (const q of ['"', "'", "`"]) {
        assert.ok(!text.includes(q + w + q), `${file} spells ${q}${w}${q}: use OUTCOMES`);
      }
    }
  }
});

test("messages merge newest first, once each, and count the unread", () => {
  const m = (id, extra) => Object.assign({ message_id: id, kind: "text", text: `t${id}`, read: false }, extra);
  let list = L.mergeMessages([], [m(2), m(1)]);
  list = L.mergeMessages(list, [m(3), m(2, { text: "again" })]);
  assert.deepEqual(list.map((x) => x.message_id), [3, 2, 1]);
  assert.equal(list[1].text, "t2", "a message fetched again is not replaced");
  assert.equal(L.unreadCount(list), 3);
  assert.equal(L.unreadCount([m(1, { read: true }), m(2)]), 1);
});

test("a message is summed up in one line", () => {
  assert.equal(L.messageSummary({ kind: "voice", duration_ms: 3000, text: "" }), "Voice message · 0:03");
  assert.equal(L.messageSummary({ kind: "picture", width: 640, height: 480, text: "the beach" }), "Picture · 640×480 · “the beach”");
  assert.equal(L.messageSummary({ kind: "video", duration_ms: 61000, text: "" }), "Video · 1:01");
  const long = "word ".repeat(40);
  const s = L.messageSummary({ kind: "text", text: long });
  assert.ok(s.length === 60 && s.endsWith("…"), s);
});

test("leaving a message is offered after a cached, busy, unanswered or rejected call", () => {
  const ringingOut = { state: CALL.RINGING_OUT, id: 9, peer: 2002, since: 0, muted: false };
  const inCall = Object.assign({}, ringingOut, { state: CALL.IN_CALL });
  assert.equal(L.offersMessage(L.idleCall(0), { event: "cached", callee: 2002, call_id: 9 }), 2002);
  assert.equal(L.offersMessage(L.idleCall(0), { event: "dial_failed", callee: 2002, outcome: DIAL.BUSY }), 2002);
  assert.equal(L.offersMessage(L.idleCall(0), { event: "dial_failed", callee: 2002, outcome: DIAL.UNKNOWN_USER }), null);
  assert.equal(L.offersMessage(ringingOut, { event: "ended", call_id: 9, peer: 2002, outcome: END.NO_ANSWER }), 2002);
  assert.equal(L.offersMessage(ringingOut, { event: "ended", call_id: 9, peer: 2002, outcome: END.REJECTED }), 2002);
  assert.equal(L.offersMessage(inCall, { event: "ended", call_id: 9, peer: 2002, outcome: END.HUNG_UP_BY_PEER }), null);
});
