// The runs table (newest first, refreshed every few seconds) and the form that starts a run.
"use strict";

const tbody = document.querySelector("#runs tbody");
const startForm = document.getElementById("start");
const startStatus = document.getElementById("start-status");

function row(r) {
  const tr = lab.el("tr", { "data-name": r.name });
  const name = lab.el("td");
  name.appendChild(lab.el("a", { href: `/runs/${encodeURIComponent(r.name)}` }, r.name));
  tr.appendChild(name);
  const st = lab.el("td");
  st.appendChild(lab.el("span", { class: `badge ${r.status}` }, r.status));
  tr.appendChild(st);
  tr.appendChild(lab.el("td", {}, r.model || "–"));
  tr.appendChild(lab.el("td", {}, r.recipe || "–"));
  const planned = r.planned_epochs && r.status !== "complete" ? `/${r.planned_epochs}` : "";
  tr.appendChild(lab.el("td", { class: "num" }, `${r.epochs ?? 0}${planned}`));
  tr.appendChild(lab.el("td", { class: "num" }, lab.pct(r.test_acc)));
  tr.appendChild(lab.el("td", {}, (r.date || "").replace("T", " ").slice(0, 16)));
  return tr;
}

async function refresh() {
  try {
    const data = await lab.json("/api/runs");
    document.getElementById("runs-dir").textContent = `runs folder: ${data.runs_dir}`;
    tbody.replaceChildren(...data.runs.map(row));
    if (!data.train_allowed) {
      for (const input of startForm.elements) input.disabled = true;
      startStatus.textContent =
        "Starting runs is off: this server is not on a loopback address (restart it with --allow-train).";
    }
    document.body.dataset.loaded = "1";
  } catch (err) {
    startStatus.textContent = `Could not list the runs: ${err.message}`;
  }
}

startForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = {};
  for (const [k, v] of new FormData(startForm)) if (String(v).trim() !== "") data[k] = String(v).trim();
  startStatus.classList.remove("error");
  startStatus.textContent = "Starting…";
  try {
    const job = await lab.post("/api/runs", data);
    location.href = `/runs/${encodeURIComponent(job.name)}`;
  } catch (err) {
    startStatus.classList.add("error");
    startStatus.textContent = `mnistlab: error: ${err.message}`;
  }
});

refresh();
setInterval(refresh, 3000);
