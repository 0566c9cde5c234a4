// The drawing page: a canvas, live predictions from POST /api/predict, an upload control.
// Plain JavaScript, no framework and nothing loaded from the internet.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const labelEl = document.getElementById("label");
const confidenceEl = document.getElementById("confidence");
const seenEl = document.getElementById("preprocessed");
const barsEl = document.getElementById("bars");
const statusEl = document.getElementById("status");
const fileEl = document.getElementById("file");
const BLANK = seenEl.src;

// A digit drawn to fill most of the box shrinks about 12× into MNIST's 20-pixel box, so a pen
// of ~1/14 of the canvas ends up near MNIST's 2–3 pixel strokes.
const PEN = Math.round(pad.width / 14);
const THROTTLE_MS = 150; // while a stroke goes on, ask at most this often (and one at a time)

let drawing = false;
let last = null;
let hasInk = false;
let dirty = false; // the canvas changed since the last request was sent
let inFlight = false; // at most one request at a time; the newest drawing is sent after it
let timer = null;
let lastSent = -Infinity; // performance.now() of the last request sent
let generation = 0; // bumped by Clear and uploads so late answers to old drawings are dropped

const fills = [];
for (let d = 0; d < 10; d++) {
  const col = document.createElement("div");
  col.className = "bar";
  col.dataset.digit = String(d);
  col.innerHTML =
    '<span class="pct">0%</span><span class="track"><span class="fill"></span></span>' +
    `<span class="digit">${d}</span>`;
  barsEl.appendChild(col);
  fills.push(col);
}

function resetPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineWidth = PEN;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  hasInk = false;
}

function showResult(result) {
  labelEl.textContent = String(result.label);
  confidenceEl.textContent = `${(result.probability * 100).toFixed(1)}% sure`;
  seenEl.src = `data:image/png;base64,${result.preprocessed}`;
  result.probabilities.forEach((p, d) => {
    const col = fills[d];
    col.querySelector(".fill").style.height = `${(p * 100).toFixed(1)}%`;
    col.querySelector(".pct").textContent = p >= 0.995 ? "100%" : `${Math.round(p * 100)}%`;
    col.classList.toggle("winner", d === result.label);
  });
}

function clearResult() {
  labelEl.textContent = "–";
  confidenceEl.innerHTML = "&nbsp;";
  seenEl.src = BLANK;
  for (const col of fills) {
    col.querySelector(".fill").style.height = "0";
    col.querySelector(".pct").textContent = "0%";
    col.classList.remove("winner");
  }
}

function setStatus(text, isError = false) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", isError);
}

// POST one request; shows its answer unless the page moved on (Clear, upload) meanwhile.
async function predict(form, gen) {
  inFlight = true;
  document.body.dataset.busy = "1";
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (gen !== generation) return;
    if (response.ok) {
      showResult(body);
      setStatus(`Read as ${body.label}.`);
      // why.js (the Why? overlay) listens for this and explains the same input.
      document.dispatchEvent(new CustomEvent("mnistlab:read", { detail: { form, gen } }));
    } else {
      clearResult();
      document.dispatchEvent(new CustomEvent("mnistlab:cleared"));
      setStatus(body.detail || `error ${response.status}`, true);
    }
  } catch (err) {
    if (gen === generation) setStatus(`The server did not answer (${err.message}).`, true);
  } finally {
    inFlight = false;
    delete document.body.dataset.busy;
    if (dirty) scheduleNext();
  }
}

function schedule(delay) {
  if (timer !== null) clearTimeout(timer);
  timer = setTimeout(sendDrawing, delay);
}

// Send the newest drawing as soon as the throttle allows.
function scheduleNext() {
  schedule(Math.max(0, lastSent + THROTTLE_MS - performance.now()));
}

function sendDrawing() {
  timer = null;
  if (!dirty || inFlight || !hasInk) return;
  dirty = false;
  inFlight = true; // already: encoding the PNG takes a moment
  lastSent = performance.now();
  const gen = generation;
  pad.toBlob((blob) => {
    if (gen !== generation || !blob) {
      inFlight = false;
      return;
    }
    const form = new FormData();
    form.append("file", blob, "drawing.png");
    predict(form, gen);
  }, "image/png");
}

function point(event) {
  const r = pad.getBoundingClientRect();
  return [
    ((event.clientX - r.left) * pad.width) / r.width,
    ((event.clientY - r.top) * pad.height) / r.height,
  ];
}

function dot([x, y]) {
  ctx.beginPath();
  ctx.arc(x, y, PEN / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function line([x0, y0], [x1, y1]) {
  ctx.beginPath();
  ctx.moveTo(x0, y0);
  ctx.lineTo(x1, y1);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = point(event);
  dot(last);
  hasInk = true;
  dirty = true;
  setStatus("Reading…");
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    line(last, p);
    last = p;
  }
  dirty = true;
  if (timer === null) scheduleNext(); // throttled: a steady stroke still gets answers
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  last = null;
  schedule(0);
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
pad.addEventListener("lostpointercapture", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  generation++;
  dirty = false;
  if (timer !== null) clearTimeout(timer);
  timer = null;
  resetPad();
  clearResult();
  document.dispatchEvent(new CustomEvent("mnistlab:cleared"));
  fileEl.value = "";
  setStatus("Draw a digit in the box.");
});

fileEl.addEventListener("change", async () => {
  const file = fileEl.files[0];
  if (!file) return;
  generation++;
  dirty = false;
  resetPad();
  // Show the picture in the box when the browser can decode it; the server reads the file itself.
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    bitmap.close();
    hasInk = true;
  } catch {
    // Not decodable here (TIFF, say, or not an image): the server's answer says which.
  }
  setStatus(`Reading ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  predict(form, generation);
});

async function loadModel() {
  const el = document.getElementById("model");
  try {
    const response = await fetch("/api/model");
    const m = await response.json();
    const acc =
      m.test_accuracy === null || m.test_accuracy === undefined
        ? "test accuracy unknown."
        : `test accuracy ${m.test_accuracy.toFixed(2)}% on the 10,000 MNIST test digits.`;
    el.textContent =
      `Model: ${m.name} (${m.architecture}, ${m.parameters.toLocaleString("en")} ` +
      `parameters), ${acc}`;
  } catch (err) {
    el.textContent = `Could not load the model's details (${err.message}).`;
  }
}

resetPad();
clearResult();
loadModel();
