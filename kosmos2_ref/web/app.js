// kosmos2-ref serve: the page. Plain JavaScript over the JSON API of kosmos2_ref/server.py (docs/web.md).
// Boxes are normalised (x1, y1, x2, y2) in [0, 1], so everything drawn over the image is placed in percentages.
"use strict";

// The entity colours of kosmos2_ref/draw.py (PALETTE), so the page and `--draw` agree.
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
  [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [255, 215, 0], [0, 128, 128]];
// draw.py's heat-map ramp (close to matplotlib's "inferno").
const RAMP = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]];

const $ = (id) => document.getElementById(id);
const state = { info: null, imageId: null, attention: null, busy: false };

function colour(i) { const [r, g, b] = PALETTE[i % PALETTE.length]; return `rgb(${r}, ${g}, ${b})`; }
function fmt(p) { return p === null || p === undefined ? "given" : p.toFixed(p < 0.01 ? 4 : 3); }
function setStatus(text, isError = false) { $("status").textContent = text; $("status").classList.toggle("error", isError); }

// ---------------------------------------------------------------------------------------------------------------
// Talking to the server

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function postJSON(path, obj) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(obj) });
}

// Read a server-sent event stream from a POST (EventSource can only GET): call onEvent(name, data) per event.
async function postStream(path, obj, onEvent) {
  const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify(obj) });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {          // an event ends with a blank line
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (name && data) onEvent(name, JSON.parse(data));
    }
  }
}

// Run one request at a time from this page, with its buttons disabled meanwhile.
async function task(label, fn) {
  if (state.busy) return;
  state.busy = true;
  delete document.body.dataset.done;
  enableButtons();
  setStatus(`${label}…`);
  try {
    await fn();
    setStatus("");
    document.body.dataset.done = label;           // the last task that finished (the tests wait for it)
  } catch (err) {
    setStatus(`${label} failed: ${err.message}`, true);
    document.body.dataset.done = `${label} failed`;
  } finally {
    state.busy = false;
    enableButtons();
  }
}

function enableButtons() {
  const ready = state.imageId !== null && !state.busy;
  for (const id of ["caption-btn", "ground-btn", "heat-btn"]) $(id).disabled = !ready;
}

// ---------------------------------------------------------------------------------------------------------------
// The image

// getBlob: a function giving the image file (a File, or the sample fetched), called inside the task.
async function useImage(getBlob) {
  await task("uploading", async () => {
    const blob = await getBlob();
    const uploaded = await api("/api/images", { method: "POST", body: blob,
                                               headers: { "Content-Type": "application/octet-stream" } });
    state.imageId = uploaded.image_id;
    state.attention = null;
    const photo = $("photo");
    if (photo.src) URL.revokeObjectURL(photo.src);
    await new Promise((resolve) => { photo.onload = resolve; photo.src = URL.createObjectURL(blob); });
    $("stage").classList.remove("empty");
    clearBoxes();
    hideHeat();
    $("caption-text").textContent = "";
    $("entities").innerHTML = "";
    $("describe-result").textContent = "";
    $("ground-result").textContent = "";
    $("stage").dataset.imageId = uploaded.image_id;
  });
}

function clearBoxes() { $("boxes").innerHTML = ""; }

// One box element over the image: normalised coordinates, a colour and an optional label.
function drawBox([x1, y1, x2, y2], fill, label, extraClass = "") {
  const box = document.createElement("div");
  box.className = `box ${extraClass}`;
  Object.assign(box.style, { left: `${x1 * 100}%`, top: `${y1 * 100}%`, width: `${(x2 - x1) * 100}%`,
                             height: `${(y2 - y1) * 100}%`, borderColor: fill });
  if (y1 < 0.06) box.classList.add("inside");               // no room above: put the label inside
  if (label) {
    const tag = document.createElement("span");
    tag.className = "label";
    tag.style.background = fill;
    tag.textContent = label;
    box.appendChild(tag);
  }
  $("boxes").appendChild(box);
}

// Every box of every entity, entity i in colour i (draw.draw_entities' rule).
function drawEntities(entities) {
  clearBoxes();
  entities.forEach((entity, i) => {
    const named = !entity.phrase.startsWith("<patch_index_");
    entity.boxes.forEach((box, k) => {
      const p = entity.confidence ? entity.confidence.boxes[k].probability : null;
      drawBox(box, colour(i), named ? `${entity.phrase} · ${fmt(p)}` : fmt(p));
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Caption (streamed), ground, describe

function showCaption(caption, entities) {
  // The spans index the caption; wrap each phrase in a <mark> of its box's colour.
  const out = $("caption-text");
  out.innerHTML = "";
  let at = 0;
  const spans = entities.map((e, i) => ({ start: e.span[0], end: e.span[1], i })).filter((s) => s.end > s.start)
    .sort((a, b) => a.start - b.start);
  for (const s of spans) {
    if (s.start < at) continue;
    out.appendChild(document.createTextNode(caption.slice(at, s.start)));
    const mark = document.createElement("mark");
    mark.style.background = colour(s.i);
    mark.textContent = caption.slice(s.start, s.end);
    out.appendChild(mark);
    at = s.end;
  }
  out.appendChild(document.createTextNode(caption.slice(at)));
}

// One line per entity: its boxes with their confidence (p of the two location tokens), the phrase's mean token
// probability and p(<object>); "given" where the prompt held those tokens.
function describeConfidence(entity) {
  const c = entity.confidence;
  const boxes = entity.boxes.map((b, k) => {
    const where = `(${b.map((v) => v.toFixed(2)).join(", ")})`;
    const bc = c ? c.boxes[k] : null;
    if (!bc || bc.probability === null) return `${where}, given`;
    return `${where}, p(box) ${fmt(bc.probability)} = ${fmt(bc.upper_left)} × ${fmt(bc.lower_right)}`;
  });
  const extra = [];
  if (c && c.phrase !== null) extra.push(`p(phrase) ${fmt(c.phrase)}`);
  if (c && c.object !== null) extra.push(`p(<object>) ${fmt(c.object)}`);
  return `${entity.phrase}: ${boxes.join("; ")}` + (extra.length ? ` · ${extra.join(" · ")}` : "");
}

function listEntities(entities) {
  const list = $("entities");
  list.innerHTML = "";
  entities.forEach((e, i) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch" style="background:${colour(i)}"></span>`;
    li.appendChild(document.createTextNode(describeConfidence(e)));
    list.appendChild(li);
  });
  if (!entities.length) list.innerHTML = "<li class='muted'>no grounded phrases</li>";
}

async function caption() {
  await task("captioning", async () => {
    const out = $("caption-text");
    out.textContent = "";
    $("entities").innerHTML = "";
    clearBoxes();
    clearTokens();
    let streamed = 0;                           // tokens shown as they arrived (the tests read it)
    document.body.dataset.streamedTokens = "0";
    const request = { image_id: state.imageId, prompt: $("prompt").value,
                      max_new_tokens: Number($("max-new").value) };
    await postStream("/api/caption?stream=1", request, (name, data) => {
      if (name === "prompt") addTokens(data.tokens, new Set(data.image_positions), false);
      else if (name === "text") out.textContent += data.text;
      else if (name === "token") {
        out.textContent += data.text;
        addTokens([data], new Set(), true);
        document.body.dataset.streamedTokens = String(++streamed);
      }
      else if (name === "done") showRun(data);
      else if (name === "error") throw new Error(data.error);
    });
  });
}

function showRun(run) {
  showCaption(run.caption, run.entities);
  listEntities(run.entities);
  drawEntities(run.entities);
  clearTokens();
  addTokens(run.prompt_tokens, new Set(run.image_positions), false);
  addTokens(run.generated_tokens, new Set(), true);
}

async function ground() {
  const phrase = $("ground-phrase").value.trim();
  if (!phrase) { setStatus("type a phrase to find", true); return; }
  await task("grounding", async () => {
    const run = await postJSON("/api/ground", { image_id: state.imageId, phrase });
    clearBoxes();
    run.boxes.forEach((box, k) => drawBox(box, colour(0),
      `${run.phrase} · ${fmt(run.confidence ? run.confidence.boxes[k].probability : null)}`));
    $("ground-result").textContent = run.boxes.length
      ? `${run.phrase}: ${run.boxes.map((b) => `(${b.map((v) => v.toFixed(2)).join(", ")})`).join(", ")}`
      : `the model gave "${run.phrase}" no box; it wrote: ${run.caption}`;
    clearTokens();
    addTokens(run.prompt_tokens, new Set(run.image_positions), false);
    addTokens(run.generated_tokens, new Set(), true);
  });
}

async function describe(box) {
  await task("describing", async () => {
    const run = await postJSON("/api/describe", { image_id: state.imageId, box });
    clearBoxes();
    drawBox(run.box, colour(0), "It", "described");
    $("describe-result").textContent = run.description;
    clearTokens();
    addTokens(run.prompt_tokens, new Set(run.image_positions), false);
    addTokens(run.generated_tokens, new Set(), true);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Dragging a box on the image (describe), and hovering a patch (the connector)

function pointOf(event) {
  const r = $("photo").getBoundingClientRect();
  return [Math.min(Math.max((event.clientX - r.left) / r.width, 0), 1),
          Math.min(Math.max((event.clientY - r.top) / r.height, 0), 1)];
}

let dragStart = null;

function onPointerDown(event) {
  if (state.imageId === null || state.busy) return;
  event.preventDefault();                       // no text selection or native image drag while drawing
  dragStart = pointOf(event);
  $("stage").setPointerCapture(event.pointerId);
}

function dragBox(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function onPointerMove(event) {
  if (state.imageId === null) return;
  const p = pointOf(event);
  if (dragStart) {
    const [x1, y1, x2, y2] = dragBox(dragStart, p);
    Object.assign($("drag").style, { left: `${x1 * 100}%`, top: `${y1 * 100}%`, width: `${(x2 - x1) * 100}%`,
                                     height: `${(y2 - y1) * 100}%` });
    $("drag").hidden = false;
  } else if ($("connector-toggle").checked) {
    hoverPatch(p);
  }
  showCell(p);
}

function onPointerUp(event) {
  if (!dragStart) return;
  const box = dragBox(dragStart, pointOf(event));
  dragStart = null;
  $("drag").hidden = true;
  if (box[2] - box[0] < 0.02 || box[3] - box[1] < 0.02) return;     // a click, not a box
  describe(box);
}

// The location token under the pointer: cell row·32 + column of the 32×32 grid.
function showCell([x, y]) {
  if (!$("grid-toggle").checked || !state.info) return;
  const n = state.info.location_grid;
  const col = Math.min(Math.floor(x * n), n - 1), row = Math.min(Math.floor(y * n), n - 1);
  $("hover-info").textContent = `cell (${row}, ${col}) = <patch_index_${String(row * n + col).padStart(4, "0")}>`;
}

// ---------------------------------------------------------------------------------------------------------------
// The connector's attention: heat maps drawn from /api/attention ([64][256], mean over heads)

async function loadAttention() {
  if (!state.attention) state.attention = await api(`/api/attention?image_id=${state.imageId}`);
  return state.attention;
}

function rampColour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  return RAMP[i].map((v, k) => Math.round(v * (1 - f) + RAMP[i + 1][k] * f));
}

// Query q's attention over the side×side patches, min-max scaled (draw.attention_heatmap's rule), on the canvas;
// the browser's smoothing stretches it over the image as the processor stretches the image to a square.
function showHeat(q) {
  const a = state.attention;
  const weights = a.weights[q];
  const lo = Math.min(...weights), hi = Math.max(...weights);
  const canvas = $("heat");
  canvas.width = canvas.height = a.side;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(a.side, a.side);
  weights.forEach((w, i) => {
    const [r, g, b] = rampColour(hi > lo ? (w - lo) / (hi - lo) : 0);
    pixels.data.set([r, g, b, 255], i * 4);
  });
  ctx.putImageData(pixels, 0, 0);
  canvas.hidden = false;
  canvas.dataset.query = String(q);
  $("hover-info").textContent = `heat map: latent query ${q}'s attention over the ${a.side}×${a.side} patches (min–max scaled)`;
  $("query").value = q;
  document.querySelectorAll("#queries button").forEach((b, i) => b.classList.toggle("active", i === q));
  const png = $("heat-png");
  png.href = `/api/heatmap?image_id=${state.imageId}&query=${q}`;
  png.hidden = false;
}

function hideHeat() {
  $("heat").hidden = true;
  $("heat-png").hidden = true;
  document.querySelectorAll("#queries button").forEach((b) => b.classList.remove("active"));
}

async function pickQuery(q) {
  if (state.imageId === null) return;
  await task("reading the connector", async () => { await loadAttention(); showHeat(q); });
}

// Hovering patch p shows the query that attends to p the most.
function hoverPatch([x, y]) {
  const a = state.attention;
  if (!a) {                                      // first hover: fetch the attention, then show this patch
    task("reading the connector", loadAttention).then(() => { if (state.attention) hoverPatch([x, y]); });
    return;
  }
  const col = Math.min(Math.floor(x * a.side), a.side - 1), row = Math.min(Math.floor(y * a.side), a.side - 1);
  const patch = row * a.side + col;
  let best = 0;
  a.weights.forEach((w, q) => { if (w[patch] > a.weights[best][patch]) best = q; });
  showHeat(best);
  $("hover-info").textContent = `patch (${row}, ${col}): latent query ${best} attends to it most ` +
    `(${(a.weights[best][patch] * 100).toFixed(1)} % of its attention)`;
}

function buildQueryButtons() {
  const holder = $("queries");
  for (let q = 0; q < state.info.latent_queries; q++) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = q;
    b.title = `latent query ${q}`;
    b.addEventListener("click", () => pickQuery(q));
    holder.appendChild(b);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The raw view: every token the decoder read and wrote

function clearTokens() { $("tokens").tBodies[0].innerHTML = ""; }

function addTokens(tokens, imagePositions, generated) {
  const body = $("tokens").tBodies[0];
  let slots = 0;
  for (const t of tokens) {
    if (imagePositions.has(t.position)) {   // the 64 image slots: one row for all (their ids are placeholders)
      if (slots++ === 0) {
        const row = body.insertRow();
        row.className = "image";
        row.innerHTML = `<td>${t.position}…${t.position + imagePositions.size - 1}</td><td>${t.id}…${t.id + imagePositions.size - 1}</td>` +
          `<td>${imagePositions.size} image embeddings (the connector's output replaces these slots)</td><td></td>`;
      }
      continue;
    }
    const row = body.insertRow();
    row.className = (generated ? "generated " : "") + (/^<.*>$/.test(t.token || "") ? "tag" : "");
    for (const cell of [t.position, t.id, t.token, t.prob === undefined ? "" : fmt(t.prob)]) {
      row.insertCell().textContent = cell;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Start

async function start() {
  state.info = await api("/api/info");
  $("model-name").textContent = state.info.model;
  $("random-banner").hidden = !state.info.random_weights;
  $("prompt").value = state.info.default_prompt;
  $("max-new").max = state.info.max_new_tokens;
  $("max-new").value = state.info.default_max_new_tokens;
  buildQueryButtons();

  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) useImage(async () => file);
    e.target.value = "";                          // choosing the same file again is a new upload
  });
  $("sample-btn").addEventListener("click", () => useImage(async () => {
    const response = await fetch("/samples/two_dogs.jpg");
    if (!response.ok) throw new Error(`the sample photo: HTTP ${response.status}`);
    return response.blob();
  }));
  // A scene of the synthetic world (coloured shapes) that the miniature model (--model mini) was trained on.
  $("scene-btn").addEventListener("click", () => useImage(async () => {
    const seed = Math.floor(Math.random() * 2 ** 31);
    const response = await fetch(`/api/scene.png?seed=${seed}`);
    if (!response.ok) throw new Error(`the generated scene: HTTP ${response.status}`);
    return response.blob();
  }));
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragover");
    const file = e.dataTransfer.files[0];
    if (file) useImage(async () => file);
  });
  stage.addEventListener("pointerdown", onPointerDown);
  stage.addEventListener("pointermove", onPointerMove);
  stage.addEventListener("pointerup", onPointerUp);
  $("caption-btn").addEventListener("click", caption);
  $("ground-btn").addEventListener("click", ground);
  $("ground-phrase").addEventListener("keydown", (e) => { if (e.key === "Enter") ground(); });
  $("heat-btn").addEventListener("click", () => pickQuery(Number($("query").value)));
  $("heat-off").addEventListener("click", hideHeat);
  $("grid-toggle").addEventListener("change", (e) => { $("grid").hidden = !e.target.checked; });
  document.body.dataset.ready = "true";
}

start().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
