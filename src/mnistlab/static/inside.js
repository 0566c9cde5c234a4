// Inside the model: the t-SNE embedding map (hover a point: its digit and the model's reading)
// and the confusion matrix (click a cell: its digits). For the served model, or ?run=NAME.
"use strict";

const run = new URLSearchParams(location.search).get("run");
const query = run ? `?run=${encodeURIComponent(run)}` : "";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
const digitUrl = (i) => `/api/mnist/test/${i}.png`;
document.getElementById("source").textContent = run ? `run ${run}` : "the served model";

const canvas = document.getElementById("map");
const ctx = canvas.getContext("2d");
const hover = document.getElementById("hover");
let points = [];

function drawMap(m) {
  const W = canvas.width;
  const H = canvas.height;
  const pad = 14;
  points = m.x.map((x, i) => ({
    px: pad + x * (W - 2 * pad),
    py: pad + (1 - m.y[i]) * (H - 2 * pad),
    index: m.index[i],
    label: m.label[i],
    prediction: m.prediction[i],
    probability: m.probability[i],
  }));
  ctx.clearRect(0, 0, W, H);
  for (const p of points) {
    ctx.fillStyle = COLORS[p.label];
    ctx.beginPath();
    ctx.arc(p.px, p.py, 2.6, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1.2;
  let mistakes = 0;
  for (const p of points) {
    if (p.label === p.prediction) continue;
    mistakes++;
    ctx.beginPath();
    ctx.arc(p.px, p.py, 6, 0, 2 * Math.PI);
    ctx.stroke();
  }
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  COLORS.forEach((c, d) => {
    const span = lab.el("span");
    const dot = lab.el("i");
    dot.style.background = c;
    span.append(dot, String(d));
    legend.appendChild(span);
  });
  legend.appendChild(lab.el("span", {}, `◯ mistake (${mistakes})`));
  canvas.dataset.points = String(points.length);
  canvas.dataset.mistakes = String(mistakes);
}

function nearest(x, y) {
  let best = null;
  let bestD = 100; // within 10 px
  for (const p of points) {
    const d = (p.px - x) ** 2 + (p.py - y) ** 2;
    if (d < bestD) {
      bestD = d;
      best = p;
    }
  }
  return best;
}

canvas.addEventListener("mousemove", (event) => {
  const r = canvas.getBoundingClientRect();
  const x = ((event.clientX - r.left) * canvas.width) / r.width;
  const y = ((event.clientY - r.top) * canvas.height) / r.height;
  const p = nearest(x, y);
  if (!p) {
    hover.hidden = true;
    return;
  }
  document.getElementById("hover-img").src = digitUrl(p.index);
  const wrong = p.label !== p.prediction;
  const text = document.getElementById("hover-text");
  text.textContent = `test digit ${p.index}: a ${p.label}, read as ${p.prediction} ` +
    `(${(100 * p.probability).toFixed(1)}%)`;
  text.classList.toggle("error", wrong);
  hover.style.left = `${event.clientX - r.left + 14}px`;
  hover.style.top = `${event.clientY - r.top + 14}px`;
  hover.hidden = false;
  hover.dataset.index = String(p.index);
  hover.dataset.prediction = String(p.prediction);
});
canvas.addEventListener("mouseleave", () => {
  hover.hidden = true;
});

function showCell(cm, t, p, td) {
  for (const c of document.querySelectorAll("#confusion td.selected")) c.classList.remove("selected");
  td.classList.add("selected");
  const indices = cm.cells[`${t},${p}`] || [];
  const count = cm.matrix[t][p];
  document.getElementById("cell-title").textContent =
    `True ${t}, read as ${p}: ${count} digit${count === 1 ? "" : "s"}` +
    (indices.length < count ? ` (the first ${indices.length} shown)` : "");
  const box = document.getElementById("cell-digits");
  box.replaceChildren(...indices.map((i) => lab.el("img", { src: digitUrl(i), alt: `test digit ${i}`,
    title: `test digit ${i}`, "data-index": String(i) })));
  box.dataset.cell = `${t},${p}`;
}

function drawConfusion(cm) {
  const table = document.getElementById("confusion");
  const head = lab.el("tr");
  head.appendChild(lab.el("th", {}, "true \\ read"));
  for (let p = 0; p < 10; p++) head.appendChild(lab.el("th", {}, String(p)));
  table.replaceChildren(head);
  const top = Math.max(...cm.matrix.flatMap((row, t) => row.filter((_, p) => p !== t)), 1);
  cm.matrix.forEach((row, t) => {
    const tr = lab.el("tr");
    tr.appendChild(lab.el("th", {}, String(t)));
    row.forEach((v, p) => {
      const td = lab.el("td", { "data-cell": `${t},${p}` }, String(v));
      if (t === p) td.style.background = "#d8f1dc";
      else if (v) td.style.background = `rgba(214, 39, 40, ${(0.12 + 0.6 * v / top).toFixed(2)})`;
      td.addEventListener("click", () => showCell(cm, t, p, td));
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  document.getElementById("cm-status").textContent =
    `Accuracy ${cm.accuracy.toFixed(2)}% on ${cm.count.toLocaleString("en")} test digits.`;
}

lab.json(`/api/inside/confusion${query}`).then(drawConfusion).catch((err) => {
  document.getElementById("cm-status").textContent = `No confusion matrix: ${err.message}`;
});
lab.json(`/api/inside/embedding${query}`).then((m) => {
  drawMap(m);
  document.getElementById("map-status").textContent = "";
}).catch((err) => {
  document.getElementById("map-status").textContent = `No embedding map: ${err.message}`;
});
