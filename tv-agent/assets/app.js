// The TV phone UI: state from the agent's event stream (/api/events), actions through
// its control API (/api/command) and address book (/api/contacts). Remote keys only:
// arrows move a focus ring between on-screen items, OK selects, Back goes back, digits
// dial, green calls or answers, red hangs up or rejects.
// A TV not activated yet shows only the activation screen (its code, from `activation`
// events) until the agent starts; the stream then ends and the page starts over.
// Messages: a tile with the unread count, a list (OK opens one in the viewer: a voice
// message or clip plays, a picture fills the screen, a text is read; green calls the
// sender back; Delete deletes it on the TV and the server), and after a call that did
// not get through, an offer to leave a voice or text message.
// The pure part (call state, missed-list merge, outcome texts) is TvLogic (logic.js); the
// agent's words come from OUTCOMES (/outcomes.js). Both load before this file.
"use strict";

const L = TvLogic;
const CALL = OUTCOMES.call_state;
const PRESENCE = OUTCOMES.presence;

// Remote key codes: HbbTV/CE-HTML VK_RED 403 / VK_GREEN 404, webOS Back 461, Tizen
// Back 10009. On a keyboard F1 is red and F2 green.
const RED = new Set(["ColorF0Red", "F1"]);
const GREEN = new Set(["ColorF1Green", "F2"]);
const BACK = new Set(["Escape", "Backspace", "BrowserBack", "GoBack"]);

const S = {
  me: null,
  registered: false,
  link: { down: false, retryAt: 0 },
  call: L.idleCall(0),
  missed: [],
  messages: [],
  // The message open in the viewer (its id), and whom a message is being left for.
  viewing: null,
  leaveFor: null,
  composeFor: null,
  recording: false,
  contacts: [],
  // Each contact's and caller's presence word, as the agent's pushes last said.
  presence: new Map(),
  // The viewer's own settings.
  dnd: false,
  hidden: false,
  // Whom the toast shown is about (a user number), so news about them takes it down.
  toastAbout: null,
  screen: "home",
  history: [],
  dial: "",
  edit: null,
  confirm: null,
  agentLost: false,
  activation: null,
};

const $ = (id) => document.getElementById(id);

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function nameOf(id) {
  const c = S.contacts.find((c) => c.user_id === id);
  return c ? c.name : null;
}
function label(id) {
  return nameOf(id) || `TV ${id}`;
}
function tvOf(id) {
  const n = nameOf(id);
  return n ? `${n}'s TV` : `TV ${id}`;
}
function stateOf(id) {
  return S.presence.has(id) ? S.presence.get(id) : undefined;
}
const stateText = L.stateText;
function when(rfc3339) {
  const d = new Date(rfc3339);
  if (isNaN(d)) return rfc3339;
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const day = (x) => new Date(x.getFullYear(), x.getMonth(), x.getDate()).getTime();
  const diff = Math.round((day(now) - day(d)) / 86400000);
  if (diff === 0) return `Today ${hm}`;
  if (diff === 1) return `Yesterday ${hm}`;
  return `${d.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" })} ${hm}`;
}
const mmss = L.mmss;

// ---- seen missed calls (the badge counts the ones not yet looked at) ----
function seenKey() {
  return `tvphone.seen.${S.me}`;
}
function seenUpTo() {
  return Number(localStorage.getItem(seenKey()) || 0);
}
function unseen() {
  return L.unseenCount(S.missed, seenUpTo());
}
function markSeen() {
  const max = L.newestCallId(S.missed);
  if (max > seenUpTo()) localStorage.setItem(seenKey(), String(max));
}

// ---- talking to the agent ----
// One JSON request to the agent; its `{"ok": …}` answer, or a failure the page can show.
async function request(method, url, body) {
  try {
    const r = await fetch(url, {
      method,
      headers: { "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : undefined,
    });
    return await r.json();
  } catch (e) {
    return { ok: false, error: "the TV agent is not answering" };
  }
}

function send(cmd) {
  return request("POST", "/api/command", cmd);
}

function contactsRequest(method, id, body) {
  return request(method, `/api/contacts/${encodeURIComponent(id)}`, body);
}

async function dial(to) {
  if (!to) return;
  if (!L.isIdle(S.call)) {
    toast("Finish the current call first.", "bad");
    return;
  }
  const r = await send({ cmd: "dial", to });
  // ringing, cached, busy and the other outcomes arrive as events too; only a reply
  // that no event covers is shown here.
  if (!r.ok && !r.outcome) toast(r.error || "Cannot dial now.", "bad");
}

// ---- messages ----
let toastTimer = 0;
// Shows a message for a few seconds; `about` names the user it speaks of, if any.
function toast(text, kind, about) {
  const t = $("toast");
  t.textContent = text;
  t.dataset.kind = kind || "info";
  t.hidden = false;
  S.toastAbout = about === undefined ? null : about;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(hideToast, 6000);
}
function hideToast() {
  $("toast").hidden = true;
  S.toastAbout = null;
}

// ---- events from the agent ----
function apply(ev) {
  // A message about someone goes as soon as something newer about them happens.
  if (S.toastAbout !== null && L.outdates(S.toastAbout, ev, stateOf(S.toastAbout))) hideToast();
  switch (ev.event) {
    case "activation":
      S.activation = Object.assign({}, ev.activation, { retry_at: Date.now() + (ev.activation.retry_in_ms || 0) });
      S.call = L.idleCall(Date.now());
      S.confirm = null;
      if (S.screen !== "activate") {
        S.history = [];
        S.screen = "activate";
        render(true);
        return;
      }
      break;
    case "snapshot": {
      if (S.activation !== null) {
        // Activated: the normal screens from now on.
        S.activation = null;
        S.history = [];
        S.screen = "home";
        if (ev.status) toast(`This TV is activated. Its number is ${ev.status.user}.`);
      }
      const st = ev.status;
      if (st) {
        S.me = st.user;
        S.registered = st.registered;
        S.link.down = false;
        S.call = L.callFromStatus(st);
        S.dnd = !!st.do_not_disturb;
        S.hidden = !!st.hidden;
      }
      S.missed = ev.missed || [];
      S.messages = L.mergeMessages([], ev.messages || []);
      S.contacts = ev.contacts || [];
      S.presence = new Map((ev.presence || []).map((p) => [p.user, p.state]));
      if (L.onCallScreen(S.call)) show("call", false);
      else if (S.screen === "call") home();
      else deepLink();
      break;
    }
    case "registered":
      if (S.link.down && S.me !== null) toast("Connected to the call service again.");
      S.me = ev.user;
      S.registered = true;
      S.link.down = false;
      break;
    case "link_down":
      S.registered = false;
      S.link = { down: true, retryAt: Date.now() + ev.retry_in_ms, allowance: ev.allowance_exhausted ? ev.reason : null };
      break;
    case "cached_calls":
      S.missed = L.mergeMissed(S.missed, ev.calls);
      // A caller's state as the fetch found it, where no push has told it yet.
      for (const [id, st] of L.presenceOf(ev.calls)) if (!S.presence.has(id)) S.presence.set(id, st);
      if (ev.calls.length && S.screen === "missed") markSeen();
      break;
    case "incoming":
      S.call = L.nextCall(S.call, ev, Date.now());
      break;
    case "ringing":
      S.call = L.nextCall(S.call, ev, Date.now());
      show("call");
      break;
    case "messages":
      S.messages = L.mergeMessages(S.messages, ev.messages);
      if (ev.messages.length && S.screen !== "messages") {
        const m = ev.messages[0];
        toast(`New message from ${label(m.sender)}: ${L.messageSummary(m)}`, "info", m.sender);
      }
      break;
    case "cached":
      offerMessage(ev);
      toast(`${tvOf(ev.callee)} is off. Your call is saved: they will see it when they switch it on.`, "info", ev.callee);
      if (L.reachable(stateOf(ev.callee)) || !S.presence.has(ev.callee)) S.presence.set(ev.callee, PRESENCE.OFFLINE);
      break;
    case "dial_failed":
      offerMessage(ev);
      toast(L.dialFailedText(ev, label(ev.callee)), "bad", ev.callee);
      break;
    case "answered":
      S.call = L.nextCall(S.call, ev, Date.now());
      show("call", S.screen !== "call");
      break;
    case "muted":
      S.call = L.nextCall(S.call, ev, Date.now());
      break;
    case "no_media":
      // Connected, but no path for the sound: say so rather than leave silence.
      if (S.call.id === ev.call_id) toast(ev.message, "bad", S.call.peer);
      break;
    case "ended": {
      if (S.call.id !== ev.call_id) break;
      const before = S.call;
      const now = Date.now();
      const t = L.endedToast(S.call, ev, label(ev.peer), now);
      toast(t.text, t.kind, ev.peer);
      S.call = L.nextCall(S.call, ev, now);
      if (S.screen === "call") back();
      offerMessage(ev, before);
      break;
    }
    case "missed_cleared":
      S.missed = [];
      break;
    case "presence":
      S.presence.set(ev.user, ev.state);
      break;
    case "presence_settings":
      S.dnd = ev.do_not_disturb;
      S.hidden = ev.hidden;
      break;
    case "contacts":
      S.contacts = ev.contacts;
      break;
    case "powered_off":
      S.registered = false;
      S.agentLost = true;
      break;
  }
  render();
}

// The event stream from the agent. The browser reconnects by itself; only if that keeps
// failing for a few seconds does the page say the TV phone is not answering, so a blip
// (the agent restarting) does not flash a red banner.
const AGENT_LOST_AFTER_MS = 4000;
let lostTimer = 0;
function connect() {
  const es = new EventSource("/api/events");
  es.onmessage = (m) => {
    clearTimeout(lostTimer);
    lostTimer = 0;
    S.agentLost = false;
    try {
      apply(JSON.parse(m.data));
    } catch (e) {
      console.error("bad event", e);
    }
  };
  es.onerror = () => {
    if (!lostTimer && !S.agentLost) {
      lostTimer = setTimeout(() => {
        lostTimer = 0;
        S.agentLost = true;
        render();
      }, AGENT_LOST_AFTER_MS);
    }
  };
}

// ---- ringing ----
// A ring tone made in the page (no sound files): 440+480 Hz, 2 s on, 4 s off, while a call
// rings here. Browsers may refuse sound before the first key press; then it stays quiet.
let ring = null;
function ringTone(on) {
  if (on && !ring) {
    try {
      const ctx = new AudioContext();
      const gain = ctx.createGain();
      gain.gain.value = 0;
      gain.connect(ctx.destination);
      for (const f of [440, 480]) {
        const o = ctx.createOscillator();
        o.frequency.value = f;
        o.connect(gain);
        o.start();
      }
      const cycle = () => {
        const t = ctx.currentTime;
        gain.gain.setValueAtTime(0.15, t);
        gain.gain.setValueAtTime(0, t + 2);
      };
      cycle();
      ring = { ctx, timer: setInterval(cycle, 6000) };
    } catch (e) {
      ring = null;
    }
  } else if (!on && ring) {
    clearInterval(ring.timer);
    ring.ctx.close();
    ring = null;
  }
}

// ---- screens and navigation ----
function show(screen, remember = true) {
  if (screen === S.screen) return;
  if (remember) S.history.push(S.screen);
  S.screen = screen;
  if (screen === "missed") markSeen();
  if (screen === "dial") S.dial = S.dial || "";
  render(true);
}
function home() {
  S.history = [];
  S.screen = "home";
  render(true);
}
function back() {
  if (!$("confirm").hidden) {
    S.confirm = null;
    render();
    return;
  }
  if (S.leaveFor !== null) {
    S.leaveFor = null;
    render(true);
    return;
  }
  if (S.viewing !== null) {
    closeViewer();
    return;
  }
  const prev = S.history.pop() || "home";
  S.screen = prev === "call" ? "home" : prev;
  render(true);
}

function layer() {
  if (!$("incoming").hidden) return $("incoming");
  if (!$("confirm").hidden) return $("confirm");
  if (!$("leave").hidden) return $("leave");
  if (!$("viewer").hidden) return $("viewer");
  return $(`screen-${S.screen}`);
}

function focusables() {
  return [...layer().querySelectorAll(".focusable")].filter((el) => el.offsetParent !== null && !el.disabled);
}

function focusFirst() {
  const f = focusables();
  if (f.length) f[0].focus();
}

// Moves focus to the nearest item in the arrow's direction (spatial navigation).
function move(dir) {
  const items = focusables();
  const cur = document.activeElement;
  if (!items.includes(cur)) {
    focusFirst();
    return;
  }
  const a = cur.getBoundingClientRect();
  const ax = a.left + a.width / 2;
  const ay = a.top + a.height / 2;
  let best = null;
  let bestScore = Infinity;
  for (const el of items) {
    if (el === cur) continue;
    const b = el.getBoundingClientRect();
    const bx = b.left + b.width / 2;
    const by = b.top + b.height / 2;
    let along;
    let across;
    if (dir === "ArrowRight") { along = b.left - a.right; across = Math.abs(by - ay); if (bx <= ax) continue; }
    if (dir === "ArrowLeft") { along = a.left - b.right; across = Math.abs(by - ay); if (bx >= ax) continue; }
    if (dir === "ArrowDown") { along = b.top - a.bottom; across = Math.abs(bx - ax); if (by <= ay) continue; }
    if (dir === "ArrowUp") { along = a.top - b.bottom; across = Math.abs(bx - ax); if (by >= ay) continue; }
    const score = Math.max(along, 0) + across * 2;
    if (score < bestScore) { bestScore = score; best = el; }
  }
  if (best) best.focus();
}

function activate(el) {
  if (!el) return;
  const d = el.dataset;
  if (d.go) return show(d.go);
  if (d.call && !d.action) return dial(Number(d.call));
  if (d.digit !== undefined) return typeDigit(d.digit);
  switch (d.action) {
    case "back": return back();
    case "answer": return send({ cmd: "answer" }).then(failed);
    case "reject": return send({ cmd: "reject" }).then(failed);
    case "hangup": return send({ cmd: "hangup" }).then(failed);
    case "mute": return send({ cmd: "mute", muted: !S.call.muted }).then(failed);
    case "dial": return dial(Number(S.dial));
    case "delete-digit": S.dial = S.dial.slice(0, -1); return render();
    case "add-contact": return editContact(null);
    case "edit-contact": return editContact(Number(d.user));
    case "delete-contact": {
      const id = Number(d.user);
      return ask(`Delete ${label(id)} from contacts?`, "Delete", () => deleteContact(id));
    }
    case "dnd":
      return send({ cmd: "dnd", on: !S.dnd }).then(settingsAnswer);
    case "hide":
      return send({ cmd: "hide", on: !S.hidden }).then(settingsAnswer);
    case "clear-missed":
      return ask("Clear the list of missed calls?", "Clear", clearMissed);
    case "open-message": return openMessage(Number(d.message));
    case "viewer-call": {
      const m = viewed();
      if (!m) return;
      closeViewer();
      return dial(m.sender);
    }
    case "viewer-replay": return playViewed();
    case "viewer-delete": {
      const m = viewed();
      return m && ask(`Delete this message from ${label(m.sender)}?`, "Delete", () => deleteMessage(m.message_id));
    }
    case "leave-voice": return leaveVoice();
    case "leave-text": {
      const to = S.leaveFor;
      S.leaveFor = null;
      return compose(to);
    }
    case "new-code":
      return request("POST", "/api/activation", { cmd: "new_code" }).then(failed);
    case "confirm-yes": {
      const run = S.confirm && S.confirm.run;
      S.confirm = null;
      render();
      return run && run();
    }
  }
  if (el.type === "submit") el.form.requestSubmit();
}

// A yes/no question over the current screen; OK on the first button says yes.
function ask(text, yes, run) {
  S.confirm = { text, yes, run };
  render();
}

async function clearMissed() {
  const r = await send({ cmd: "clear_missed" });
  if (r.ok) S.missed = [];
  else failed(r);
  render();
}

function settingsAnswer(r) {
  if (r && r.ok) {
    S.dnd = r.do_not_disturb;
    S.hidden = r.hidden;
    render();
  } else failed(r);
}

function failed(r) {
  if (r && r.ok === false) toast(r.error || "That did not work.", "bad");
}

// ---- messages ----
function viewed() {
  return S.messages.find((m) => m.message_id === S.viewing) || null;
}

function openMessage(id) {
  const m = S.messages.find((x) => x.message_id === id);
  if (!m) return;
  S.viewing = id;
  if (!m.read) {
    m.read = true;
    send({ cmd: "read_message", id }).then(failed);
  }
  const body = `/api/messages/${id}/body`;
  const img = $("viewer-img");
  const video = $("viewer-video");
  const audio = $("viewer-audio");
  img.hidden = m.kind !== "picture";
  video.hidden = m.kind !== "video";
  audio.hidden = true;
  $("viewer-playing").hidden = m.kind !== "voice";
  if (m.kind === "picture") img.src = body;
  if (m.kind === "video") video.src = body;
  if (m.kind === "voice") audio.src = body;
  render(true);
  playViewed();
}

// Plays the open voice message or clip from its start (OK on "Play again").
function playViewed() {
  const m = viewed();
  if (!m || (m.kind !== "voice" && m.kind !== "video")) return;
  const el = m.kind === "voice" ? $("viewer-audio") : $("viewer-video");
  el.currentTime = 0;
  const p = el.play();
  if (p && p.catch) p.catch((e) => toast(`Cannot play this message: ${e.message || e}`, "bad"));
}

function closeViewer() {
  for (const id of ["viewer-audio", "viewer-video"]) {
    const el = $(id);
    el.pause();
    el.removeAttribute("src");
    el.load();
  }
  $("viewer-img").removeAttribute("src");
  const id = S.viewing;
  S.viewing = null;
  render();
  // Back on the message's row (or the first one, if it was deleted).
  const row = document.querySelector(`[data-key="message-${id}"]`);
  if (row) row.focus();
  else focusFirst();
}

async function deleteMessage(id) {
  const r = await send({ cmd: "delete_message", id });
  if (!r.ok) return failed(r);
  S.messages = S.messages.filter((m) => m.message_id !== id);
  if (S.viewing === id) closeViewer();
  toast(r.server === false ? "Deleted on this TV. The call service will drop its copy later." : "Message deleted.");
  render();
}

// A launcher may open the page at `#messages` (the messages screen) or `#message/ID`
// (that message open), once, at the first snapshot.
let linked = false;
function deepLink() {
  if (linked) return;
  linked = true;
  const m = /^#message(?:s|\/(\d+))$/.exec(location.hash);
  if (!m) return;
  if (S.screen !== "messages") show("messages");
  if (m[1]) openMessage(Number(m[1]));
}

// After a call that did not get through: offers to leave a message for the callee.
function offerMessage(ev, call = S.call) {
  const to = L.offersMessage(call, ev);
  if (to === null || to === undefined || S.recording) return;
  S.leaveFor = to;
}

const VOICE_SECONDS = 10;
async function leaveVoice() {
  const to = S.leaveFor;
  S.leaveFor = null;
  if (to === null) return;
  S.recording = true;
  toast(`Recording a ${VOICE_SECONDS}-second voice message for ${label(to)}… speak now.`, "info", to);
  render(true);
  const r = await send({ cmd: "send_message", to, voice_seconds: VOICE_SECONDS });
  S.recording = false;
  sentMessage(r, to);
}

function compose(to) {
  S.composeFor = to;
  show("compose");
  $("compose-title").textContent = `Message for ${label(to)}`;
  $("compose-text").value = "";
  $("compose-error").textContent = "";
  $("compose-text").focus();
}

async function sendComposed(ev) {
  ev.preventDefault();
  const text = $("compose-text").value.trim();
  if (!text) {
    $("compose-error").textContent = "Type a message first.";
    return;
  }
  const to = S.composeFor;
  const r = await send({ cmd: "send_message", to, text });
  if (!r.ok) {
    $("compose-error").textContent = r.error || "Could not send.";
    return;
  }
  back();
  sentMessage(r, to);
}

function sentMessage(r, to) {
  if (r.ok) {
    const note = r.outcome === "delivered" ? "they have it now" : "they will see it when they switch their TV on";
    toast(`Message left for ${label(to)}: ${note}.`, "info", to);
  } else {
    toast(`The message was not sent: ${r.error || r.outcome}`, "bad", to);
  }
  render();
}

function messageRow(m, big) {
  return `<li><button class="row focusable message${m.read ? "" : " unread"}" data-key="message-${m.message_id}" data-action="open-message" data-message="${m.message_id}" data-call="${m.sender}">
    ${dot(m.sender)}<span class="who"><b>${esc(label(m.sender))}</b></span>
    <span class="what">${esc(L.messageSummary(m))}</span>
    <span class="when">${esc(when(new Date(m.sent_ms).toISOString()))}</span>
    ${big ? `<span class="act">OK: open</span>` : ""}</button></li>`;
}

function renderMessages() {
  const rows = windowed(S.messages, (m) => m.message_id, MAX_LIST_ROWS);
  $("messages-list").innerHTML = S.messages.length ? rows.map((m) => messageRow(m, true)).join("") : `<li class="empty">No messages.</li>`;
}

function renderViewer() {
  const m = viewed();
  $("viewer").hidden = !m || S.call.state === CALL.RINGING_IN;
  if (!m) return;
  $("viewer-from").textContent = `From ${label(m.sender)}`;
  $("viewer-when").textContent = `${when(new Date(m.sent_ms).toISOString())} · ${L.messageSummary(m)}`;
  $("viewer-text").textContent = m.text || "";
  $("viewer-playing").textContent = m.kind === "voice" ? `Voice message${m.duration_ms ? ` · ${mmss(m.duration_ms)}` : ""}` : "";
  $("viewer-replay").hidden = m.kind !== "voice" && m.kind !== "video";
}

function typeDigit(d) {
  if (S.dial.length >= 19) return;
  S.dial += d;
  render();
}

function editContact(id) {
  S.edit = id === null ? { id: null, name: "", number: "" } : { id, name: nameOf(id) || "", number: String(id) };
  show("edit");
  $("edit-name").value = S.edit.name;
  $("edit-number").value = S.edit.number;
  $("edit-error").textContent = "";
  $("edit-name").focus();
}

async function saveContact(ev) {
  ev.preventDefault();
  const name = $("edit-name").value.trim();
  const digits = $("edit-number").value.trim();
  const number = Number(digits);
  if (!name) return showEditError("Type a name.", "edit-name");
  if (!/^[0-9]{1,19}$/.test(digits) || !Number.isSafeInteger(number) || number <= 0)
    return showEditError("The TV number is digits only, like 2002.", "edit-number");
  const r = await contactsRequest("PUT", number, { name });
  if (!r.ok) return showEditError(r.error || "Could not save.", "edit-name");
  if (S.edit && S.edit.id !== null && S.edit.id !== number) await contactsRequest("DELETE", S.edit.id);
  S.contacts = r.contacts || S.contacts;
  toast(`Saved ${name}.`);
  back();
}

function showEditError(text, field) {
  $("edit-error").textContent = text;
  $(field).focus();
}

async function deleteContact(id) {
  const who = label(id);
  const r = await contactsRequest("DELETE", id);
  if (r.ok) {
    S.contacts = r.contacts || S.contacts.filter((c) => c.user_id !== id);
    toast(`Deleted ${who}.`);
  } else toast(r.error || "Could not delete.", "bad");
  render();
}

function onKey(e) {
  const k = e.key;
  const code = e.keyCode;
  if (S.screen === "activate") {
    // Nothing to dial or answer yet: arrows and OK only (OK asks for a new code after
    // a refusal).
    e.preventDefault();
    if (k.startsWith("Arrow")) return move(k);
    if (k === "Enter") return activate(document.activeElement);
    return;
  }
  const inInput = e.target && e.target.tagName === "INPUT";
  const incoming = !$("incoming").hidden;
  if (RED.has(k) || code === 403) {
    e.preventDefault();
    if (S.call.state === CALL.RINGING_IN) send({ cmd: "reject" }).then(failed);
    else if (!L.isIdle(S.call)) send({ cmd: "hangup" }).then(failed);
    return;
  }
  if (GREEN.has(k) || code === 404) {
    e.preventDefault();
    if (S.call.state === CALL.RINGING_IN) return void send({ cmd: "answer" }).then(failed);
    if (!L.isIdle(S.call)) return;
    const el = document.activeElement;
    const open = viewed();
    if (open) {
      closeViewer();
      return void dial(open.sender);
    }
    if (S.screen === "dial") return void dial(Number(S.dial));
    if (el && el.dataset && el.dataset.call) return void dial(Number(el.dataset.call));
    return void show("dial");
  }
  if (BACK.has(k) || code === 461 || code === 10009) {
    if (inInput && k === "Backspace" && e.target.value) return; // deleting typed text
    e.preventDefault();
    if (incoming) return void send({ cmd: "reject" }).then(failed);
    if (!$("leave").hidden || !$("viewer").hidden) return back();
    if (S.screen === "dial" && S.dial && $("confirm").hidden) {
      S.dial = S.dial.slice(0, -1);
      return render();
    }
    if (S.screen === "call") return; // hang up with the red key or the on-screen button
    return back();
  }
  if (k.startsWith("Arrow")) {
    if (inInput && (k === "ArrowLeft" || k === "ArrowRight")) return; // caret
    e.preventDefault();
    return move(k);
  }
  if (k === "Enter") {
    if (inInput) return; // submits the form
    e.preventDefault();
    return activate(document.activeElement);
  }
  const overlay = !$("confirm").hidden || !$("viewer").hidden || !$("leave").hidden;
  if (/^[0-9]$/.test(k) && !inInput && !incoming && L.isIdle(S.call) && !overlay) {
    e.preventDefault();
    if (S.screen !== "dial") {
      S.dial = "";
      show("dial");
    }
    typeDigit(k);
  }
}

// ---- rendering ----
function dot(id) {
  const st = stateOf(id);
  return `<span class="dot" data-state="${st === undefined ? "" : st}"></span>`;
}

function missedRow(m, big) {
  const st = stateOf(m.user_id);
  const act = st === PRESENCE.OFFLINE || st === PRESENCE.MOBILE ? "OK: leave a call request" : "OK: call back";
  return `<li><button class="row focusable missed" data-key="missed-${m.call_id}" data-call="${m.user_id}">
    ${dot(m.user_id)}<span class="who"><b>${esc(label(m.user_id))}</b>${nameOf(m.user_id) ? `<span class="num">${m.user_id}</span>` : ""}
    ${big ? `<span class="why"> · ${esc(L.reasonText(m.reason))}</span>` : ""}</span>
    <span class="state" data-state="${st ?? ""}">${stateText(st)}</span>
    <span class="when">${esc(when(m.call_date))}</span>
    ${big ? `<span class="act">${act}</span>` : ""}</button></li>`;
}

function contactRow(c, withEdit) {
  const st = stateOf(c.user_id);
  const main = `<button class="row focusable contact" data-key="contact-${c.user_id}" data-call="${c.user_id}">
    ${dot(c.user_id)}<span class="who"><b>${esc(c.name)}</b><span class="num">${c.user_id}</span></span>
    <span class="state" data-state="${st ?? ""}">${stateText(st)}</span></button>`;
  if (!withEdit) return `<li>${main}</li>`;
  return `<li class="row-line">${main}
    <button class="row small focusable" data-key="edit-${c.user_id}" data-action="edit-contact" data-user="${c.user_id}">Edit</button>
    <button class="row small focusable" data-key="delete-${c.user_id}" data-action="delete-contact" data-user="${c.user_id}">Delete</button></li>`;
}

const MAX_HOME_ROWS = 5;
const MAX_LIST_ROWS = 8;

function renderHome() {
  const n = unseen();
  $("badge").textContent = String(n);
  $("badge").dataset.count = String(n);
  $("badge-note").textContent = S.missed.length ? `${S.missed.length} since the TV was switched on` : "None";
  $("contacts-count").textContent = String(S.contacts.length);
  const unread = L.unreadCount(S.messages);
  $("msg-badge").textContent = String(unread);
  $("msg-badge").dataset.count = String(unread);
  $("msg-note").textContent = S.messages.length ? `${unread} unread of ${S.messages.length}` : "None";
  const recent = [...S.missed].reverse().slice(0, MAX_HOME_ROWS);
  $("home-missed").innerHTML = recent.length ? recent.map((m) => missedRow(m, false)).join("") : `<li class="empty">No missed calls.</li>`;
  const cs = S.contacts.slice(0, MAX_HOME_ROWS);

  $("home-contacts").innerHTML = cs.length ? cs.map((c) => contactRow(c, false)).join("") : `<li class="empty">No contacts yet: open Contacts to add one.</li>`;
}

// Long lists scroll with the focus: only a window of rows around the focused one.
function windowed(items, keyOf, max) {
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : "";
  let at = items.findIndex((x) => focused && focused.endsWith(`-${keyOf(x)}`));
  if (at < 0) at = 0;
  const start = Math.max(0, Math.min(at - Math.floor(max / 2), items.length - max));
  return items.slice(start, start + max);
}

function renderMissed() {
  const all = [...S.missed].reverse();
  const rows = windowed(all, (m) => m.call_id, MAX_LIST_ROWS);
  $("missed-list").innerHTML = all.length ? rows.map((m) => missedRow(m, true)).join("") : `<li class="empty">No missed calls.</li>`;
  $("clear-missed").hidden = !all.length;
}

function renderContacts() {
  const add = `<li><button class="row focusable" data-key="add-contact" data-action="add-contact"><b>+ Add a contact</b></button></li>`;
  const rows = windowed(S.contacts, (c) => c.user_id, MAX_LIST_ROWS - 1);
  $("contacts-list").innerHTML = add + rows.map((c) => contactRow(c, true)).join("");
}

function renderDial() {
  $("dial-number").textContent = S.dial;
  const n = Number(S.dial);
  const name = S.dial ? nameOf(n) : null;
  $("dial-name").textContent = name ? `${name} · ${stateText(stateOf(n))}` : "";
  if (!$("keypad").childElementCount) {
    const keys = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "del", "0", "call"];
    $("keypad").innerHTML = keys
      .map((k) =>
        k === "del" ? `<button class="key-btn del focusable" data-key="key-del" data-action="delete-digit">Delete</button>`
        : k === "call" ? `<button class="key-btn call focusable" data-key="key-call" data-action="dial">Call</button>`
        : `<button class="key-btn focusable" data-key="key-${k}" data-digit="${k}">${k}</button>`)
      .join("");
  }
}

function renderCall() {
  const c = S.call;
  const peer = c.peer;
  $("call-peer").textContent = peer === null ? "" : label(peer);
  $("call-number").textContent = peer !== null && nameOf(peer) ? `TV ${peer}` : "";
  $("call-avatar").textContent = peer === null ? "" : label(peer).slice(0, 1).toUpperCase();
  $("call-state").textContent = c.state === CALL.RINGING_OUT ? "Calling…" : c.state === CALL.IN_CALL ? (c.muted ? "In call · microphone muted" : "In call") : "";
  $("call-time").textContent = c.state === CALL.IN_CALL ? mmss(Date.now() - c.since) : "";
  $("btn-mute").textContent = c.muted ? "Unmute" : "Mute";
  $("btn-mute").setAttribute("aria-pressed", String(!!c.muted));
  $("btn-mute").hidden = c.state !== CALL.IN_CALL;
  $("btn-hangup").textContent = c.state === CALL.RINGING_OUT ? "Cancel" : "Hang up";
}

function renderActivate() {
  const a = S.activation;
  const v = L.activationView(a, Date.now());
  $("activate-lead").textContent = v.lead;
  const code = $("activate-code");
  code.textContent = v.code;
  code.dataset.state = a ? a.state : "requesting";
  $("activate-valid").textContent = v.valid;
  $("activate-status").textContent = v.status;
  $("activate-status").dataset.kind = v.bad ? "bad" : "info";
  $("activate-new-code").hidden = !(a && a.state === "refused");
}

function renderChrome() {
  $("me").textContent = S.me === null ? "" : `My number ${S.me}`;
  // The viewer's own switches (on the home screen).
  $("btn-dnd").textContent = `Do not disturb: ${S.dnd ? "on" : "off"}`;
  $("btn-dnd").setAttribute("aria-pressed", String(S.dnd));
  $("btn-hide").textContent = `Hide my state: ${S.hidden ? "on" : "off"}`;
  $("btn-hide").setAttribute("aria-pressed", String(S.hidden));
  const pill = $("link");
  const banner = $("banner");
  if (S.activation !== null && !S.agentLost) {
    pill.dataset.state = "activate";
    pill.textContent = "Not activated";
    banner.hidden = true;
  } else if (S.agentLost) {
    pill.dataset.state = "agent-lost";
    pill.textContent = "TV phone not running";
    banner.textContent = "The TV phone service is not answering. Trying again…";
    banner.hidden = false;
  } else if (S.link.down && S.link.allowance) {
    pill.dataset.state = "allowance";
    pill.textContent = "Service paused";
    banner.textContent = `Calls are paused (${S.link.allowance}). Ask your provider, or wait for the next period.`;
    banner.hidden = false;
  } else if (S.link.down) {
    pill.dataset.state = "down";
    pill.textContent = "Reconnecting…";
    const secs = Math.max(0, Math.ceil((S.link.retryAt - Date.now()) / 1000));
    banner.textContent = `Network down: cannot reach the call service. Reconnecting${secs ? ` in ${secs} s` : ""}…`;
    banner.hidden = false;
  } else {
    pill.dataset.state = S.registered ? "connected" : "connecting";
    pill.textContent = S.registered ? "Online" : "Connecting…";
    banner.hidden = true;
  }
  const now = new Date();
  $("clock").textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function render(screenChanged = false) {
  const focusedKey = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : null;
  document.body.dataset.screen = S.screen;
  document.body.dataset.call = S.call.state;
  for (const s of document.querySelectorAll(".screen")) s.hidden = s.id !== `screen-${S.screen}`;
  renderChrome();
  if (S.screen === "home") renderHome();
  if (S.screen === "missed") renderMissed();
  if (S.screen === "messages") renderMessages();
  if (S.screen === "contacts") renderContacts();
  if (S.screen === "dial") renderDial();
  if (S.screen === "activate") renderActivate();
  renderCall();
  const ringing = S.call.state === CALL.RINGING_IN;
  $("incoming").hidden = !ringing;
  ringTone(ringing);
  if (ringing) {
    $("incoming-peer").textContent = label(S.call.peer);
    $("incoming-number").textContent = nameOf(S.call.peer) ? `TV ${S.call.peer}` : "";
  }
  renderViewer();
  $("leave").hidden = ringing || S.leaveFor === null;
  if (S.leaveFor !== null) $("leave-text").textContent = `${tvOf(S.leaveFor)} did not answer. Leave a message?`;
  $("confirm").hidden = ringing || S.confirm === null;
  if (S.confirm !== null) {
    $("confirm-text").textContent = S.confirm.text;
    $("confirm-yes").textContent = S.confirm.yes;
  }
  // Keep the focus on the same item across re-renders; otherwise the first item.
  const items = focusables();
  if (!items.length) return;
  const same = focusedKey && items.find((el) => el.dataset.key === focusedKey);
  if (same && !screenChanged) {
    if (document.activeElement !== same) same.focus();
  } else if (!items.includes(document.activeElement) || screenChanged) {
    items[0].focus();
  }
}

document.addEventListener("keydown", onKey);
document.addEventListener("DOMContentLoaded", () => {
  $("edit-form").addEventListener("submit", saveContact);
  $("compose-form").addEventListener("submit", sendComposed);
  render(true);
  connect();
  // Call timer, reconnect countdown and clock.
  setInterval(() => {
    renderChrome();
    if (S.screen === "activate") renderActivate();
    if (S.call.state === CALL.IN_CALL) $("call-time").textContent = mmss(Date.now() - S.call.since);
  }, 500);
});
