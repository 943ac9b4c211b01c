"use strict";
// The page: settings in the form fields, actions as calls to the server's /api, runs polled every second.
const $ = (id) => document.getElementById(id);
const MODEL_FIELDS = ["dit", "vae", "text_encoder", "tokenizer"];
const DATASET_FIELDS = ["image_directory", "control_directory", "resolution", "batch_size", "num_repeats",
  "enable_bucket"];
const TRAINING_FIELDS = ["output_name", "network_dim", "learning_rate", "max_train_steps", "save_every_n_steps",
  "sample_every_n_steps", "validation_split", "memory_options", "extra_options", "sample_prompts"];
const NUMBERS = new Set(["resolution", "batch_size", "num_repeats", "network_dim", "learning_rate", "max_train_steps",
  "save_every_n_steps", "sample_every_n_steps", "validation_split"]);
let selectedRun = null;
let lastLora = null;

function say(text, isError = false) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "ok";
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) {
    const text = data.error || data.detail || response.statusText;
    say(typeof text === "string" ? text : JSON.stringify(text), true);
    throw new Error(text);
  }
  return data;
}

const imageUrl = (path) => "/api/image?path=" + encodeURIComponent(path);
const value = (id) => $(id).type === "checkbox" ? $(id).checked : NUMBERS.has(id) ? Number($(id).value) : $(id).value;

function collectSettings() {
  const pick = (fields) => Object.fromEntries(fields.map((f) => [f, value(f)]));
  return {model_version: $("model_version").value, models: pick(MODEL_FIELDS), dataset: pick(DATASET_FIELDS),
          training: pick(TRAINING_FIELDS)};
}

function showSettings(s) {
  $("model_version").value = s.model_version;
  for (const f of MODEL_FIELDS) $(f).value = s.models[f];
  for (const f of DATASET_FIELDS) {
    if ($(f).type === "checkbox") $(f).checked = s.dataset[f]; else $(f).value = s.dataset[f];
  }
  for (const f of TRAINING_FIELDS) $(f).value = s.training[f];
  $("gpu_gib").value = s.gpu_gib;
}

const saveSettings = () => api("/api/settings", collectSettings());

async function checkModels() {
  await saveSettings();
  const r = await api("/api/models");
  const list = $("model-results");
  list.innerHTML = "";
  if (r.error) { list.innerHTML = `<li class="error">${escapeHtml(r.error)}</li>`; return; }
  for (const [kind, f] of Object.entries(r.files)) {
    const li = document.createElement("li");
    if (f.ok) {
      li.innerHTML = `<span class="ok">✓</span> ${kind}: ${escapeHtml(f.what)} <span class="muted">${escapeHtml(f.path)}</span>`;
      if (f.detected) li.innerHTML += ` — fits: ${f.detected.join(", ")}`;
    } else {
      li.innerHTML = `<span class="error">✗ ${kind}: ${escapeHtml(f.error)}</span>`;
      if (f.download) {
        const b = document.createElement("button");
        b.className = "small"; b.textContent = "download " + f.download;
        b.onclick = () => api("/api/models/download", {repo: f.download}).then(refreshRuns);
        li.append(" ", b);
      }
    }
    list.append(li);
  }
  say(r.ok ? `models fit ${r.version}${r.nano ? " (nano models)" : ""}` : "a model file does not fit", !r.ok);
}

function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
}

function showDataset(d) {
  $("toml").textContent = d.toml;
  const buckets = Object.entries(d.buckets).map(([b, n]) => `${b}: ${n}`).join(", ");
  $("dataset-summary").innerHTML = `<p><b>${d.items.length}</b> images; per bucket: ${escapeHtml(buckets)}
    <span class="muted">(${escapeHtml(d.toml_path)})</span></p>`;
  const grid = $("items");
  grid.innerHTML = "";
  for (const it of d.items.slice(0, 200)) {
    const div = document.createElement("div");
    div.className = "item";
    const extras = [...it.controls, ...it.layers].map((p) => `<img src="${imageUrl(p)}" alt="">`).join("");
    div.innerHTML = `<img src="${imageUrl(it.image)}" alt="${escapeHtml(it.key)}">
      ${extras ? `<div class="extra" title="controls / layers">${extras}</div>` : ""}
      <textarea rows="3" ${it.caption_file ? "" : "disabled"}>${escapeHtml(it.caption)}</textarea>`;
    const area = div.querySelector("textarea");
    area.onchange = () => api("/api/dataset/caption", {image: it.image, caption: area.value})
      .then(() => say("caption saved"));
    grid.append(div);
  }
}

async function useFolder() {
  await api("/api/settings", {...collectSettings(), dataset: {...collectSettings().dataset, config: ""}});
  showDataset(await api("/api/dataset"));
}

async function nanoDataset() {
  await saveSettings();
  say("writing the nano example dataset ...");
  showDataset(await api("/api/dataset/nano", {items: 48}));
  say("nano example dataset ready");
}

async function plan() {
  await saveSettings();
  say("estimating memory ...");
  const p = await api("/api/memory", {gpu_gib: Number($("gpu_gib").value)});
  const e = p.estimate;
  $("plan-result").innerHTML = `
    <p class="${p.fits ? "ok" : "error"}">${p.fits ? "fits" : "does not fit even with every option"}:
      <code>${escapeHtml(p.options)}</code>, batch size ${p.batch_size}
      (${p.layers} blocks, ${p.resolution}px)</p>
    <dl class="estimate"><dt>weights on the GPU</dt><dd>${e.weights_gib} GiB</dd>
      <dt>LoRA + optimizer</dt><dd>${(e.lora_gib + e.optimizer_gib).toFixed(2)} GiB</dd>
      <dt>estimated peak (+ CUDA overhead)</dt><dd>${e.total_gib} GiB</dd></dl>
    <button id="use-plan" class="small">Use these options</button>`;
  $("use-plan").onclick = async () => {
    $("memory_options").value = p.options;
    $("batch_size").value = p.batch_size;
    await saveSettings();
    say("memory options set");
  };
  say("memory plan ready");
}

async function train(resume) {
  await saveSettings();
  const r = await api("/api/train", {resume, cache: true});
  selectedRun = r.runs[r.runs.length - 1].id;
  say(`queued ${r.runs.length} run(s)`);
  refreshRuns();
}

async function refreshRuns() {
  const {runs} = await api("/api/runs");
  const body = $("runs").querySelector("tbody");
  body.innerHTML = "";
  for (const r of runs.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    if (r.id === selectedRun) tr.className = "selected";
    const [done, total] = r.progress || [0, 0];
    const bar = total ? `<progress max="${total}" value="${done}"></progress> ${done}/${total}` : "";
    const stoppable = ["queued", "running"].includes(r.state);
    tr.innerHTML = `<td>${r.id}</td><td>${escapeHtml(r.title)}</td><td class="state-${r.state}">${r.state}</td>
      <td>${bar}</td><td>${stoppable ? `<button class="small secondary" data-stop="${r.id}">stop</button>` : ""}</td>`;
    tr.onclick = (ev) => {
      if (ev.target.dataset.stop) { api(`/api/runs/${r.id}/stop`, {}).then(refreshRuns); return; }
      selectedRun = r.id; refreshRuns();
    };
    body.append(tr);
  }
  if (selectedRun === null && runs.length) selectedRun = runs[runs.length - 1].id;
  if (selectedRun !== null) await showRun(selectedRun);
  showComparisons(runs);
}

async function showRun(id) {
  const r = await api(`/api/runs/${id}`);
  $("run-detail").hidden = false;
  $("run-title").textContent = `#${r.id} ${r.title}: ${r.state}` + (r.seconds ? ` (${r.seconds}s)` : "");
  $("run-command").textContent = r.command;
  $("run-error").textContent = r.error || "";
  $("run-log").textContent = (r.log || []).join("\n");
  const res = r.results || {};
  drawChart(res.loss || [], res.validation || []);
  $("samples").innerHTML = (res.samples || []).map((p) =>
    `<figure><img src="${imageUrl(p)}" alt="sample"><figcaption>${escapeHtml(p.split("/").pop().replace(".png", ""))}</figcaption></figure>`).join("");
  if (res.lora) { lastLora = res.lora; if (!$("gen_lora").value) $("gen_lora").value = res.lora; }
}

function drawChart(loss, validation) {
  const svg = $("loss-chart");
  const W = 600, H = 220, pad = 36;
  const all = [...loss, ...validation];
  if (!all.length) { svg.innerHTML = `<text x="20" y="110" fill="#687083">the loss curve appears with the first steps</text>`; return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => pad + (x - x0) / (x1 - x0) * (W - 2 * pad);
  const sy = (y) => H - pad + (y0 - y) / (y1 - y0) * (H - 2 * pad);
  const line = (pts, colour, cls) => pts.length ? `<polyline class="${cls}" fill="none" stroke="${colour}" stroke-width="1.5"
      points="${pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}"/>` : "";
  const avg = loss.map((p, i) => { const w = loss.slice(Math.max(0, i - 19), i + 1); return [p[0], w.reduce((a, q) => a + q[1], 0) / w.length]; });
  svg.innerHTML = `
    <line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#d9dde6"/>
    <line x1="${pad}" y1="${pad}" x2="${pad}" y2="${H - pad}" stroke="#d9dde6"/>
    <text x="${pad}" y="${H - 12}" font-size="11" fill="#687083">step ${x0}</text>
    <text x="${W - pad - 60}" y="${H - 12}" font-size="11" fill="#687083">step ${x1}</text>
    <text x="4" y="${pad}" font-size="11" fill="#687083">${y1.toFixed(3)}</text>
    <text x="4" y="${H - pad}" font-size="11" fill="#687083">${y0.toFixed(3)}</text>
    ${line(loss, "#c9c2ea", "loss")}${line(avg, "#5b3cc4", "loss-average")}${line(validation, "#e07b00", "validation")}
    <text x="${W - 230}" y="16" font-size="11" fill="#5b3cc4">training loss (average of 20)</text>
    <text x="${W - 70}" y="16" font-size="11" fill="#e07b00">validation</text>`;
}

function showComparisons(runs) {
  const groups = {};
  for (const r of runs) if (r.kind === "generate") (groups[r.info.group] ||= []).push(r);
  const latest = Object.keys(groups).map(Number).sort((a, b) => b - a)[0];
  if (latest === undefined) return;
  Promise.all(groups[latest].map((r) => api(`/api/runs/${r.id}`))).then((details) => {
    $("compare").innerHTML = details.map((d) => {
      const img = (d.results.images || [])[0];  // layered: the composite
      const label = d.info.side === "lora" ? "with the LoRA" : "base model";
      return `<figure>${img ? `<img src="${imageUrl(img)}" alt="${label}">` : `<p class="muted">${d.state}</p>`}
        <figcaption>${label}</figcaption></figure>`;
    }).join("");
  });
}

async function generate() {
  const body = {prompt: $("gen_prompt").value, seed: Number($("gen_seed").value),
                lora: $("gen_lora").value || null, multiplier: Number($("gen_multiplier").value),
                controls: $("gen_control").value.trim() ? [$("gen_control").value.trim()] : []};
  await api("/api/generate", body);
  say("generation queued (base and LoRA, same seed)");
  refreshRuns();
}

async function tool(name) {
  const lora = $("gen_lora").value || lastLora;
  const r = await api("/api/tool", {name, lora: lora || ""});
  selectedRun = r.id;
  say(`${name} queued`);
  refreshRuns();
}

function guard(fn) {
  return async (...args) => { try { await fn(...args); } catch (e) { if (!$("message").textContent) say(String(e), true); } };
}

async function start() {
  const s = await api("/api/state");
  $("project").textContent = "project: " + s.project;
  $("model_version").innerHTML = s.versions.map((v) =>
    `<option value="${v}">${v}${s.nano_versions.includes(v) ? " (nano model ships)" : ""}</option>`).join("");
  showSettings(s.settings);
  if (s.gpu && !s.settings.gpu_gib) $("gpu_gib").value = s.gpu;
  $("check-models").onclick = guard(checkModels);
  $("use-folder").onclick = guard(useFolder);
  $("nano-dataset").onclick = guard(nanoDataset);
  $("autocaption").onclick = guard(async () => { await api("/api/dataset/autocaption", {}); refreshRuns(); });
  $("plan").onclick = guard(plan);
  $("train").onclick = guard(() => train(false));
  $("resume").onclick = guard(() => train(true));
  $("generate").onclick = guard(generate);
  $("tool-convert").onclick = guard(() => tool("convert"));
  $("tool-ema").onclick = guard(() => tool("ema"));
  $("tool-merge").onclick = guard(() => tool("merge"));
  $("copy-command").onclick = () => navigator.clipboard?.writeText($("run-command").textContent);
  if (s.settings.dataset.config || s.settings.dataset.image_directory) api("/api/dataset").then(showDataset).catch(() => {});
  refreshRuns();
  setInterval(() => refreshRuns().catch(() => {}), 1000);
}

start();
