// A run's page: live curves from the server-sent events of its run folder, Stop and Resume,
// the final accuracy from summary.json and the report once the run is complete.
"use strict";

const name = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const $ = (id) => document.getElementById(id);
const LIVE = ["queued", "running", "stopping"];
let source = null;
let data = null;
let updates = 0;
let liveUpdates = 0; // drawn while the run was queued or running
let status = null;
let allowed = false;
let planned = null;

function reset() {
  data = { stepLoss: [], stepAcc: [], trainLoss: [], testLoss: [], testAcc: [], valLoss: [], valAcc: [] };
}

function draw() {
  lab.chart($("loss-chart"), [
    { label: "loss per interval", color: "#9db4e0", points: data.stepLoss, width: 1.3 },
    { label: "train loss", color: "#2f6fde", points: data.trainLoss, dots: true },
    { label: "val loss", color: "#8e44ad", points: data.valLoss, dots: true, dash: "5 3" },
    { label: "test loss", color: "#d9822b", points: data.testLoss, dots: true },
  ], { xlabel: "epoch", ylabel: "cross-entropy loss" });
  lab.chart($("acc-chart"), [
    { label: "train acc per interval", color: "#9db4e0", points: data.stepAcc, width: 1.3 },
    { label: "val acc", color: "#8e44ad", points: data.valAcc, dots: true, dash: "5 3" },
    { label: "test acc", color: "#d9822b", points: data.testAcc, dots: true },
  ], { xlabel: "epoch", ylabel: "accuracy (%)" });
}

function counted() {
  updates++;
  if (LIVE.includes(status)) liveUpdates++;
  $("updates").textContent = String(updates);
  document.body.dataset.updates = String(updates);
  document.body.dataset.liveUpdates = String(liveUpdates);
}

function setStatus(s, error) {
  status = s;
  const badge = $("status");
  badge.textContent = s;
  badge.className = `badge ${s}`;
  document.body.dataset.status = s;
  $("stop").disabled = !allowed || !LIVE.includes(s);
  $("resume").disabled = !allowed || !["stopped", "incomplete", "failed"].includes(s);
  const message = $("message");
  message.classList.toggle("error", Boolean(error));
  if (error) message.textContent = error;
  else if (s === "stopped" || s === "incomplete")
    message.textContent = "Stopped. Its last complete epoch is saved: Resume continues from there " +
      `(or: mnistlab train --resume runs/${name}).`;
  else message.textContent = "";
}

function connect() {
  if (source) source.close();
  reset();
  draw();
  source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  source.addEventListener("step", (e) => {
    const r = JSON.parse(e.data);
    const x = r.epoch - 1 + r.step / r.steps;
    data.stepLoss.push([x, r.loss]);
    data.stepAcc.push([x, r.acc]);
    $("step-loss").textContent = r.loss.toFixed(3);
    $("epoch").textContent = planned ? `${r.epoch} / ${planned}` : String(r.epoch);
    draw();
    counted();
  });
  source.addEventListener("epoch", (e) => {
    const r = JSON.parse(e.data);
    data.trainLoss.push([r.epoch, r.train_loss]);
    data.testLoss.push([r.epoch, r.test_loss]);
    data.testAcc.push([r.epoch, r.test_acc]);
    if (r.val_loss !== undefined) data.valLoss.push([r.epoch, r.val_loss]);
    if (r.val_acc !== undefined) data.valAcc.push([r.epoch, r.val_acc]);
    $("epoch-acc").textContent = lab.pct(r.test_acc);
    draw();
    counted();
  });
  source.addEventListener("status", (e) => {
    const r = JSON.parse(e.data);
    setStatus(r.status, r.error);
  });
  source.addEventListener("done", (e) => {
    const summary = JSON.parse(e.data);
    $("final-acc").textContent = lab.pct(summary.test_acc);
    document.body.dataset.finalAcc = lab.pct(summary.test_acc);
  });
  source.addEventListener("end", () => {
    source.close();
    source = null;
    document.body.dataset.ended = "1";
    details();
  });
}

async function details() {
  try {
    const d = await lab.json(`/api/runs/${encodeURIComponent(name)}`);
    allowed = d.train_allowed;
    planned = d.config ? d.config.epochs : planned;
    if (d.log && d.log.length) $("log").textContent = d.log.join("\n");
    if (d.report) {
      $("report-panel").hidden = false;
      const url = `/runs/${encodeURIComponent(name)}/report.html`;
      $("report-link").href = url;
      if ($("report").getAttribute("src") !== url) $("report").setAttribute("src", url);
    }
    if (!source) setStatus(d.status, d.job && d.job.error);
  } catch (err) {
    $("message").textContent = `Could not read the run: ${err.message}`;
  }
}

async function act(what) {
  $("action-status").textContent = what === "stop" ? "Stopping…" : "Resuming…";
  if (what === "resume") {
    delete document.body.dataset.ended;
    delete document.body.dataset.finalAcc;
  }
  try {
    await lab.post(`/api/runs/${encodeURIComponent(name)}/${what}`);
    $("action-status").textContent = "";
    if (what === "resume") connect();
  } catch (err) {
    $("action-status").textContent = `mnistlab: error: ${err.message}`;
  }
}

$("name").textContent = name;
document.title = `mnistlab — run ${name}`;
$("inside-link").href = `/inside?run=${encodeURIComponent(name)}`;
$("stop").addEventListener("click", () => act("stop"));
$("resume").addEventListener("click", () => act("resume"));
details().then(connect);
setInterval(() => {
  if (source) details();
}, 2000);
