"""The status page: plain HTML and a small inline script (no CDN: the browser may have no internet)."""
# ruff: noqa: E501  (HTML and JavaScript source; their lines are not Python's)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgsidecar demo: status</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1em 2em; background: #f7f7f9; color: #222; }
 .cards { display: flex; gap: 1em; flex-wrap: wrap; }
 .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 11em; }
 .card .k { font-size: 0.8em; color: #666; } .card .v { font-size: 1.4em; font-weight: 600; }
 .up { color: #1a7f37; } .failing_over { color: #b26b00; } .outage { color: #c62828; }
 .recovering { color: #1565c0; } .unknown { color: #777; }
 canvas { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin-top: 1em; }
 table { border-collapse: collapse; margin-top: 1em; background: #fff; }
 td, th { padding: 0.25em 0.8em; border: 1px solid #ddd; text-align: right; }
 td:first-child, th:first-child { text-align: left; }
 .muted { color: #777; font-size: 0.85em; } #verdict { font-weight: 600; margin-top: 0.8em; }
</style></head>
<body>
<h2>pgsidecar demo <span class="muted" id="links"></span></h2>
<div class="cards">
 <div class="card"><div class="k">cluster state</div><div class="v" id="state">?</div></div>
 <div class="card"><div class="k">writer</div><div class="v" id="writer">?</div><div class="k" id="region"></div></div>
 <div class="card"><div class="k">spool pending</div><div class="v" id="spool">?</div><div class="k" id="spoolrec"></div></div>
 <div class="card"><div class="k">held requests</div><div class="v" id="held">?</div><div class="k" id="failovers"></div></div>
 <div class="card"><div class="k">phase</div><div class="v" id="phase">?</div><div class="k" id="orders"></div></div>
 <div class="card"><div class="k">reservations list (reads)</div><div class="v" id="reads">?</div><div class="k" id="readsk"></div></div>
</div>
<div class="muted" id="reason"></div>
<canvas id="chart" width="1100" height="380"></canvas>
<div class="muted">Order latency (log scale) by the time the order was placed: green = booked, red = error page or
no answer, grey = still waiting. Vertical lines: phase changes (solid) and faults (dashed).</div>
<table id="table"></table>
<div id="verdict"></div>
<script>
"use strict";
const samples = [];  // [t, latency, ok, phase]
let doc = null;
const $ = (id) => document.getElementById(id);

async function poll() {
  try {
    const r = await fetch("/status.json?since=" + samples.length, {cache: "no-store"});
    doc = await r.json();
    if (doc.samples) samples.push(...doc.samples);
    render();
  } catch (e) { $("reason").textContent = "status endpoint unreachable: " + e; }
  setTimeout(poll, 1000);
}

function render() {
  if (!doc || doc.error) { $("reason").textContent = doc ? doc.error : ""; return; }
  const s = doc.sidecar || {};
  $("state").textContent = s.state || "?";
  $("state").className = "v " + (s.state || "unknown");
  $("writer").textContent = s.writer_host || "none";
  $("region").textContent = s.writer_region ? "region " + s.writer_region : "";
  $("spool").textContent = s.spool_pending ?? "?";
  const rec = s.spool_records || {};
  $("spoolrec").textContent = Object.entries(rec).map(([k, v]) => k + " " + v).join(", ");
  $("held").textContent = s.held_requests ?? "?";
  const fo = s.failovers || {};
  $("failovers").textContent = "failovers: " + Object.entries(fo).map(([k, v]) => k + " " + v).join(", ");
  $("phase").textContent = doc.phase || "-";
  const n = doc.counts;
  $("orders").textContent = n ? n.acknowledged + " booked / " + n.attempted + " placed" : "";
  $("reads").textContent = n ? n.reads_served + " served / " + n.reads + " reads" : "?";
  $("readsk").textContent = n ? n.reads_failed + " failed, " + n.reads_stale + " stale beyond the bound" : "";
  $("reason").textContent = (s.error ? "sidecar: " + s.error + " " : "") + (s.reason ? "readyz: " + s.reason : "");
  const u = doc.urls || {};
  $("links").innerHTML = Object.entries(u).map(([k, v]) => '<a href="' + v + '">' + k + "</a>").join(" &middot; ");
  renderTable(); draw();
  $("verdict").textContent = doc.verdict || "";
}

function renderTable() {
  const t = $("table"); const head = doc.header || []; const rows = doc.table || [];
  let html = "<tr>" + head.map((h) => "<th>" + h + "</th>").join("") + "</tr>";
  for (const row of rows) html += "<tr>" + head.map((h) => "<td>" + row[h] + "</td>").join("") + "</tr>";
  t.innerHTML = rows.length ? html : "";
}

function draw() {
  const c = $("chart"), g = c.getContext("2d"), W = c.width, H = c.height;
  const L = 60, R = 20, T = 30, B = 30;
  g.clearRect(0, 0, W, H);
  const now = doc.now, x0 = Math.max(0, now - 180), x1 = now + 2;
  let ymax = 10;
  for (const p of samples) if (p[0] >= x0) ymax = Math.max(ymax, p[1] * 1.5);
  const lo = Math.log10(0.001), hi = Math.log10(ymax);
  const X = (t) => L + (t - x0) / (x1 - x0) * (W - L - R);
  const Y = (v) => H - B - (Math.log10(Math.max(v, 0.001)) - lo) / (hi - lo) * (H - T - B);
  g.font = "11px sans-serif"; g.strokeStyle = "#eee"; g.fillStyle = "#666"; g.lineWidth = 1;
  for (const [v, label] of [[0.001, "1 ms"], [0.01, "10 ms"], [0.1, "100 ms"], [1, "1 s"], [10, "10 s"], [100, "100 s"]]) {
    if (v > ymax) break;
    g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(W - R, Y(v)); g.stroke(); g.fillText(label, 8, Y(v) + 4);
  }
  for (let t = Math.ceil(x0 / 10) * 10; t <= x1; t += 10) g.fillText(t + " s", X(t) - 8, H - 10);
  for (const ph of doc.phases || []) {
    if (ph.t < x0) continue;
    g.strokeStyle = "#555"; g.setLineDash([]); g.beginPath(); g.moveTo(X(ph.t), T - 14); g.lineTo(X(ph.t), H - B); g.stroke();
    g.fillStyle = "#222"; g.fillText(ph.name, X(ph.t) + 3, T - 4);
  }
  let lane = 0, lastX = -1e9;  // labels of nearby faults go one line lower, so they stay readable
  for (const ev of doc.events || []) {
    if (ev.t < x0) continue;
    const x = X(ev.t);
    lane = x - lastX < 220 ? lane + 1 : 0; lastX = x;
    g.strokeStyle = "#e65100"; g.setLineDash([4, 4]); g.beginPath(); g.moveTo(x, T); g.lineTo(x, H - B); g.stroke();
    g.fillStyle = "#e65100"; g.fillText(ev.text, x + 3, T + 12 + 12 * (lane % 6));
  }
  g.setLineDash([]);
  for (const p of samples) {
    if (p[0] < x0) continue;
    const x = X(p[0]), y = Y(p[1]);
    if (p[2]) { g.fillStyle = "#2e7d32"; g.fillRect(x - 1.5, y - 1.5, 3, 3); }
    else { g.strokeStyle = "#c62828"; g.lineWidth = 2; g.beginPath(); g.moveTo(x - 4, y - 4); g.lineTo(x + 4, y + 4);
           g.moveTo(x + 4, y - 4); g.lineTo(x - 4, y + 4); g.stroke(); g.lineWidth = 1; }
  }
  g.strokeStyle = "#9e9e9e"; g.lineWidth = 3;
  for (const p of doc.pending || []) { g.beginPath(); g.moveTo(X(p[0]), Y(0.001)); g.lineTo(X(p[0]), Y(p[1])); g.stroke(); }
  g.lineWidth = 1;
}
poll();
</script>
</body></html>
"""
