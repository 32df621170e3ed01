// The medgate reviewer page: sign-in, the live queue (Server-Sent Events), and the case view on a canvas.
// Vanilla JS, no build step (image.js: window/level on the original values; paint.js: brush and eraser).
// Every coordinate of a case is in the 1024x1024 image the model saw.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZE = 1024;
const CORNER_PX = 10; // screen pixels around a box corner that grab it for resizing
// A lease that will not be renewed (no input since the last renewal) stops the page taking new cases this
// long before it ends, so the expired case goes to another reviewer rather than straight back to this page.
const PAUSE_BEFORE_EXPIRY_MS = 1500;
const COLORS = ["#ff4d4d", "#4dd2ff", "#ffd24d", "#7dff4d", "#d24dff", "#ff9f4d"];

const state = {
  session: null, events: null, queue: [], kase: null, work: null,
  base: null, pixels: null, rendered: document.createElement("canvas"), maskImages: [], maskBits: [],
  img: null, rect: [0, 0, SIZE, SIZE], tool: null, brush: 12, cursor: null, stroke: null,
  paused: false, expired: false, renewedAt: 0,
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

// Keyed by reviewer and loop: a case that comes back on a new lease after its lease expired keeps the work.
const storageKey = (kase) => `medgate-review:${state.session ? state.session.subject : ""}:${kase.humanLoopName}`;

function initialWork(kase) {
  return {
    label: kase.scores.length ? kase.scores[0].label : null,
    boxes: kase.detections.map((d) => ({ label: d.label, score: d.score, box: d.box.slice(), hidden: false })),
    masks: kase.masks.map(() => ({ accepted: true, hidden: false })),
    strokes: [], comment: "", reject: false,
  };
}

function save() { if (state.kase) localStorage.setItem(storageKey(state.kase), JSON.stringify(state.work)); }

function showCase(kase) {
  if (state.kase && state.kase.deliveryId === kase.deliveryId) return;
  if (state.kase) return; // one case at a time (the stream holds one lease per page)
  state.kase = kase;
  const kept = localStorage.getItem(storageKey(kase));
  state.work = kept ? JSON.parse(kept) : initialWork(kase);
  state.selected = -1;
  state.leaseTotalMs = Math.max(kase.leaseExpiresMs - Date.now(), 1);
  $("waiting").hidden = true; $("actions").hidden = false; $("comment").hidden = false;
  $("comment").value = state.work.comment || "";
  document.body.dataset.delivery = kase.deliveryId;
  setStatus(kept ? "Your unfinished work on this case was restored." : "");
  state.rect = MedgateImage.contentRect(kase, SIZE);
  state.expired = false; state.paused = false; state.tool = null; state.renewedAt = Date.now();
  const masksReady = Promise.all(kase.masks.map(maskBits));
  const image = new Image();
  image.onload = async () => {
    const c = document.createElement("canvas"); c.width = SIZE; c.height = SIZE;
    const g = c.getContext("2d"); g.drawImage(image, 0, 0, SIZE, SIZE);
    state.pixels = g.getImageData(0, 0, SIZE, SIZE);
    let img = MedgateImage.from8bit(state.pixels);
    if (kase.modality) {
      try {
        const response = await fetch(kase.modality.url);
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const decoded = await MedgateImage.decodePng16(await response.arrayBuffer());
        if (decoded.width !== SIZE || decoded.height !== SIZE) throw new Error("unexpected size");
        img = MedgateImage.fromModality(kase.modality, decoded);
      } catch (e) { setStatus(`The 16-bit image could not be read (${e.message}): window/level on the 8-bit image.`, true); }
    }
    const bits = await masksReady;
    if (state.kase !== kase) return;
    state.maskBits = bits;
    for (const stroke of state.work.strokes || []) if (bits[stroke.mask]) MedgatePaint.replay(bits[stroke.mask], SIZE, stroke);
    state.maskImages = bits.map((b, i) => {
      const canvas = document.createElement("canvas"); canvas.width = SIZE; canvas.height = SIZE;
      MedgatePaint.tint(canvas, b, SIZE, COLORS[i % COLORS.length]);
      return canvas;
    });
    state.img = img;
    state.wl = MedgateImage.defaultWindow(img, state.rect, SIZE);
    renderImage(); fit(); drawPanel(); draw();
    document.body.dataset.ready = kase.deliveryId;
  };
  image.src = kase.image;
  startLeaseClock();
}

// A mask PNG (0/255) as 0/1 bytes, SIZE x SIZE.
function maskBits(src) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => {
      const c = document.createElement("canvas"); c.width = SIZE; c.height = SIZE;
      const g = c.getContext("2d"); g.drawImage(image, 0, 0);
      const data = g.getImageData(0, 0, SIZE, SIZE).data, bits = new Uint8Array(SIZE * SIZE);
      for (let p = 0, q = 0; q < bits.length; p += 4, q++) bits[q] = data[p] > 127 ? 1 : 0;
      resolve(bits);
    };
    image.onerror = () => resolve(new Uint8Array(SIZE * SIZE));
    image.src = src;
  });
}

function caseDone(message) {
  if (state.kase) localStorage.removeItem(storageKey(state.kase));
  state.kase = null; state.work = null; state.pixels = null; state.img = null; state.tool = null; state.stroke = null;
  state.maskBits = []; state.maskImages = []; state.expired = false;
  clearInterval(state.leaseTimer); $("lease").hidden = true;
  $("waiting").hidden = false; $("actions").hidden = true; $("comment").hidden = true;
  $("task").replaceChildren(); $("items").replaceChildren(); $("items-title").hidden = true; $("opacity-block").hidden = true;
  delete document.body.dataset.delivery; delete document.body.dataset.ready;
  setStatus(message);
  draw();
}

function setStatus(text, error) { $("status").textContent = text || ""; $("status").className = error ? "error" : ""; }

// --- window/level (image.js) ------------------------------------------------------------------------

const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(2));

function renderImage() {
  if (!state.img) return;
  MedgateImage.render(state.img, state.wl, state.rendered, state.rect, SIZE);
  const { width, level, invert, preset } = state.wl, img = state.img;
  const source = img.bits === 16 ? `${img.modality || "DICOM"} 16-bit values` : "8-bit image";
  $("wl").textContent = `W ${fmt(width)} L ${fmt(level)}${img.unit ? " " + img.unit : ""}${invert ? " inverted" : ""}`
    + ` · ${preset || "custom"} · ${source}`;
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; renderImage(); draw(); });
}

function preset(index) {
  if (!state.img) return;
  const list = MedgateImage.presets(state.img, state.rect, SIZE);
  if (index >= list.length) { setStatus(`No preset ${index + 1} for this image (${list.length} presets).`); return; }
  const p = list[index];
  state.wl = { width: p.width, level: p.level, invert: state.wl.invert, preset: `${index + 1}: ${p.name}` };
  renderImage();
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
  if (!state.kase || !state.img) return;
  const { scale, x, y } = state.view;
  ctx.setTransform(scale, 0, 0, scale, x, y);
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.drawImage(state.rendered, 0, 0);
  if (state.hideAll) return;
  const w = state.work;
  ctx.globalAlpha = state.opacity;
  state.maskImages.forEach((m, i) => { if (!w.masks[i].hidden && w.masks[i].accepted) ctx.drawImage(m, 0, 0); });
  ctx.globalAlpha = 1;
  if (state.tool && state.cursor) {
    ctx.strokeStyle = state.tool === "erase" ? "#fff" : COLORS[Math.max(state.selected, 0) % COLORS.length];
    ctx.lineWidth = 1.5 / scale;
    ctx.beginPath(); ctx.arc(state.cursor[0], state.cursor[1], state.brush, 0, 2 * Math.PI); ctx.stroke();
  }
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
  if (k.taskType === "segmentation" && w.masks.length) {
    const tool = document.createElement("p"); tool.id = "tool";
    const target = state.selected >= 0 ? (k.prompts[state.selected] || {}).prompt || `mask ${state.selected + 1}` : "no mask";
    tool.textContent = state.tool ? `${state.tool === "erase" ? "Eraser" : "Brush"} ${state.brush} px on ${target}` : "Brush b, eraser e, size [ ]";
    task.append(tool);
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
  else if (e.button === 0 && !e.shiftKey && state.tool && state.maskBits[state.selected]) {
    const stroke = { mask: state.selected, erase: state.tool === "erase", r: state.brush, points: [toImage(sx, sy).map((v) => Math.round(v * 10) / 10)] };
    state.work.masks[state.selected].accepted = true; // painting on a mask keeps it
    state.stroke = stroke; state.drag = { ...start, mode: "paint" };
    paint(stroke.points[0], stroke.points[0]);
  }
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
  const r = canvas.getBoundingClientRect();
  if (state.tool) { state.cursor = toImage(e.clientX - r.left, e.clientY - r.top); if (!d) draw(); }
  if (!d) return;
  const dx = e.clientX - r.left - d.sx, dy = e.clientY - r.top - d.sy;
  if (d.mode === "wl") {
    const step = MedgateImage.step(state.img);
    state.wl = { ...state.wl, width: Math.max(step, d.wl.width + dx * step), level: d.wl.level - dy * step, preset: "custom" };
    scheduleRender(); // once per frame: a 1024x1024 window takes tens of ms on a slow machine
    return;
  } else if (d.mode === "paint") {
    const point = toImage(e.clientX - r.left, e.clientY - r.top).map((v) => Math.round(v * 10) / 10);
    const pts = state.stroke.points;
    paint(pts[pts.length - 1], point);
    pts.push(point);
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
  if (d && d.mode === "wl") { renderImage(); draw(); }
  if (d && d.mode === "paint" && state.work) { state.work.strokes.push(state.stroke); state.stroke = null; save(); drawPanel(); return; }
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

function paint(a, b) {
  const s = state.stroke, bits = state.maskBits[s.mask];
  const rect = MedgatePaint.segment(bits, SIZE, a, b, s.r, s.erase ? 0 : 1);
  MedgatePaint.tint(state.maskImages[s.mask], bits, SIZE, COLORS[s.mask % COLORS.length], rect);
}

function undoStroke() {
  const w = state.work;
  if (!w.strokes.length) return;
  const { mask } = w.strokes.pop();
  maskBits(state.kase.masks[mask]).then((bits) => {
    for (const stroke of w.strokes) if (stroke.mask === mask) MedgatePaint.replay(bits, SIZE, stroke);
    state.maskBits[mask] = bits;
    MedgatePaint.tint(state.maskImages[mask], bits, SIZE, COLORS[mask % COLORS.length]);
    save(); drawPanel(); draw();
  });
}

function setTool(tool) {
  const k = state.kase;
  if (!k || k.taskType !== "segmentation" || !k.masks.length) return;
  state.tool = state.tool === tool ? null : tool;
  if (state.tool && state.selected < 0) state.selected = 0;
  canvas.style.cursor = state.tool ? "none" : "";
  drawPanel();
}

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
  const digit = /^Digit[1-5]$/.test(e.code) ? Number(e.code.slice(5)) : 0;
  if (digit && (e.shiftKey || k.taskType !== "classification")) preset(digit - 1); // W/L presets
  else if (/^[1-9]$/.test(e.key)) choose(Number(e.key) - 1);
  else if (e.key === "0") { w.reject = !w.reject; save(); drawPanel(); }
  else if (e.key === "Enter") submit();
  else if (e.key === "s") skip();
  else if (e.key === "i") { state.wl.invert = !state.wl.invert; renderImage(); }
  else if (e.key === "r") { state.wl = MedgateImage.defaultWindow(state.img, state.rect, SIZE); renderImage(); }
  else if (e.key === "b") setTool("brush");
  else if (e.key === "e") setTool("erase");
  else if (e.key === "[" || e.key === "]") { state.brush = MedgatePaint.clampRadius(Math.round(state.brush * (e.key === "]" ? 1.25 : 0.8))); drawPanel(); }
  else if (e.key === "z" && k.taskType === "segmentation") undoStroke();
  else if (e.key === "Escape" && state.tool) setTool(state.tool);
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
for (const kind of ["mousedown", "mousemove", "wheel", "input"]) document.addEventListener(kind, () => { state.lastInput = Date.now(); }, true);

// --- submit, skip, lease -----------------------------------------------------------------------------

function answer() {
  const k = state.kase, w = state.work;
  if (w.reject) return { kind: "reject", reason: "none of the categories / not reviewable" };
  if (k.taskType === "classification") return w.label ? { kind: "label", label: w.label } : null;
  if (k.taskType === "detection") {
    return { kind: "boxes", boxes: w.boxes.map((b) => ({ label: b.label, x0: b.box[0], y0: b.box[1], x1: b.box[2], y1: b.box[3] })) };
  }
  if (!w.masks.length) return { kind: "accept" };
  const painted = new Set((w.strokes || []).map((s) => s.mask));
  const edits = w.masks.map((m, i) => (painted.has(i) && state.maskBits[i] ? MedgatePaint.packBase64(state.maskBits[i]) : null));
  return { kind: "masks", accepted: w.masks.map((m) => m.accepted), edits };
}

async function submit() {
  const k = state.kase;
  if (!k || state.submitting) return;
  if (state.expired || Date.now() > k.leaseExpiresMs) { leaseExpired(); return; }
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
  const resumed = state.paused;
  caseDone(resumed ? "Taking cases again." : "Skipped: the case went back to the queue.");
  if (resumed) { state.paused = false; connect(); }
}

// Stop taking cases (the stream closes): the lease is about to lapse and nobody is working on this page.
function pause() {
  if (state.paused) return;
  state.paused = true;
  if (state.events) { state.events.close(); state.events = null; }
}

function leaseExpired() {
  pause();
  state.expired = true;
  const el = $("lease");
  el.textContent = "Lease expired: the case is back in the queue"; el.className = "lease expired";
  setStatus("The lease on this case expired before you submitted: it went back to the queue for another reviewer."
    + " Your work on it is kept on this page. Press s to take cases again.", true);
}

function startLeaseClock() {
  clearInterval(state.leaseTimer);
  $("lease").hidden = false;
  const tick = async () => {
    const k = state.kase;
    if (!k) return;
    const left = k.leaseExpiresMs - Date.now();
    const el = $("lease");
    if (left <= 0 || state.expired) { leaseExpired(); return; }
    const s = Math.floor(left / 1000);
    el.textContent = `Lease ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    el.className = left < 60000 ? "lease low" : "lease";
    // Renewed while the reviewer works (any input since the case came or the last renewal); an idle page lets it lapse.
    const active = state.lastInput > state.renewedAt;
    if (active && left < state.leaseTotalMs / 2 && !state.renewing) {
      state.renewing = true;
      try {
        const r = await api(`/api/cases/${encodeURIComponent(k.deliveryId)}/renew`);
        if (state.kase === k) { k.leaseExpiresMs = r.leaseExpiresMs; state.leaseTotalMs = Math.max(r.leaseExpiresMs - Date.now(), 1); state.renewedAt = Date.now(); }
      } catch (e) {
        if (e.status === 409) { leaseExpired(); return; } // the lease ended on the server
        setStatus(`The lease could not be renewed: ${e.message}`, true);
      } finally { state.renewing = false; }
    } else if (!active && left < PAUSE_BEFORE_EXPIRY_MS) pause();
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
window.medgateReview = {
  toPage: (x, y) => { const r = canvas.getBoundingClientRect(); const [sx, sy] = toScreen(x, y); return [r.left + sx, r.top + sy]; },
  // The grey level the case view renders at image pixel (x, y) (before zoom), and on screen there.
  pixel: (x, y) => state.rendered.getContext("2d").getImageData(Math.floor(x), Math.floor(y), 1, 1).data[0],
  screenPixel: (x, y) => { const [sx, sy] = toScreen(x, y); return Array.from(ctx.getImageData(Math.floor(sx), Math.floor(sy), 1, 1).data.slice(0, 3)); },
  state,
};
loadSession();
