// The medgate reviewer page: sign-in, the live queue (Server-Sent Events), and the case view on a canvas.
// Vanilla JS, no build step. Every coordinate of a case is in the 1024x1024 image the model saw.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZE = 1024;
const CORNER_PX = 10; // screen pixels around a box corner that grab it for resizing
const COLORS = ["#ff4d4d", "#4dd2ff", "#ffd24d", "#7dff4d", "#d24dff", "#ff9f4d"];

const state = {
  session: null, events: null, queue: [], kase: null, work: null,
  base: null, pixels: null, rendered: document.createElement("canvas"), maskImages: [],
  view: { scale: 1, x: 0, y: 0 }, wl: { width: 255, level: 127.5, invert: false },
  drag: null, selected: -1, hideAll: false, opacity: 0.45,
  lastInput: Date.now(), leaseTimer: null, leaseTotalMs: 0, renewing: false, submitting: false,
};

// --- server calls ----------------------------------------------------------------------------------

async function api(path, body) {
  const headers = { "x-medgate-csrf": (state.session && state.session.csrf) || "signin" };
  const init = body === undefined ? { method: "POST", headers }
    : { method: "POST", headers: { ...headers, "content-type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) { signedOut(data.message || "Signed out."); }
  if (!response.ok) { const e = new Error(data.message || response.statusText); e.status = response.status; e.code = data.error; throw e; }
  return data;
}

async function loadSession() {
  const data = await (await fetch("/api/session")).json();
  data.signedIn ? signedIn(data) : showSignIn(data);
}

function showSignIn(data, message) {
  state.session = null;
  if (state.events) { state.events.close(); state.events = null; }
  $("work").hidden = true; $("signout").hidden = true; $("lease").hidden = true; $("who").textContent = "";
  $("signin").hidden = false;
  $("dev-block").hidden = !(data && data.devSignIn);
  $("oidc-block").hidden = !(data && data.oidcSignIn);
  $("token-block").hidden = !!(data && data.tokenSignIn === false);
  $("signin-error").textContent = message || "";
}

function signedOut(message) {
  showSignIn({ devSignIn: !$("dev-block").hidden, oidcSignIn: !$("oidc-block").hidden, tokenSignIn: !$("token-block").hidden }, message);
}

function signedIn(data) {
  state.session = data;
  $("signin").hidden = true; $("work").hidden = false; $("signout").hidden = false;
  $("who").textContent = `${data.name} (${data.roles.join(", ")})`;
  state.lastInput = Date.now();
  connect();
  resize();
}

async function signIn(path, body) {
  try { signedIn(await api(path, body)); } catch (e) { $("signin-error").textContent = e.message; }
}

// --- the live queue ----------------------------------------------------------------------------------

function connect() {
  if (state.events) state.events.close();
  const events = new EventSource("/api/events");
  state.events = events;
  events.addEventListener("queue", (e) => { state.queue = JSON.parse(e.data).flows; drawQueue(); });
  events.addEventListener("case", (e) => showCase(JSON.parse(e.data)));
  events.addEventListener("signedout", () => { events.close(); signedOut("Signed out after being idle."); });
  events.addEventListener("failed", (e) => setStatus(JSON.parse(e.data).message, true));
  events.onerror = () => { // the browser reconnects by itself; find out whether the session is still there
    fetch("/api/session").then((r) => r.json()).then((d) => { if (!d.signedIn) { events.close(); signedOut("Signed out."); } });
  };
}

function drawQueue() {
  $("queue").replaceChildren(...state.queue.map((f) => {
    const li = document.createElement("li");
    li.dataset.flow = f.name;
    li.innerHTML = `<span></span><span class="pending"></span>`;
    li.firstChild.textContent = f.name; li.lastChild.textContent = f.pending;
    return li;
  }));
}

// --- a case ------------------------------------------------------------------------------------------

const storageKey = (deliveryId) => `medgate-review:${deliveryId}`;

function initialWork(kase) {
  return {
    label: kase.scores.length ? kase.scores[0].label : null,
    boxes: kase.detections.map((d) => ({ label: d.label, score: d.score, box: d.box.slice(), hidden: false })),
    masks: kase.masks.map(() => ({ accepted: true, hidden: false })),
    comment: "", reject: false,
  };
}

function save() { if (state.kase) localStorage.setItem(storageKey(state.kase.deliveryId), JSON.stringify(state.work)); }

function showCase(kase) {
  if (state.kase && state.kase.deliveryId === kase.deliveryId) return;
  if (state.kase) return; // one case at a time (the stream holds one lease per page)
  state.kase = kase;
  const kept = localStorage.getItem(storageKey(kase.deliveryId));
  state.work = kept ? JSON.parse(kept) : initialWork(kase);
  state.selected = -1;
  state.leaseTotalMs = Math.max(kase.leaseExpiresMs - Date.now(), 1);
  $("waiting").hidden = true; $("actions").hidden = false; $("comment").hidden = false;
  $("comment").value = state.work.comment || "";
  document.body.dataset.delivery = kase.deliveryId;
  setStatus(kept ? "Your unfinished work on this case was restored." : "");
  const image = new Image();
  image.onload = () => {
    const c = document.createElement("canvas"); c.width = SIZE; c.height = SIZE;
    const g = c.getContext("2d"); g.drawImage(image, 0, 0, SIZE, SIZE);
    state.pixels = g.getImageData(0, 0, SIZE, SIZE);
    state.wl = { width: 255, level: 127.5, invert: false };
    renderImage(); fit(); drawPanel(); draw();
    document.body.dataset.ready = kase.deliveryId;
  };
  image.src = kase.image;
  state.maskImages = kase.masks.map((src, i) => tintedMask(src, COLORS[i % COLORS.length]));
  startLeaseClock();
}

function tintedMask(src, color) {
  const canvas = document.createElement("canvas"); canvas.width = SIZE; canvas.height = SIZE;
  const image = new Image();
  image.onload = () => {
    const g = canvas.getContext("2d");
    g.drawImage(image, 0, 0);
    const data = g.getImageData(0, 0, SIZE, SIZE);
    const [r, gg, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
    for (let p = 0; p < data.data.length; p += 4) {
      const on = data.data[p] > 127;
      data.data[p] = r; data.data[p + 1] = gg; data.data[p + 2] = b; data.data[p + 3] = on ? 255 : 0;
    }
    g.putImageData(data, 0, 0); draw();
  };
  image.src = src;
  return canvas;
}

function caseDone(message) {
  if (state.kase) localStorage.removeItem(storageKey(state.kase.deliveryId));
  state.kase = null; state.work = null; state.pixels = null;
  clearInterval(state.leaseTimer); $("lease").hidden = true;
  $("waiting").hidden = false; $("actions").hidden = true; $("comment").hidden = true;
  $("task").replaceChildren(); $("items").replaceChildren(); $("items-title").hidden = true; $("opacity-block").hidden = true;
  delete document.body.dataset.delivery; delete document.body.dataset.ready;
  setStatus(message);
  draw();
}

function setStatus(text, error) { $("status").textContent = text || ""; $("status").className = error ? "error" : ""; }

// --- window/level on the 8-bit image -----------------------------------------------------------------

function renderImage() {
  if (!state.pixels) return;
  const { width, level, invert } = state.wl;
  const lut = new Uint8ClampedArray(256);
  const low = level - width / 2;
  for (let v = 0; v < 256; v++) {
    const out = Math.round(((v - low) / Math.max(width, 1)) * 255);
    lut[v] = invert ? 255 - out : out;
  }
  const source = state.pixels.data;
  const out = new ImageData(SIZE, SIZE);
  for (let p = 0; p < source.length; p += 4) {
    const v = lut[source[p]];
    out.data[p] = v; out.data[p + 1] = v; out.data[p + 2] = v; out.data[p + 3] = 255;
  }
  state.rendered.width = SIZE; state.rendered.height = SIZE;
  state.rendered.getContext("2d").putImageData(out, 0, 0);
  $("wl").textContent = `W ${Math.round(width)} L ${Math.round(level)}${invert ? " inverted" : ""} (8-bit)`;
}

// --- drawing -----------------------------------------------------------------------------------------

const canvas = $("view");
const ctx = canvas.getContext("2d");

function resize() {
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(r.width)); canvas.height = Math.max(1, Math.round(r.height));
  draw();
}

function fit() {
  const s = Math.min(canvas.width, canvas.height) / SIZE;
  state.view = { scale: s, x: (canvas.width - SIZE * s) / 2, y: (canvas.height - SIZE * s) / 2 };
  draw();
}

const toScreen = (x, y) => [state.view.x + x * state.view.scale, state.view.y + y * state.view.scale];
const toImage = (sx, sy) => [(sx - state.view.x) / state.view.scale, (sy - state.view.y) / state.view.scale];

function draw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!state.kase || !state.pixels) return;
  const { scale, x, y } = state.view;
  ctx.setTransform(scale, 0, 0, scale, x, y);
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.drawImage(state.rendered, 0, 0);
  if (state.hideAll) return;
  const w = state.work;
  ctx.globalAlpha = state.opacity;
  state.maskImages.forEach((m, i) => { if (!w.masks[i].hidden && w.masks[i].accepted) ctx.drawImage(m, 0, 0); });
  ctx.globalAlpha = 1;
  ctx.lineWidth = 2 / scale;
  ctx.font = `${13 / scale}px system-ui`;
  w.boxes.forEach((b, i) => {
    if (b.hidden) return;
    const [x0, y0, x1, y1] = b.box;
    ctx.strokeStyle = i === state.selected ? "#fff" : COLORS[i % COLORS.length];
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = ctx.strokeStyle;
    const text = b.score === undefined ? b.label : `${b.label} ${b.score.toFixed(2)}`;
    ctx.fillText(text, x0 + 3 / scale, y0 - 4 / scale);
    if (i === state.selected) {
      const h = CORNER_PX / 2 / scale;
      for (const [cx, cy] of [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) ctx.fillRect(cx - h, cy - h, 2 * h, 2 * h);
    }
  });
}

// --- the side panel ----------------------------------------------------------------------------------

function drawPanel() {
  const k = state.kase, w = state.work;
  const task = $("task");
  const title = document.createElement("h2");
  title.textContent = `${k.flow} (${k.taskType})`;
  const parts = [title];
  if (k.taskType === "classification") {
    const model = document.createElement("p");
    model.textContent = "Model: " + k.scores.map((s) => `${s.label} ${s.score.toFixed(2)}`).join(", ");
    const list = document.createElement("ul"); list.className = "cats";
    k.categories.forEach((c, i) => {
      const li = document.createElement("li");
      li.innerHTML = `<kbd>${i + 1}</kbd> <span></span>`; li.lastChild.textContent = c;
      li.classList.toggle("chosen", !w.reject && w.label === c);
      li.onclick = () => choose(i);
      list.append(li);
    });
    const none = document.createElement("li");
    none.innerHTML = "<kbd>0</kbd> none of these / not reviewable"; none.classList.toggle("chosen", w.reject);
    none.onclick = () => { w.reject = !w.reject; save(); drawPanel(); };
    list.append(none);
    parts.push(model, list);
  }
  task.replaceChildren(...parts);
  const items = [];
  if (k.taskType === "detection") {
    w.boxes.forEach((b, i) => items.push(itemRow(i, `${b.label}${b.score === undefined ? " (added)" : " " + b.score.toFixed(2)}`, b, false)));
  } else if (k.taskType === "segmentation") {
    w.masks.forEach((m, i) => {
      const p = k.prompts[i] || {};
      items.push(itemRow(i, `${p.prompt || "mask " + (i + 1)} ${p.score !== undefined ? p.score.toFixed(2) : ""}`, m, true));
    });
  }
  $("items-title").hidden = items.length === 0 && k.taskType !== "detection";
  $("opacity-block").hidden = k.taskType !== "segmentation";
  $("items").replaceChildren(...items);
}

function itemRow(i, text, item, isMask) {
  const li = document.createElement("li");
  li.classList.toggle("selected", i === state.selected);
  li.classList.toggle("rejected", isMask && !item.accepted);
  const eye = document.createElement("input"); eye.type = "checkbox"; eye.checked = !item.hidden; eye.title = "visible (v)";
  eye.onclick = (e) => { e.stopPropagation(); item.hidden = !eye.checked; save(); draw(); };
  const name = document.createElement("span"); name.className = "name"; name.textContent = text;
  li.append(eye, name);
  if (isMask) {
    const toggle = document.createElement("button");
    toggle.textContent = item.accepted ? "accepted" : "rejected";
    toggle.onclick = (e) => { e.stopPropagation(); item.accepted = !item.accepted; save(); drawPanel(); draw(); };
    li.append(toggle);
  }
  li.onclick = () => { state.selected = i; drawPanel(); draw(); };
  return li;
}

function choose(index) {
  const k = state.kase;
  if (!k || k.taskType !== "classification" || index >= k.categories.length) return;
  state.work.label = k.categories[index]; state.work.reject = false;
  save(); drawPanel();
}

// --- mouse: boxes, window/level, pan, zoom -----------------------------------------------------------

function hit(sx, sy) {
  const w = state.work;
  if (!w || state.kase.taskType !== "detection") return null;
  for (let i = w.boxes.length - 1; i >= 0; i--) {
    const b = w.boxes[i];
    if (b.hidden) continue;
    const [x0, y0, x1, y1] = b.box;
    const corners = [[x0, y0, 0, 1], [x1, y0, 2, 1], [x0, y1, 0, 3], [x1, y1, 2, 3]];
    for (const [cx, cy, xi, yi] of corners) {
      const [px, py] = toScreen(cx, cy);
      if (Math.abs(px - sx) <= CORNER_PX && Math.abs(py - sy) <= CORNER_PX) return { index: i, mode: "corner", xi, yi };
    }
  }
  const [ix, iy] = toImage(sx, sy);
  for (let i = w.boxes.length - 1; i >= 0; i--) {
    const [x0, y0, x1, y1] = w.boxes[i].box;
    if (!w.boxes[i].hidden && ix >= x0 && ix <= x1 && iy >= y0 && iy <= y1) return { index: i, mode: "move" };
  }
  return null;
}

const clamp = (v) => Math.min(SIZE, Math.max(0, v));

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("mousedown", (e) => {
  if (!state.kase) return;
  const r = canvas.getBoundingClientRect();
  const sx = e.clientX - r.left, sy = e.clientY - r.top;
  const start = { sx, sy, view: { ...state.view }, wl: { ...state.wl } };
  if (e.button === 2 || e.ctrlKey) state.drag = { ...start, mode: "wl" };
  else if (e.button === 1 || e.shiftKey) state.drag = { ...start, mode: "pan" };
  else {
    const h = hit(sx, sy);
    if (h) {
      state.selected = h.index;
      state.drag = { ...start, ...h, box: state.work.boxes[h.index].box.slice() };
    } else if (state.kase.taskType === "detection" && state.kase.categories.length) {
      const [ix, iy] = toImage(sx, sy);
      state.work.boxes.push({ label: state.kase.categories[0], box: [ix, iy, ix, iy], hidden: false });
      state.selected = state.work.boxes.length - 1;
      state.drag = { ...start, index: state.selected, mode: "corner", xi: 2, yi: 3, box: [ix, iy, ix, iy], added: true };
    } else state.drag = { ...start, mode: "pan" };
    drawPanel();
  }
  e.preventDefault();
});
window.addEventListener("mousemove", (e) => {
  const d = state.drag;
  if (!d) return;
  const r = canvas.getBoundingClientRect();
  const dx = e.clientX - r.left - d.sx, dy = e.clientY - r.top - d.sy;
  if (d.mode === "wl") {
    state.wl.width = Math.max(1, d.wl.width + dx); state.wl.level = d.wl.level - dy; renderImage();
  } else if (d.mode === "pan") {
    state.view.x = d.view.x + dx; state.view.y = d.view.y + dy;
  } else {
    const b = state.work.boxes[d.index], s = state.view.scale;
    if (d.mode === "move") {
      const w = d.box[2] - d.box[0], h = d.box[3] - d.box[1];
      const x0 = Math.min(SIZE - w, Math.max(0, d.box[0] + dx / s)), y0 = Math.min(SIZE - h, Math.max(0, d.box[1] + dy / s));
      b.box = [x0, y0, x0 + w, y0 + h];
    } else {
      b.box = d.box.slice();
      b.box[d.xi] = clamp(d.box[d.xi] + dx / s); b.box[d.yi] = clamp(d.box[d.yi] + dy / s);
    }
  }
  draw();
});
window.addEventListener("mouseup", () => {
  const d = state.drag;
  state.drag = null;
  if (!d || !state.work || d.mode === "wl" || d.mode === "pan") return;
  const b = state.work.boxes[d.index];
  b.box = [Math.min(b.box[0], b.box[2]), Math.min(b.box[1], b.box[3]), Math.max(b.box[0], b.box[2]), Math.max(b.box[1], b.box[3])]
    .map((v) => Math.round(v * 100) / 100);
  if (d.added && (b.box[2] - b.box[0] < 3 || b.box[3] - b.box[1] < 3)) { state.work.boxes.splice(d.index, 1); state.selected = -1; }
  save(); drawPanel(); draw();
});
canvas.addEventListener("wheel", (e) => {
  const r = canvas.getBoundingClientRect();
  zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
  e.preventDefault();
}, { passive: false });

function zoom(factor, sx = canvas.width / 2, sy = canvas.height / 2) {
  const [ix, iy] = toImage(sx, sy);
  state.view.scale *= factor;
  state.view.x = sx - ix * state.view.scale; state.view.y = sy - iy * state.view.scale;
  draw();
}

// --- keyboard ----------------------------------------------------------------------------------------

document.addEventListener("keydown", (e) => {
  state.lastInput = Date.now();
  if (e.target instanceof HTMLTextAreaElement || e.target instanceof HTMLInputElement) return;
  if (e.key === "?") { $("help").open ? $("help").close() : $("help").showModal(); e.preventDefault(); return; }
  if ($("help").open || !state.kase || !state.work) return;
  const w = state.work, k = state.kase;
  const items = k.taskType === "detection" ? w.boxes : k.taskType === "segmentation" ? w.masks : [];
  const sel = items[state.selected];
  let handled = true;
  if (/^[1-9]$/.test(e.key)) choose(Number(e.key) - 1);
  else if (e.key === "0") { w.reject = !w.reject; save(); drawPanel(); }
  else if (e.key === "Enter") submit();
  else if (e.key === "s") skip();
  else if (e.key === "i") { state.wl.invert = !state.wl.invert; renderImage(); }
  else if (e.key === "r") { state.wl = { width: 255, level: 127.5, invert: false }; renderImage(); }
  else if (e.key === "f") fit();
  else if (e.key === "+" || e.key === "=") zoom(1.25);
  else if (e.key === "-") zoom(0.8);
  else if (e.key.startsWith("Arrow")) {
    const step = 40;
    state.view.x += e.key === "ArrowLeft" ? step : e.key === "ArrowRight" ? -step : 0;
    state.view.y += e.key === "ArrowUp" ? step : e.key === "ArrowDown" ? -step : 0;
  } else if (e.key === "Tab") { if (items.length) state.selected = (state.selected + (e.shiftKey ? items.length - 1 : 1)) % items.length; drawPanel(); }
  else if ((e.key === "Delete" || e.key === "Backspace") && k.taskType === "detection" && sel) { w.boxes.splice(state.selected, 1); state.selected = -1; save(); drawPanel(); }
  else if (e.key === "l" && k.taskType === "detection" && sel) { sel.label = k.categories[(k.categories.indexOf(sel.label) + 1) % k.categories.length]; save(); drawPanel(); }
  else if ((e.key === "a" || e.key === "x") && k.taskType === "segmentation" && sel) { sel.accepted = e.key === "a"; save(); drawPanel(); }
  else if (e.key === "v" && sel) { sel.hidden = !sel.hidden; save(); drawPanel(); }
  else if (e.key === "o") state.hideAll = !state.hideAll;
  else handled = false;
  if (handled) { e.preventDefault(); draw(); }
});
for (const kind of ["mousedown", "wheel", "input"]) document.addEventListener(kind, () => { state.lastInput = Date.now(); }, true);

// --- submit, skip, lease -----------------------------------------------------------------------------

function answer() {
  const k = state.kase, w = state.work;
  if (w.reject) return { kind: "reject", reason: "none of the categories / not reviewable" };
  if (k.taskType === "classification") return w.label ? { kind: "label", label: w.label } : null;
  if (k.taskType === "detection") {
    return { kind: "boxes", boxes: w.boxes.map((b) => ({ label: b.label, x0: b.box[0], y0: b.box[1], x1: b.box[2], y1: b.box[3] })) };
  }
  return w.masks.length ? { kind: "masks", accepted: w.masks.map((m) => m.accepted) } : { kind: "accept" };
}

async function submit() {
  const k = state.kase;
  if (!k || state.submitting) return;
  if (Date.now() > k.leaseExpiresMs) { setStatus("The lease on this case has expired: it went back to the queue. Skip it (s).", true); return; }
  const a = answer();
  if (!a) { setStatus("Choose a category first (1-9), or 0 for none.", true); return; }
  state.submitting = true;
  try {
    const result = await api(`/api/cases/${encodeURIComponent(k.deliveryId)}/submit`, { answer: a, comment: $("comment").value });
    caseDone(`Submitted (${result.status}). Waiting for the next case.`);
  } catch (e) {
    setStatus(`Not submitted: ${e.message}`, true);
  } finally { state.submitting = false; }
}

async function skip() {
  const k = state.kase;
  if (!k) return;
  try { await api(`/api/cases/${encodeURIComponent(k.deliveryId)}/release`); } catch (e) { if (e.status !== 409) { setStatus(e.message, true); return; } }
  caseDone("Skipped: the case went back to the queue.");
}

function startLeaseClock() {
  clearInterval(state.leaseTimer);
  $("lease").hidden = false;
  const tick = async () => {
    const k = state.kase;
    if (!k) return;
    const left = k.leaseExpiresMs - Date.now();
    const el = $("lease");
    if (left <= 0) { el.textContent = "Lease expired: the case is back in the queue"; el.className = "lease expired"; return; }
    const s = Math.floor(left / 1000);
    el.textContent = `Lease ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    el.className = left < 60000 ? "lease low" : "lease";
    const active = Date.now() - state.lastInput < 60000;
    if (active && left < state.leaseTotalMs / 2 && !state.renewing) {
      state.renewing = true;
      try {
        const r = await api(`/api/cases/${encodeURIComponent(k.deliveryId)}/renew`);
        if (state.kase === k) { k.leaseExpiresMs = r.leaseExpiresMs; state.leaseTotalMs = Math.max(r.leaseExpiresMs - Date.now(), 1); }
      } catch (e) { setStatus(`The lease could not be renewed: ${e.message}`, true); } finally { state.renewing = false; }
    }
    if (state.session && Date.now() - state.lastInput > state.session.idleTimeoutS * 1000) {
      await api("/api/session/signout").catch(() => {});
      signedOut("Signed out after being idle.");
    }
  };
  tick();
  state.leaseTimer = setInterval(tick, 1000);
}

// --- wiring ------------------------------------------------------------------------------------------

$("dev-signin").onclick = () => signIn("/api/session/dev");
$("token-signin").onclick = () => signIn("/api/session/token", { token: $("token").value });
$("token-file").onchange = async (e) => { const f = e.target.files[0]; if (f) $("token").value = (await f.text()).trim(); };
$("signout").onclick = async () => {
  const d = await api("/api/session/signout").catch(() => ({}));
  signedOut("Signed out.");
  if (d.endSessionUrl) location.assign(d.endSessionUrl); // the identity provider's session ends too
};
$("submit").onclick = submit;
$("skip").onclick = skip;
$("help-button").onclick = () => $("help").showModal();
$("opacity").oninput = (e) => { state.opacity = e.target.value / 100; draw(); };
$("comment").oninput = (e) => { if (state.work) { state.work.comment = e.target.value; save(); } };
window.addEventListener("resize", () => { resize(); fit(); });
// For the browser tests and for scripting: image coordinates -> page coordinates of the canvas.
window.medgateReview = { toPage: (x, y) => { const r = canvas.getBoundingClientRect(); const [sx, sy] = toScreen(x, y); return [r.left + sx, r.top + sy]; }, state };
loadSession();
