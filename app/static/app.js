// The app's page: three tabs over the JSON API of app/server.py. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;
let PREVIEW_SET = false;
let trainTimer = null, sampleTimer = null, compareTimer = null;

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  let res;
  try { res = await fetch(path, opts); } catch (e) {
    throw new Error("The app is not reachable (is `python -m app` still running?)");
  }
  const data = await res.json().catch(() => ({error: `HTTP ${res.status}`}));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function show(el, text) { el.textContent = text; el.classList.toggle("hidden", !text); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve({name: file.name, data: r.result});
    r.onerror = () => reject(new Error(`${file.name}: cannot be read`));
    r.readAsDataURL(file);
  });
}
function fmtTime(s) {
  if (s == null || !isFinite(s)) return "";
  return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

// ------------------------------------------------------------------ tabs
function openPage(name) {
  for (const b of document.querySelectorAll("nav button"))
    b.classList.toggle("active", b.dataset.page === name);
  for (const p of document.querySelectorAll(".page"))
    p.classList.toggle("active", p.id === `page-${name}`);
  if (name === "sample") loadDeltas();
  if (name === "compare") loadRuns();
}
for (const b of document.querySelectorAll("nav button")) b.onclick = () => openPage(b.dataset.page);
for (const a of document.querySelectorAll("[data-goto]"))
  a.onclick = (e) => { e.preventDefault(); openPage(a.dataset.goto); };

// ------------------------------------------------------------------ train
function method() { return INFO.methods.find((m) => m.id === $("method-select").value); }
function source() { return document.querySelector("input[name=source]:checked").value; }

function updateMethod(resetNumbers) {
  const m = method();
  if (!m) return;
  $("method-about").textContent = m.about;
  if (resetNumbers) {
    if (m.steps) $("steps").value = m.steps;
    if (m.lr) $("lr").value = m.lr;
    $("preview-every").value = Math.max(1, Math.round(($("steps").value || 250) / 5));
  }
  $("lr-help").textContent = m.scale_lr && m.batch_size
    ? `Base learning rate, multiplied by the batch size (${m.batch_size}) as in the paper: ` +
      `effective ${(parseFloat($("lr").value) * m.batch_size).toExponential(1)}.`
    : "Learning rate used as it is.";
  const word = $("class-word").value.trim() || "<class word>";
  $("prompt-example").textContent = m.prompt.replace("{token}", m.token).replace("{class_word}", word);
}

function updateConcept() {
  const c = INFO.concepts.find((x) => x.name === $("concept-select").value);
  $("concept-desc").textContent = `The model learns from these 6 pictures of ${c.description}.`;
  $("concept-preview").src = `/api/concept/${c.name}.png`;
  if (source() === "concept") $("class-word").value = c.class_word;
  updateMethod(false);
}

function updateSource() {
  const s = source();
  $("concept-box").classList.toggle("hidden", s !== "concept");
  $("images-box").classList.toggle("hidden", s !== "images");
  if (s === "concept") updateConcept();
}

$("image-files").onchange = () => {
  const box = $("image-thumbs");
  box.replaceChildren();
  const files = [...$("image-files").files];
  for (const f of files.slice(0, 20)) {
    const fig = el("figure");
    if (f.type.startsWith("image/")) fig.append(el("img", {src: URL.createObjectURL(f), alt: f.name}));
    fig.append(el("figcaption", {text: f.name.slice(0, 14)}));
    box.append(fig);
  }
  const lim = INFO.limits;
  $("images-help").textContent = `${files.length} file(s) chosen; ${lim.min_images} to ${lim.max_images} pictures of the same thing.` +
    (INFO.base.is_toy ? " The toy base works at 32x32 px: they will be shrunk." : "");
};

async function startTraining() {
  show($("train-error"), "");
  const body = {
    method: $("method-select").value, class_word: $("class-word").value,
    steps: $("steps").value, lr: $("lr").value, preview: $("preview-every").value,
  };
  try {
    if (source() === "concept") body.concept = $("concept-select").value;
    else body.images = await Promise.all([...$("image-files").files].map(readFile));
    $("start-train").disabled = true;
    renderTrain(await api("/api/train", body));
    pollTrain();
  } catch (e) {
    show($("train-error"), e.message);
    $("start-train").disabled = false;
  }
}

async function cancelTraining() {
  try { renderTrain(await api("/api/train/cancel", {})); } catch (e) { show($("train-error"), e.message); }
}

function drawLoss(curve) {
  const svg = $("loss-chart");
  const W = Math.max(300, svg.clientWidth || 400);  // draw at the element's own width
  svg.setAttribute("viewBox", `0 0 ${W} 120`);
  const pts = curve.filter((p) => p[1] != null);
  if (pts.length < 2) { svg.innerHTML = `<text x="10" y="60" fill="#889">loss curve appears here</text>`; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = 0, y1 = Math.max(...ys) || 1;
  const X = (x) => 40 + (W - 55) * (x - x0) / ((x1 - x0) || 1), Y = (y) => 105 - 95 * (y - y0) / (y1 - y0);
  const line = pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
  // a running mean over ~10% of the points makes the trend readable
  const k = Math.max(1, Math.round(pts.length / 10));
  const smooth = pts.map((p, i) => {
    const w = ys.slice(Math.max(0, i - k + 1), i + 1);
    return `${X(p[0]).toFixed(1)},${Y(w.reduce((a, b) => a + b, 0) / w.length).toFixed(1)}`;
  }).join(" ");
  svg.innerHTML = `<polyline points="${line}" fill="none" stroke="#9db3e6" stroke-width="1"/>` +
    `<polyline points="${smooth}" fill="none" stroke="#2f5fd0" stroke-width="2"/>` +
    `<text x="2" y="14" font-size="10" fill="#556">${y1.toPrecision(2)}</text>` +
    `<text x="2" y="108" font-size="10" fill="#556">0</text>` +
    `<text x="40" y="118" font-size="10" fill="#556">step ${x0}</text>` +
    `<text x="${W - 60}" y="118" font-size="10" fill="#556">step ${x1}</text>` +
    `<text x="${W / 2 - 110}" y="14" font-size="10" fill="#556">training loss (thin: per step, thick: average)</text>`;
}

function renderTrain(s) {
  const running = s.status === "running" || s.status === "stopping";
  $("start-train").disabled = running;
  $("cancel-train").disabled = !(running && s.kind === "train");
  if (s.status === "none") return;
  if (s.kind !== "train") {
    if (running) $("train-status").textContent = `An evaluation (Compare page) is running; start training when it is done.`;
    return;
  }
  const info = s.info || {};
  const what = `${info.label} on "${info.concept || "your images"}" (class word "${info.class_word}")`;
  const states = {
    running: `Running (${s.phase})`, stopping: "Stopping (finishing the current step, saving)",
    finished: "Finished", cancelled: "Cancelled (the deltas saved so far are kept, below)",
    failed: "Failed (see the message on the left and the log)"};
  $("train-status").textContent = `${states[s.status] || s.status}: ${what}`;
  if (info.sample_prompts && info.sample_prompts.length) {
    $("samples-help").replaceChildren("Each grid shows, left to right and top to bottom: ",
      ...info.sample_prompts.flatMap((p, i) => [i ? ", " : "", el("code", {text: p})]), ".");
  }
  $("train-progress").max = s.max_steps || 1;
  $("train-progress").value = s.step || 0;
  const left = s.seconds_per_step && running ? (s.max_steps - s.step) * s.seconds_per_step : null;
  $("train-numbers").textContent = `step ${s.step} / ${s.max_steps}` +
    (s.loss != null ? ` · loss ${s.loss.toFixed(4)}` : "") +
    (s.seconds_per_step ? ` · ${s.seconds_per_step.toFixed(2)} s/step` : "") +
    (left ? ` · about ${fmtTime(left)} left` : "") + ` · ${fmtTime(s.elapsed)} elapsed`;
  drawLoss(s.curve || []);
  const none = () => el("span", {class: "help", text: "none yet"});
  const samples = $("train-samples");
  samples.replaceChildren(none());
  if (s.samples && s.samples.length) {
    samples.replaceChildren(...s.samples.map((x) => el("figure", {},
      el("img", {src: x.url, alt: `samples at ${x.name}`}),
      el("figcaption", {text: x.name.startsWith("step_") ? `step ${parseInt(x.name.slice(5), 10)}` : x.name}))));
  }
  const deltas = $("train-deltas");
  deltas.replaceChildren(none());
  if (s.checkpoints && s.checkpoints.length) {
    deltas.replaceChildren(...s.checkpoints.map((c) => el("div", {},
      el("a", {href: c.url, download: c.name, text: c.name}), " ")));
    if (!running && s.status !== "failed") {
      const b = el("button", {type: "button", id: "use-delta", text: "Use this delta on the Sample page →"});
      const final = s.checkpoints.find((c) => c.name === "last.safetensors") || s.checkpoints[s.checkpoints.length - 1];
      b.onclick = () => { SELECT_AFTER_LOAD = final.path;
        $("prompt").value = info.prompt || $("prompt").value; openPage("sample"); };
      deltas.append(b);
    }
  }
  $("train-log").textContent = (s.log || []).join("\n");
  show($("train-error"), s.status === "failed" ? `Training failed: ${s.error || "see the log"}` : $("train-error").textContent);
}

function pollTrain() {
  clearTimeout(trainTimer);
  trainTimer = setTimeout(async () => {
    try {
      const s = await api("/api/train/status");
      renderTrain(s);
      if (s.status === "running" || s.status === "stopping") pollTrain();
    } catch (e) { show($("train-error"), e.message); pollTrain(); }
  }, 1000);
}

// ------------------------------------------------------------------ sample
let SELECT_AFTER_LOAD = null;
let DELTAS = [];

async function loadDeltas() {
  try { DELTAS = await api("/api/deltas"); } catch (e) { show($("sample-error"), e.message); return; }
  const ticked = new Set(selectedDeltas());
  if (SELECT_AFTER_LOAD) { ticked.clear(); ticked.add(SELECT_AFTER_LOAD); SELECT_AFTER_LOAD = null; }
  const list = $("delta-list");
  const shown = DELTAS.filter((d) => $("show-steps").checked || !d.intermediate || ticked.has(d.path));
  if (!DELTAS.length) {
    list.replaceChildren(el("p", {class: "help", text: "No deltas yet: train one on the Train page, or upload one."}));
  } else {
    list.replaceChildren(...shown.map((d) => {
      const box = el("input", {type: "checkbox", "data-path": d.path});
      box.checked = ticked.has(d.path);
      box.onchange = updatePlan;
      return el("label", {}, box, el("span", {text: d.label}),
        el("span", {class: "meta", text: `${d.method} · tokens ${d.tokens.join(" ")}` +
          (d.step != null ? ` · step ${d.step}` : "") + (d.class_word ? ` · class "${d.class_word}"` : "")}));
    }));
  }
  updatePlan();
}

function selectedDeltas() {
  return [...document.querySelectorAll("#delta-list input:checked")].map((b) => b.dataset.path);
}

async function updatePlan() {
  const paths = selectedDeltas();
  const box = $("token-plan");
  show($("sample-error"), "");
  $("vico-box").classList.add("hidden");
  if (!paths.length) { box.classList.add("hidden"); return; }
  try {
    const plan = await api("/api/plan", {deltas: paths});
    box.replaceChildren(el("strong", {text: plan.merge ? "Merging these deltas. " : ""}),
      el("span", {text: "Tokens to use in your prompt:"}));
    for (const d of plan.deltas) {
      const line = el("div", {}, el("code", {class: "tok", text: d.tokens_in_prompt.join(" ")}),
        el("span", {text: ` from ${d.label}` + (d.renamed ? ` (renamed from ${d.tokens.join(" ")})` : "")}));
      if (plan.merge) {
        const inp = el("input", {type: "text", class: "class-word", "data-path": d.path,
          placeholder: "class word", "aria-label": `class word of ${d.label}`});
        inp.value = d.class_word || "";
        line.append(" class word: ", inp);
      }
      box.append(line);
    }
    const d0 = plan.deltas[0];
    const example = plan.vico ? `a photo of a ${d0.tokens_in_prompt[0]}`
      : d0.class_word ? `a photo of a ${d0.tokens_in_prompt.join(" ")} ${d0.class_word}` : null;
    if (example) box.append(el("div", {class: "help"}, "Example: ", el("code", {text: example})));
    box.classList.remove("hidden");
    $("vico-box").classList.toggle("hidden", !plan.vico);
  } catch (e) { box.classList.add("hidden"); show($("sample-error"), e.message); }
}

async function generate() {
  show($("sample-error"), ""); show($("sample-warnings"), "");
  const body = {
    deltas: selectedDeltas(),
    class_words: [...document.querySelectorAll("#token-plan input.class-word")].map((i) => i.value),
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    n: $("n-images").value, seed: $("seed").value, steps: $("sample-steps").value,
    guidance: $("guidance").value, attend_excite: $("ae-enabled").checked, words: $("ae-words").value,
  };
  try {
    const ref = $("reference-image").files[0];
    if (ref && !$("vico-box").classList.contains("hidden")) body.reference_image = await readFile(ref);
    $("generate").disabled = true;
    clearResult();
    renderSample(await api("/api/sample", body));
    pollSample();
  } catch (e) { show($("sample-error"), e.message); $("generate").disabled = false; }
}

function clearResult() {
  $("result-help").textContent = "Generating…";
  for (const id of ["result-grid", "maps-box", "downloads"]) $(id).classList.add("hidden");
  $("result-images").replaceChildren();
}

function renderSample(s) {
  const busy = s.status === "loading" || s.status === "sampling";
  $("generate").disabled = busy;
  $("sample-progress").classList.toggle("hidden", !busy);
  $("sample-progress").max = s.steps || 1;
  $("sample-progress").value = s.step || 0;
  $("sample-status").textContent = busy
    ? (s.status === "loading" ? "Loading the model and deltas…" : `Sampling: step ${s.step} / ${s.steps}`)
    : (s.status === "done" ? `Done in ${s.result.seconds} s.` : "");
  show($("sample-warnings"), (s.warnings || []).join("\n"));
  if (s.status === "error") {
    show($("sample-error"), s.message);
    $("result-help").textContent = "Nothing generated: see the message on the left.";
  }
  if (s.status !== "done" || !s.result) return;
  const r = s.result;
  const seeds = r.settings.n > 1 ? `seeds ${r.settings.seed}–${r.settings.seed + r.settings.n - 1}` : `seed ${r.settings.seed}`;
  $("result-help").textContent = `"${r.settings.prompt}" · ${seeds}` +
    ` · ${r.settings.steps} steps · guidance ${r.settings.guidance_scale}` +
    (r.settings.attend_excite ? " · Attend-and-Excite on" : "");
  $("result-grid").onload = () => {  // small images are shown enlarged, at most 8x
    const g = $("result-grid");
    g.style.width = `${Math.min(420, g.naturalWidth * 8)}px`;
  };
  $("result-grid").src = r.grid;
  $("result-grid").classList.remove("hidden");
  $("result-images").replaceChildren(...r.images.map((u, i) => el("figure", {},
    el("a", {href: u, download: `seed_${r.settings.seed + i}.png`},
      el("img", {src: u, alt: `image ${i + 1}`, class: "result-image"})),
    el("figcaption", {text: `seed ${r.settings.seed + i}`}))));
  $("maps-box").classList.toggle("hidden", !r.maps.length);
  $("maps").replaceChildren(...r.maps.map((u, i) => el("figure", {},
    el("a", {href: u, target: "_blank"}, el("img", {src: u, alt: `attention maps of image ${i + 1}`})),
    el("figcaption", {text: `seed ${r.settings.seed + i} (click to enlarge)`}))));
  $("downloads").classList.remove("hidden");
  $("image-downloads").replaceChildren(el("span", {text: "Images: "}),
    el("a", {class: "dl", href: r.grid, download: "grid.png", text: "grid.png"}),
    ...r.images.map((u, i) => el("a", {class: "dl", href: u, download: `seed_${r.settings.seed + i}.png`,
      text: `seed ${r.settings.seed + i}`})));
  const dd = $("delta-downloads");
  if (!r.delta_path) { dd.replaceChildren(el("span", {class: "help", text: "No delta used."})); return; }
  const q = (f) => `/api/export?delta=${encodeURIComponent(r.delta_path)}&format=${f}`;
  const formats = r.delta_is_vico ? [["safetensors", "ViCo checkpoint (.safetensors)"]] : [
    ["safetensors", "this project (.safetensors)"], ["compvis", "Custom Diffusion reference (.ckpt)"],
    ["adobe", "reference diffusers scripts (delta.bin)"], ["diffusers", "diffusers (.zip)"]];
  dd.replaceChildren(el("span", {text: "Delta: "}),
    ...formats.map(([f, t]) => el("a", {class: "dl", href: q(f), text: t, "data-format": f})));
}

function pollSample() {
  clearTimeout(sampleTimer);
  sampleTimer = setTimeout(async () => {
    try {
      const s = await api("/api/sample/status");
      renderSample(s);
      if (s.status === "loading" || s.status === "sampling") pollSample();
    } catch (e) { show($("sample-error"), e.message); }
  }, 500);
}

$("delta-upload").onchange = async () => {
  const f = $("delta-upload").files[0];
  if (!f) return;
  show($("sample-error"), "");
  try {
    const d = await api("/api/deltas/upload", await readFile(f));
    SELECT_AFTER_LOAD = d.path;
    await loadDeltas();
  } catch (e) { show($("sample-error"), e.message); }
  $("delta-upload").value = "";
};
$("ae-enabled").onchange = () => {
  $("ae-words").disabled = !$("ae-enabled").checked;
  if ($("ae-enabled").checked && !$("ae-words").value) {
    const toks = [...document.querySelectorAll("#token-plan code.tok")].map((c) => c.textContent.split(" ")[0]);
    $("ae-words").value = toks.join(", ");
  }
};

// ------------------------------------------------------------------ compare
async function loadRuns() {
  let runs;
  try { runs = await api("/api/runs"); } catch (e) { show($("compare-error"), e.message); return; }
  const list = $("run-list");
  if (!runs.length) { list.replaceChildren(el("p", {class: "help", text: "No trained runs yet."})); return; }
  list.replaceChildren(...runs.map((r) => {
    const box = el("input", {type: "checkbox", "data-path": r.path});
    const line = el("label", {}, box, el("span", {text: r.rel}),
      el("span", {class: "meta", text: `${r.method}` + (r.step != null ? ` · step ${r.step}` : "") +
        (r.toy_concept ? ` · toy concept ${r.toy_concept}` : "")}));
    for (const rep of r.reports) {
      const a = el("a", {href: "#", text: `report (${rep.name})`});
      a.onclick = (e) => { e.preventDefault(); showReport(rep.url); };
      line.append(" ", a);
    }
    return line;
  }));
}

function showReport(url) {
  $("compare-frame").src = url;
  $("report-link").href = url;
  $("report-link").classList.remove("hidden");
}

async function evaluateRuns() {
  show($("compare-error"), "");
  const runs = [...document.querySelectorAll("#run-list input:checked")].map((b) => b.dataset.path);
  try {
    renderCompare(await api("/api/compare", {runs, n_samples: $("eval-n").value, steps: $("eval-steps").value}));
    pollCompare();
  } catch (e) { show($("compare-error"), e.message); }
}

function renderCompare(s) {
  if (s.kind !== "evaluate") return;
  const running = s.status === "running";
  $("evaluate").disabled = running;
  const states = {running: "Evaluating (sampling the prompts, then scoring)…", finished: "Finished.",
    failed: "Failed.", cancelled: "Cancelled."};
  $("compare-status").textContent = `${states[s.status] || s.status} ${s.info.runs.join(", ")} · ${fmtTime(s.elapsed)}`;
  $("compare-log").textContent = (s.log || []).join("\n");
  if (s.status === "failed") show($("compare-error"), `Evaluation failed: ${s.error || "see the log"}`);
  if (s.status === "finished") {
    const url = s.comparison || (s.reports || [])[0];
    if (url) showReport(url);
    loadRuns();
  }
}

function pollCompare() {
  clearTimeout(compareTimer);
  compareTimer = setTimeout(async () => {
    try {
      const s = await api("/api/compare/status");
      renderCompare(s);
      if (s.status === "running") pollCompare();
    } catch (e) { show($("compare-error"), e.message); }
  }, 1000);
}

// ------------------------------------------------------------------ start
async function init() {
  try { INFO = await api("/api/info"); } catch (e) { $("base-banner").textContent = e.message; return; }
  const banner = $("base-banner");
  banner.replaceChildren(el("strong", {text: INFO.base.is_toy ? "Toy base. " : "Stable Diffusion. "}),
    INFO.base.note);
  banner.classList.toggle("sd", !INFO.base.is_toy);
  if (INFO.base.is_toy) {
    $("sample-steps").value = 50; $("guidance").value = 5;
  } else {
    $("prompt").value = "a photo of a dog on the beach"; $("guidance").value = 7.5;
  }
  $("method-select").replaceChildren(...INFO.methods.map((m) => el("option", {value: m.id, text: m.label})));
  $("concept-select").replaceChildren(...INFO.concepts.map((c) =>
    el("option", {value: c.name, text: `${c.name.replace("_", " ")} — ${c.description}`})));
  if (!INFO.base.is_toy) {
    document.querySelector("input[value=images]").checked = true;
    document.querySelector("input[value=concept]").disabled = true;
  }
  for (const r of document.querySelectorAll("input[name=source]")) r.onchange = updateSource;
  $("concept-select").onchange = updateConcept;
  $("method-select").onchange = () => updateMethod(true);
  $("class-word").oninput = () => updateMethod(false);
  $("lr").oninput = () => updateMethod(false);
  // "Samples every" follows the steps (a fifth of them) until the user sets it.
  $("steps").oninput = () => {
    if (!PREVIEW_SET) $("preview-every").value = Math.max(1, Math.round($("steps").value / 5));
  };
  $("preview-every").oninput = () => { PREVIEW_SET = true; };
  $("start-train").onclick = startTraining;
  $("cancel-train").onclick = cancelTraining;
  $("generate").onclick = generate;
  $("refresh-deltas").onclick = loadDeltas;
  $("show-steps").onchange = loadDeltas;
  $("evaluate").onclick = evaluateRuns;
  $("refresh-runs").onclick = loadRuns;
  updateMethod(true);
  updateSource();
  drawLoss([]);
  const s = await api("/api/train/status");
  renderTrain(s);
  if (s.status === "running" || s.status === "stopping") pollTrain();
  if (s.kind === "evaluate") { renderCompare(s); if (s.status === "running") pollCompare(); }
}
init();
