// The "Why?" toggle on the drawing page: with it on, every reading is explained by
// POST /api/explain (integrated gradients) and the heat map is laid over "What the model saw".
// Red pixels raised the predicted digit's score, blue ones lowered it.
"use strict";

(() => {
  const toggle = document.getElementById("why");
  const overlay = document.getElementById("why-overlay");
  if (!toggle || !overlay) return;
  const octx = overlay.getContext("2d");
  let last = null; // the newest reading's form, to explain it when the toggle is switched on
  let inFlight = false;
  let pending = null; // a newer reading that arrived while one was being explained
  let shown = 0; // explanations drawn, for tests and the curious
  let epoch = 0; // bumped when the page is cleared, so late answers are dropped

  function clear() {
    epoch++;
    last = null;
    pending = null;
    octx.clearRect(0, 0, overlay.width, overlay.height);
    overlay.hidden = true;
    delete overlay.dataset.label;
  }

  // Colour is the sign, opacity the size (relative to the largest), as in the report's figure.
  function draw(saliency, label) {
    let top = 0;
    for (const row of saliency) for (const v of row) top = Math.max(top, Math.abs(v));
    const image = octx.createImageData(28, 28);
    for (let r = 0; r < 28; r++) {
      for (let c = 0; c < 28; c++) {
        const v = top > 0 ? saliency[r][c] / top : 0;
        const i = 4 * (r * 28 + c);
        image.data[i] = v > 0 ? 220 : 40;
        image.data[i + 1] = 50;
        image.data[i + 2] = v > 0 ? 40 : 230;
        image.data[i + 3] = Math.round(255 * Math.min(1, Math.pow(Math.abs(v), 0.7)));
      }
    }
    octx.putImageData(image, 0, 0);
    overlay.hidden = false;
    overlay.dataset.label = String(label);
    shown++;
    overlay.dataset.shown = String(shown);
  }

  async function explain(form) {
    inFlight = true;
    const mine = epoch;
    try {
      const response = await fetch("/api/explain", { method: "POST", body: form });
      const body = await response.json().catch(() => ({}));
      if (mine === epoch && toggle.checked && response.ok) draw(body.saliency, body.label);
    } catch {
      // The reading itself shows the server's trouble; the overlay just stays as it was.
    } finally {
      inFlight = false;
      if (pending && toggle.checked) {
        const next = pending;
        pending = null;
        explain(next);
      }
    }
  }

  document.addEventListener("mnistlab:read", (event) => {
    last = event.detail.form;
    if (!toggle.checked) return;
    if (inFlight) pending = last;
    else explain(last);
  });
  document.addEventListener("mnistlab:cleared", clear);

  toggle.addEventListener("change", () => {
    document.body.classList.toggle("why-on", toggle.checked);
    if (!toggle.checked) {
      overlay.hidden = true;
      return;
    }
    if (last && !inFlight) explain(last);
  });
})();
