// The fleet dashboard: reads the REST API (/api/v1) every 5 s and draws tables and SVG charts.
// No framework, no build step, nothing fetched from anywhere but this fleet.
"use strict";

const REFRESH_MS = 5000;
const SERIES_SPAN_S = 900;
let token = new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("outpost-token") || "";

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch("/api/v1" + path, { headers });
  if (r.status === 401) {
    document.getElementById("login").hidden = false;
    throw new Error("this fleet needs its API token");
  }
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    const e = new Error(msg);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

function when(secs) {
  if (!secs) return "never";
  const ago = Math.max(0, Math.round(Date.now() / 1000 - secs));
  return ago < 120 ? ago + " s ago" : ago < 7200 ? Math.round(ago / 60) + " min ago" : new Date(secs * 1000).toISOString();
}

function num(x, digits = 4) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
}

function rows(id, html) {
  document.querySelector("#" + id + " tbody").innerHTML = html || '<tr><td colspan="9" class="muted">none</td></tr>';
}

// A line chart of `series` ([{time, value}] per named line) as an SVG string.
function lineChart(kind, lines, unit) {
  const w = 420, h = 140, pad = 30;
  const all = lines.flatMap((l) => l.points.filter((p) => p.value !== null && p.value !== undefined));
  const colors = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
  if (all.length === 0) {
    return `<svg class="chart" data-series="${kind}" data-points="0" width="${w}" height="${h}"><text x="${pad}" y="${h / 2}">no data yet</text></svg>`;
  }
  const t0 = Math.min(...all.map((p) => p.time)), t1 = Math.max(...all.map((p) => p.time));
  const vmax = Math.max(...all.map((p) => p.value)) || 1;
  const x = (t) => pad + ((t - t0) / Math.max(1, t1 - t0)) * (w - 2 * pad);
  const y = (v) => h - pad + 10 - (v / vmax) * (h - 2 * pad);
  let svg = `<svg class="chart" data-series="${kind}" data-points="${all.length}" width="${w}" height="${h}">`;
  svg += `<line x1="${pad}" y1="${h - pad + 10}" x2="${w - pad}" y2="${h - pad + 10}" stroke="#c5ccd5"/>`;
  svg += `<text x="2" y="${y(vmax) + 4}">${esc(num(vmax, 3))}${esc(unit)}</text><text x="2" y="${h - pad + 14}">0</text>`;
  svg += `<text x="${pad}" y="${h - 4}">${esc(new Date(t0 * 1000).toLocaleTimeString())}</text>`;
  svg += `<text x="${w - pad - 50}" y="${h - 4}">${esc(new Date(t1 * 1000).toLocaleTimeString())}</text>`;
  lines.forEach((l, i) => {
    const pts = l.points.filter((p) => p.value !== null && p.value !== undefined).map((p) => `${x(p.time).toFixed(1)},${y(p.value).toFixed(1)}`).join(" ");
    svg += `<polyline fill="none" stroke="${colors[i % colors.length]}" stroke-width="1.5" points="${pts}"><title>${esc(l.name)}</title></polyline>`;
  });
  svg += "</svg>";
  const legend = lines.map((l, i) => `<span><i class="swatch" style="background:${colors[i % colors.length]}"></i>${esc(l.name)}</span>`).join("");
  return svg + `<div class="legend">${legend}</div>`;
}

// Observed shares against the baseline's expected shares, slot by slot.
function histogram(f) {
  const w = 300, h = 110, pad = 14;
  const total = f.counts.reduce((a, b) => a + b, 0) || 1;
  const observed = f.counts.map((c) => c / total);
  const top = Math.max(...observed, ...f.expected, 0.01);
  const slot = (w - 2 * pad) / f.counts.length;
  let svg = `<svg class="histogram" data-feature="${esc(f.feature)}" width="${w}" height="${h}">`;
  f.counts.forEach((_, i) => {
    const e = (f.expected[i] / top) * (h - 2 * pad), o = (observed[i] / top) * (h - 2 * pad);
    const x0 = pad + i * slot;
    svg += `<rect x="${(x0 + 1).toFixed(1)}" y="${(h - pad - e).toFixed(1)}" width="${(slot / 2 - 1).toFixed(1)}" height="${e.toFixed(1)}" fill="#94a3b8"><title>expected ${num(f.expected[i], 3)}</title></rect>`;
    svg += `<rect x="${(x0 + slot / 2).toFixed(1)}" y="${(h - pad - o).toFixed(1)}" width="${(slot / 2 - 1).toFixed(1)}" height="${o.toFixed(1)}" fill="#2563eb"><title>observed ${num(observed[i], 3)}</title></rect>`;
  });
  svg += `<text x="${pad}" y="${h - 2}">below</text><text x="${w - pad - 28}" y="${h - 2}">above</text></svg>`;
  return svg;
}

function level(l) {
  return l === "significant" ? "bad" : l === "moderate" ? "warn" : "ok";
}

async function modelPanel(model, version, devicesOn) {
  const q = `model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}`;
  const [series, drift, quality] = await Promise.all([
    api(`/series?${q}&span=${SERIES_SPAN_S}`),
    api(`/drift?${q}&window=3600`).catch((e) => (e.status === 400 || e.status === 404 ? null : Promise.reject(e))),
    api(`/quality?${q}`).catch(() => null),
  ]);
  const pts = series.points;
  const requests = pts.reduce((a, p) => a + p.requests, 0), errors = pts.reduce((a, p) => a + p.errors, 0);
  const p95s = pts.map((p) => p.p95_latency).filter((v) => v !== null);
  const summary = `<tr data-model="${esc(model)}" data-version="${esc(version)}"><td>${esc(model)}</td><td>${esc(version)}</td><td>${devicesOn}</td><td>${requests}</td><td>${requests ? num(errors / requests) : "–"}</td><td>${p95s.length ? num(Math.max(...p95s) * 1000, 2) + " ms" : "–"}</td><td>${quality && quality.accuracy !== null ? num(quality.accuracy) + " (" + quality.labels + ")" : "–"}</td></tr>`;
  let html = `<div class="model" data-model="${esc(model)}" data-version="${esc(version)}"><h3>${esc(model)} ${esc(version)}</h3><div class="charts">`;
  html += `<div class="chart-box"><div class="muted">requests per ${series.step_s} s</div>${lineChart("requests", [{ name: "requests", points: pts.map((p) => ({ time: p.time, value: p.requests })) }, { name: "errors", points: pts.map((p) => ({ time: p.time, value: p.errors })) }], "")}</div>`;
  html += `<div class="chart-box"><div class="muted">p95 latency</div>${lineChart("latency", [{ name: "p95 latency (ms)", points: pts.map((p) => ({ time: p.time, value: p.p95_latency === null ? null : p.p95_latency * 1000 })) }], " ms")}</div>`;
  if (drift) {
    const names = drift.features.map((f) => f.feature);
    html += `<div class="chart-box"><div class="muted">PSI per ${series.step_s} s</div>${lineChart("psi", names.map((n) => ({ name: n, points: pts.map((p) => ({ time: p.time, value: p.psi[n] ?? null })) })), "")}</div>`;
    html += "</div><h3>Drift against the training baseline <span class=\"muted\">(last hour, all devices; grey: training, blue: observed)</span></h3>";
    for (const f of drift.features) {
      html += `<div class="drift-panel" data-feature="${esc(f.feature)}" data-psi="${f.psi ?? ""}"><div><b>${esc(f.feature)}</b> ${f.output ? "(output)" : ""} PSI <span class="${level(f.level)}">${num(f.psi)}</span> ${esc(f.level || "")} · n=${f.n} · mean ${num(f.mean, 3)}</div>${histogram(f)}</div>`;
    }
  } else {
    html += '</div><p class="muted">No training baseline in this bundle: no drift monitoring.</p>';
  }
  return { summary, html: html + "</div>" };
}

// One model's versions by role, each candidate and shadow against the primary.
function comparison(c) {
  const primary = c.versions.find((v) => v.role === "primary");
  const rate = (v) => (v.error_rate === null ? "–" : num(v.error_rate * 100, 2) + "%");
  const p95 = (v) => (v.p95_latency_s === null ? "–" : num(v.p95_latency_s * 1000, 1) + " ms");
  const body = c.versions.map((v) => {
    let against = "";
    if (v.role !== "primary" && primary) {
      const parts = [];
      if (v.error_rate !== null && primary.error_rate !== null) parts.push(`errors ${(v.error_rate - primary.error_rate >= 0 ? "+" : "") + num((v.error_rate - primary.error_rate) * 100, 2)} pts`);
      if (v.p95_latency_s !== null && primary.p95_latency_s) parts.push(`p95 ×${num(v.p95_latency_s / primary.p95_latency_s, 2)}`);
      if (v.accuracy !== null && primary.accuracy !== null) parts.push(`accuracy ${(v.accuracy - primary.accuracy >= 0 ? "+" : "") + num(v.accuracy - primary.accuracy, 4)}`);
      against = parts.join(" · ");
    }
    const s = v.shadow;
    const agreement = s && s.agreement !== null ? `<span class="${s.agreement >= 0.95 ? "ok" : s.agreement >= 0.8 ? "warn" : "bad"}">${num(s.agreement * 100, 1)}%</span> of ${s.agreed + s.disagreed}${s.dropped ? `, ${s.dropped} dropped` : ""}` : "–";
    return `<tr data-version="${esc(v.version)}" data-role="${esc(v.role)}" data-requests="${v.requests}" data-agreement="${s && s.agreement !== null ? s.agreement : ""}"><td>${esc(v.version)}</td><td>${esc(v.role)}</td><td>${v.devices}</td><td>${v.requests}</td><td>${rate(v)}</td><td>${p95(v)}</td><td>${v.accuracy !== null ? num(v.accuracy) + " (" + v.labels + ")" : "–"}</td><td>${agreement}</td><td>${esc(against)}</td></tr>`;
  }).join("");
  return `<h3>${esc(c.model)}</h3><table class="compare" data-compare="${esc(c.model)}"><thead><tr><th>version</th><th>role</th><th>devices</th><th>requests</th><th>error rate</th><th>p95 latency</th><th>accuracy</th><th>shadow agreement</th><th>against the primary</th></tr></thead><tbody>${body}</tbody></table>`;
}

async function refresh() {
  try {
    const [info, devices, deployments, rollouts, rules, firings] = await Promise.all([
      api("/fleet"), api("/devices"), api("/deployments"), api("/rollouts"), api("/rules"), api("/firings?limit=20"),
    ]);
    document.getElementById("fleet-info").textContent = `replica ${info.replica} · broker ${info.broker}${info.broker_connected ? "" : " (disconnected)"}`;
    const online = devices.filter((d) => d.online).length;
    document.getElementById("device-count").textContent = `${online} of ${devices.length} online`;
    rows("devices", devices.map((d) => {
      const r = d.reported || {};
      const active = Object.entries(r.active || {}).map(([m, v]) => `${esc(m)} ${esc(v)}`).join("<br>");
      const policies = Object.entries(r.policies || {}).map(([m, p]) => `${esc(m)}: ${esc(p)}`).join("<br>");
      return `<tr data-device="${esc(d.id)}"><td>${esc(d.id)}</td><td class="${d.online ? "ok" : "bad"}">${d.online ? "online" : "offline " + when(d.last_seen)}</td><td class="${d.in_sync ? "ok" : "warn"}">${d.in_sync ? "yes" : "no"}</td><td>${active}</td><td>${policies}</td><td>${esc((r.tags || []).join(", "))}</td><td>${r.outbox_pending ?? 0}${r.outbox_dropped ? ` (${r.outbox_dropped} dropped)` : ""}</td><td class="error">${esc(r.last_error || "")}</td></tr>`;
    }).join(""));
    rows("rollouts", rollouts.slice(-10).reverse().map((r) => {
      const last = (r.history || []).slice(-1)[0];
      const gates = (r.request.gates || []).map((g) => `${esc(g.metric)} ≤ ${esc(g.max)}${g.relative ? "× the replaced version's" : ""} over ${esc(g.window_s)} s (${esc(g.min_requests)} requests)`).join("<br>") || "none";
      return `<tr data-rollout="${r.id}"><td>${r.id}</td><td>${esc(r.request.model)} ${esc(r.request.version)}</td><td>${esc(r.state.state)}${r.state.reason ? ": " + esc(r.state.reason) : ""}</td><td>${(r.state.stage ?? 0) + 1} of ${r.request.stages.length}</td><td>${gates}</td><td>${esc((r.reached || []).join(", "))}</td><td>${esc(last ? last.text : "")}</td></tr>`;
    }).join(""));
    rows("deployments", deployments.slice(-10).reverse().map((d) => `<tr><td>${d.id}</td><td>${esc(d.model)} ${esc(d.version)}</td><td>${esc((d.devices || []).join(", "))}</td><td>${when(d.created_at || d.time)}</td></tr>`).join(""));
    rows("rules", rules.flatMap((r) => (r.versions.length ? r.versions : [{ version: "–" }]).map((v) => `<tr><td>${esc(r.name)}</td><td>${esc(r.spec.metric)} ${esc(r.spec.op)} ${esc(r.spec.threshold)} over ${esc(r.spec.window_s)} s</td><td>${esc(v.version)}</td><td>${num(v.value)}</td><td class="${v.breaching ? "bad" : "ok"}">${v.breaching ? "crossing (" + v.streak + ")" : "ok"}</td><td>${when(v.fired_at)}</td></tr>`)).join(""));
    rows("firings", firings.slice().reverse().map((f) => `<tr><td>${f.id}</td><td>${when(f.time)}</td><td>${esc(f.rule)}</td><td>${esc(f.model)} ${esc(f.version)}</td><td>${num(f.value)} ${esc(f.op)} ${esc(f.threshold)}</td><td class="${f.delivered ? "ok" : "bad"}">${f.delivered ? "yes" : "no"}</td><td>${f.attempts.map((a) => esc(a.action + " " + a.outcome)).join("<br>")}</td></tr>`).join(""));
    // Every model version some device runs, or that a rollout is bringing.
    const versions = new Map();
    for (const d of devices) {
      for (const [m, v] of Object.entries((d.reported || {}).active || {})) {
        const k = m + "@" + v;
        versions.set(k, { model: m, version: v, devices: (versions.get(k)?.devices || 0) + 1 });
      }
    }
    // Per model, its versions by role; a candidate or a shadow gets its own panel below too.
    const models = [...new Set([...versions.values()].map((v) => v.model))].sort();
    const comparisons = await Promise.all(models.map((m) => api(`/compare?model=${encodeURIComponent(m)}&window=${SERIES_SPAN_S}`)));
    const compared = comparisons.filter((c) => c.versions.length > 1 || c.versions.some((v) => v.role !== "primary"));
    document.getElementById("comparisons").innerHTML = compared.length ? compared.map(comparison).join("") : '<p class="muted">No A/B split, canary or shadow in the last 15 min.</p>';
    for (const c of comparisons) {
      for (const v of c.versions) {
        const k = c.model + "@" + v.version;
        if (!versions.has(k)) versions.set(k, { model: c.model, version: v.version, devices: v.devices });
      }
    }
    const panels = await Promise.all([...versions.values()].sort((a, b) => (a.model + a.version).localeCompare(b.model + b.version)).map((v) => modelPanel(v.model, v.version, v.devices)));
    rows("versions", panels.map((p) => p.summary).join(""));
    document.getElementById("models").innerHTML = panels.map((p) => p.html).join("");
    document.getElementById("error").hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (e) {
    const el = document.getElementById("error");
    el.textContent = "Cannot read the fleet: " + e.message;
    el.hidden = false;
  }
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value;
  sessionStorage.setItem("outpost-token", token);
  document.getElementById("login").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
