// Helpers shared by the runs, run and inside pages: JSON requests and small SVG line charts.
// Plain JavaScript, nothing loaded from elsewhere.
"use strict";

const lab = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  async function json(url, options = {}) {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) {
      const error = new Error(body.detail || `error ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function post(url, data) {
    return json(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data || {}),
    });
  }

  function el(tag, attrs = {}, text = null) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs = {}) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  const pct = (v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(2)}%`);

  // series: [{label, color, points: [[x, y], ...], dots}] drawn into <svg> with axes.
  function chart(svg, series, { xlabel = "", ylabel = "", ymin = null, ymax = null } = {}) {
    const w = Number(svg.getAttribute("width"));
    const h = Number(svg.getAttribute("height"));
    const m = { l: 48, r: 12, t: 22, b: 34 };
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
    let x0 = 0;
    let x1 = Math.max(1, ...all.map((p) => p[0]));
    let y0 = ymin ?? Math.min(...all.map((p) => p[1]));
    let y1 = ymax ?? Math.max(...all.map((p) => p[1]));
    if (!all.length) {
      y0 = 0;
      y1 = 1;
    }
    if (y1 - y0 < 1e-9) {
      y0 -= 0.5;
      y1 += 0.5;
    }
    const pad = (y1 - y0) * 0.05;
    y0 -= ymin === null ? pad : 0;
    y1 += ymax === null ? pad : 0;
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (w - m.l - m.r);
    const Y = (y) => h - m.b - ((y - y0) / (y1 - y0)) * (h - m.t - m.b);
    svg.appendChild(svgEl("line", { x1: m.l, y1: h - m.b, x2: w - m.r, y2: h - m.b, stroke: "#9aa3b2" }));
    svg.appendChild(svgEl("line", { x1: m.l, y1: m.t, x2: m.l, y2: h - m.b, stroke: "#9aa3b2" }));
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      const t = svgEl("text", { x: m.l - 6, y: Y(y) + 4, "text-anchor": "end", class: "axis" });
      t.textContent = Math.abs(y1 - y0) < 0.1 ? y.toFixed(3) : y.toFixed(Math.abs(y1) >= 10 ? 1 : 2);
      svg.appendChild(t);
      svg.appendChild(svgEl("line", { x1: m.l, y1: Y(y), x2: w - m.r, y2: Y(y), stroke: "#eef0f4" }));
    }
    for (let e = 0; e <= Math.ceil(x1); e++) {
      const t = svgEl("text", { x: X(e), y: h - m.b + 14, "text-anchor": "middle", class: "axis" });
      t.textContent = String(e);
      svg.appendChild(t);
    }
    const xl = svgEl("text", { x: (m.l + w - m.r) / 2, y: h - 4, "text-anchor": "middle", class: "axis" });
    xl.textContent = xlabel;
    svg.appendChild(xl);
    const yl = svgEl("text", { x: m.l, y: 14, "text-anchor": "start", class: "axis" });
    yl.textContent = ylabel;
    svg.appendChild(yl);
    let lx = w - m.r;
    for (const s of [...series].reverse()) {
      const pts = s.points.filter((p) => Number.isFinite(p[1]));
      if (pts.length) {
        const d = pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
        svg.appendChild(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.8,
          "stroke-dasharray": s.dash || "none" }));
        if (s.dots) {
          for (const p of pts) svg.appendChild(svgEl("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: s.color }));
        }
      }
      const t = svgEl("text", { x: lx, y: 14, "text-anchor": "end", fill: s.color });
      t.textContent = s.label;
      svg.appendChild(t);
      lx -= 8 + 6.2 * s.label.length;
    }
    svg.dataset.points = String(all.length);
  }

  return { json, post, el, svgEl, pct, chart };
})();
