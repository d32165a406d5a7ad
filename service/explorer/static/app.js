// onetower explorer: plain JS over the explorer's JSON API (no framework, no network beyond this server).
"use strict";

const $ = (id) => document.getElementById(id);
let uploads = [];  // the new item's images as data URLs

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = err.code ? `${err.code}: ${err.details}` : String(err);
}

async function call(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const resp = await fetch(path, init);
  let data;
  try { data = await resp.json(); } catch (e) { data = {error: {code: `HTTP ${resp.status}`, details: resp.statusText}}; }
  if (!resp.ok || data.error) { const err = data.error || {code: `HTTP ${resp.status}`, details: ""}; showError(err); throw err; }
  showError(null);
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function card(item, opts = {}) {
  const thumb = el("div", {class: "thumb"});
  if (item.images && item.images.length) {
    thumb.append(el("img", {src: item.images[0], alt: item.title || item.item_id, decoding: "async"}));
    if (item.images.length > 1) thumb.append(el("span", {class: "more", text: `+${item.images.length - 1}`}));
  } else {
    thumb.append(el("span", {class: "none", text: "no image"}));
  }
  const meta = el("span", {class: "meta"});
  if (item.item_id) meta.append(el("code", {text: item.item_id}));
  if (item.score !== undefined) meta.append(el("span", {class: "score", text: item.score.toFixed(3)}));
  meta.append(el("span", {class: "mods", text: (item.modalities || []).join("+") || "?"}));
  if (item.live) meta.append(el("span", {class: "live", text: "live"}));
  const fig = el("figure", {class: "card" + (opts.extra ? " " + opts.extra : ""), "data-id": item.item_id || ""},
    thumb, el("figcaption", {}, el("b", {text: item.title || "(no title)"}), meta));
  const attrs = Object.entries(item.attributes || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  fig.title = [item.title, item.description, attrs].filter(Boolean).join("\n");
  if (item.item_id && !opts.inert) fig.addEventListener("click", () => searchFor(item.item_id));
  return fig;
}

// Render cards into a grid; data-state="ready" once every image has loaded or failed (tests and timing read it).
function render(grid, items, opts = {}) {
  grid.dataset.state = "loading";
  grid.replaceChildren(...items.map((it) => card(it, {extra: opts.shared && opts.shared.has(it.item_id) ? "shared" : ""})));
  const imgs = [...grid.querySelectorAll("img")];
  const done = () => { grid.dataset.state = "ready"; grid.dataset.readyMs = String(Math.round(performance.now())); };
  Promise.all(imgs.map((img) => img.complete ? null : new Promise((r) => { img.onload = r; img.onerror = r; }))).then(done);
}

function setTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `tab-${name}`;
  if (name === "compare") loadVersions();
}

function params(form) {
  return Object.fromEntries([...new FormData(form)].filter(([, v]) => String(v).trim() !== ""));
}

async function searchFor(q) {
  setTab("neighbours");
  $("q").value = q;
  await runSearch();
}

async function runSearch() {
  const p = params($("search"));
  history.replaceState(null, "", "?" + new URLSearchParams({q: p.q}));
  const res = await call("/api/similar?" + new URLSearchParams(p));
  const q = res.by === "item_id" ? card(res.query, {extra: "query", inert: true})
    : el("p", {class: "status", text: `words "${res.query.title}" embedded as a text-only item`});
  $("query").replaceChildren(q);
  $("grid-title").textContent = `${res.neighbours.length} neighbours · model ${res.model_version} · index ${res.index_version}`;
  render($("grid"), res.neighbours);
}

function newItem() {
  return {item_id: $("new-id").value.trim(), title: $("new-title").value, description: $("new-desc").value,
    attributes: $("new-attrs").value, images: uploads, k: $("new-k").value};
}

async function embedNew(upsert) {
  for (const b of ["embed-btn", "upsert-btn"]) $(b).disabled = true;
  $("new-status").textContent = upsert ? "adding…" : "embedding…";
  try {
    const res = await call(upsert ? "/api/upsert" : "/api/embed", newItem());
    const mods = upsert ? res.item.modalities : res.modalities;
    $("new-status").textContent = upsert
      ? `added ${res.item.item_id} (model ${res.model_version}, vector from ${mods.join("+")}): now a neighbour of similar items`
      : `vector from ${mods.join("+")} (model ${res.model_version}); not stored`;
    render($("new-grid"), res.neighbours);
  } catch (e) {
    $("new-status").textContent = "refused";
  } finally {
    for (const b of ["embed-btn", "upsert-btn"]) $(b).disabled = false;
  }
}

function addFiles(files) {
  for (const f of files) {
    const reader = new FileReader();
    reader.onload = () => {
      uploads.push(reader.result);
      $("previews").append(el("img", {src: reader.result, alt: f.name}));
    };
    reader.readAsDataURL(f);
  }
}

async function recommend(ev) {
  ev.preventDefault();
  const res = await call("/api/recommend", {history: $("hist").value, k: $("user-k").value, filter: $("user-filter").value});
  render($("user-history"), res.history);
  render($("user-grid"), res.neighbours);
}

let versionsLoaded = null;
async function loadVersions() {
  if (versionsLoaded) return versionsLoaded;
  versionsLoaded = call("/api/versions").then((res) => {
    const label = (v) => `v${v.version}${v.aliases.length ? " @" + v.aliases.join(" @") : ""}${v.version === res.served_version ? " (served)" : ""}`;
    for (const [id, pick] of [["va", 0], ["vb", 1]]) {
      $(id).replaceChildren(...res.versions.map((v) => el("option", {value: v.version, text: label(v)})));
      const served = res.versions.findIndex((v) => v.version === res.served_version);
      const other = res.versions.findIndex((v) => v.version !== res.served_version);
      const idx = pick === 0 ? Math.max(served, 0) : Math.max(other, 0);
      if (res.versions.length) $(id).value = res.versions[idx].version;
    }
    window.versions = Object.fromEntries(res.versions.map((v) => [v.version, v]));
    return res;
  }).catch((e) => { versionsLoaded = null; throw e; });
  return versionsLoaded;
}

function metricsTable(table, v) {
  const rows = Object.entries((v && v.metrics) || {});
  table.replaceChildren(...rows.map(([k, val]) => el("tr", {}, el("td", {text: k}), el("td", {text: val}))));
  if (v && v.split) table.append(el("tr", {}, el("td", {text: "eval.split"}), el("td", {text: v.split.slice(0, 12)})));
  if (!rows.length) table.append(el("tr", {}, el("td", {text: "no evaluation metrics in the registry"})));
}

async function compare(ev) {
  ev.preventDefault();
  $("overlap").textContent = "answering from each version's own encoder and index…";
  const p = {a: $("va").value, b: $("vb").value, q: $("cq").value, k: $("ck").value};
  history.replaceState(null, "", "?" + new URLSearchParams({tab: "compare", ...p}));
  const res = await call("/api/compare?" + new URLSearchParams(p));
  const shared = new Set(res.shared);
  for (const side of ["a", "b"]) {
    const s = res[side];
    $(`head-${side}`).textContent = `${side.toUpperCase()}: version ${s.version}${s.served ? " (served)" : " (read-only, pinned)"}` +
      (s.error ? ` — ${s.error.code}: ${s.error.details}` : "");
    metricsTable($(`metrics-${side}`), (window.versions || {})[s.version]);
    render($(`grid-${side}`), s.neighbours, {shared});
  }
  $("overlap").textContent = `overlap@${res.k}: ${res.overlap.toFixed(2)} (${res.shared.length} shared, outlined)`;
}

async function start() {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => setTab(b.dataset.tab));
  $("search").addEventListener("submit", (ev) => { ev.preventDefault(); runSearch().catch(() => {}); });
  $("embed-btn").addEventListener("click", () => embedNew(false));
  $("upsert-btn").addEventListener("click", () => embedNew(true));
  $("user-form").addEventListener("submit", (ev) => recommend(ev).catch(() => {}));
  $("compare-form").addEventListener("submit", (ev) => compare(ev).catch(() => {}));
  const drop = $("drop");
  $("files").addEventListener("change", (ev) => addFiles(ev.target.files));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); addFiles(ev.dataTransfer.files); });
  $("new-id").value = "new-" + Date.now().toString(36);

  const url = new URLSearchParams(location.search);
  if (url.get("q") && url.get("tab") !== "compare") {  // a shared link: the grid first, the sample never
    $("q").value = url.get("q");
    runSearch().catch(() => {});
  }
  const info = await call("/api/info").catch(() => null);
  if (!info) { $("info").textContent = "the service did not answer"; return; }
  $("info").textContent = `${info.model_name} v${info.model_version}${info.model_alias ? " @" + info.model_alias : ""} · ` +
    `index ${info.index_version} (${info.index_kind}, ${info.item_count} items, dim ${info.dim})` +
    (info.catalog ? ` · catalog ${info.catalog_items} items` : " · no catalog");
  if (url.get("tab") === "compare") {
    setTab("compare");
    await loadVersions().catch(() => {});
    for (const k of ["a", "b"]) if (url.get(k)) $(`v${k}`).value = url.get(k);
    if (url.get("q")) { $("cq").value = url.get("q"); compare(new Event("submit")).catch(() => {}); }
  } else if (!url.get("q")) {
    render($("grid"), info.sample);
  }
}

document.addEventListener("DOMContentLoaded", () => start());
