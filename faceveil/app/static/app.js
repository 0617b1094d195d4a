// faceveil app: the page's behaviour. Plain JavaScript, no library, nothing fetched from elsewhere.
"use strict";

const state = { session: null, info: null, photos: { protect: [], enroll: [], apply: [] }, check: {},
                results: {}, busy: false, faces: {} };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function message(text, kind = "error") {
  const item = el("li", { class: kind, text });
  $("messages").append(item);
  while ($("messages").children.length > 8) $("messages").firstChild.remove();
  setTimeout(() => item.remove(), kind === "error" ? 60000 : 15000);
}

async function call(path, options = {}) {
  const response = await fetch(`/api/session/${state.session}${path}`, options);
  let body = {};
  try { body = await response.json(); } catch (e) { body = {}; }
  if (!response.ok) throw new Error(body.error || `the app answered ${response.status}`);
  return body;
}

// ------------------------------------------------------------------------------------------------- tabs

function showTab(name) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
}

// ------------------------------------------------------------------------------------------------- strengths

function percent(x) { return `${Math.round(100 * x)} %`; }

function strengthWords(s) {
  const budget = `Changes the face by ${s.eps} of 255 brightness levels on average (more in hair and edges, less ` +
    `on smooth skin), in ${s.iters} rounds.`;
  const m = s.measured;
  if (!m) return [budget, "Not measured yet."];
  const shares = Object.values(m.not_ranked_first);
  const mean = shares.reduce((a, b) => a + b, 0) / shares.length;
  const look = m.face_ssim >= 0.95 ? "Hardly visible" :
    m.face_ssim >= 0.88 ? "A faint grain on the face, visible up close" : "A visible grain on the face";
  return [
    `${look}: the face keeps ${percent(m.face_ssim)} of its structure (SSIM ${m.face_ssim}, PSNR ${m.face_psnr_db} dB).`,
    `In our tests on ${m.people} people, a face search no longer put the right person first in ${percent(mean)} ` +
      `of cases on average over ${shares.length} models ` +
      `(${percent(Math.min(...shares))} to ${percent(Math.max(...shares))}).`,
    budget,
  ];
}

function showStrengths(strengths) {
  const box = $("strength-choices");
  box.replaceChildren();
  for (const s of strengths) {
    const input = el("input", { type: "radio", name: "strength", value: s.name, id: `strength-${s.name}` });
    if (s.default) input.checked = true;
    const words = strengthWords(s).map((line) => el("p", { text: line }));
    const title = el("strong", { text: s.name[0].toUpperCase() + s.name.slice(1) + (s.default ? " (default)" : "") });
    box.append(el("div", { class: "strength" }, input, el("label", { for: input.id }, title, ...words)));
  }
}

// ------------------------------------------------------------------------------------------------- uploads

async function addFiles(role, files, slot) {
  const limits = state.info.limits;
  files = Array.from(files);
  if (files.length === 0) return;
  if (files.length > limits.max_files_per_drop) {
    message(`${files.length} files at once is too many: add at most ${limits.max_files_per_drop} at a time. ` +
            "Nothing was added.");
    return;
  }
  for (const file of files) {
    const video = role === "apply" && /\.(mp4|m4v|mov|mkv|webm|avi)$/i.test(file.name);
    if (video && file.size > limits.max_video_bytes) {
      message(`${file.name} is too large: more than ${Math.round(limits.max_video_bytes / 1048576)} MB`);
      continue;
    }
    if (!video && file.size > limits.max_upload_bytes) {
      message(`${file.name} is too large: more than ${Math.round(limits.max_upload_bytes / 1048576)} MB`);
      continue;
    }
    try {
      const photo = await call(`/photos?role=${role}`, {
        method: "POST", body: file, headers: { "X-File-Name": encodeURIComponent(file.name) } });
      photo.role = role;
      if (role === "check") placeCheckPhoto(photo, slot);
      else addThumbnail(role, photo);
    } catch (error) {
      message(error.message);
    }
  }
  refreshButtons();
}

function addThumbnail(role, photo) {
  state.photos[role].push(photo);
  const img = photo.kind === "video"
    ? el("div", { class: "video-thumb", text: `video · ${Math.round(photo.seconds || 0)} s` })
    : el("img", { src: `/api/session/${state.session}/photos/${photo.id}/original`, alt: photo.name });
  const remove = el("button", { class: "remove", text: "remove", title: `remove ${photo.name}` });
  remove.addEventListener("click", async () => {
    await call(`/photos/${photo.id}/remove`, { method: "POST" });
    state.photos[role] = state.photos[role].filter((p) => p.id !== photo.id);
    delete state.faces[photo.id];
    item.remove();
    const picker = $(`picker-${photo.id}`);
    if (picker) picker.remove();
    refreshButtons();
  });
  const item = el("li", { id: `photo-${photo.id}` }, img, el("div", { text: photo.name }), remove);
  $(`photos-${role}`).append(item);
  if (role === "protect") showFacePicker(photo);
}

// ------------------------------------------------------------------------------------------------- face picker

async function showFacePicker(photo) {
  // The photo's faces outlined before protecting, each with a tick box: only ticked faces are protected.
  const frame = el("div", { class: "frame" },
                   el("img", { src: `/api/session/${state.session}/photos/${photo.id}/original`, alt: photo.name }));
  const hint = el("p", { class: "hint", text: "Finding the faces…" });
  const ticks = el("div", { class: "ticks" });
  const picker = el("div", { class: "picker", id: `picker-${photo.id}` }, el("h3", { text: photo.name }), hint,
                    frame, ticks);
  $("pickers-protect").append(picker);
  state.pending = (state.pending || 0) + 1;
  refreshButtons();
  let faces = [];
  try {
    faces = (await call(`/photos/${photo.id}/faces`)).faces;
  } catch (error) {
    hint.textContent = `Could not look for faces: ${error.message}`;
    return;
  } finally {
    state.pending -= 1;
    refreshButtons();
  }
  const confirmed = faces.filter((f) => f.confirmed);
  state.faces[photo.id] = confirmed;
  hint.textContent = confirmed.length
    ? `${confirmed.length} face${confirmed.length > 1 ? "s" : ""} found. Untick the faces that are not yours: ` +
      "only ticked faces are protected."
    : "No face found in this photo: there is nothing to protect.";
  for (const face of faces) {
    const [x0, y0, x1, y1] = face.box;
    const box = el("div", { class: face.confirmed ? "outline" : "outline skipped" },
                   el("span", { text: face.confirmed ? `Face ${face.index + 1}` : "not a face: skipped" }));
    Object.assign(box.style, { left: `${100 * x0 / photo.width}%`, top: `${100 * y0 / photo.height}%`,
                               width: `${100 * (x1 - x0) / photo.width}%`, height: `${100 * (y1 - y0) / photo.height}%` });
    frame.append(box);
    if (!face.confirmed) {
      box.title = `Not a face (confirmation score ${face.face_score.toFixed(2)}): never protected`;
      continue;
    }
    const id = `face-${photo.id}-${face.index}`;
    const input = el("input", { type: "checkbox", id, class: "face-pick", "data-photo": String(photo.id),
                                "data-index": String(face.index) });
    input.checked = true;
    const sync = () => { box.classList.toggle("off", !input.checked); };
    input.addEventListener("change", sync);
    box.addEventListener("click", () => { input.checked = !input.checked; sync(); });
    box.title = `Face ${face.index + 1}: click to tick or untick`;
    ticks.append(el("label", { for: id }, input, ` Face ${face.index + 1} is mine: protect it`));
  }
}

function chosenFaces() {
  // {photo id: the ticked face numbers} for every photo whose faces were found (the others keep every face).
  const chosen = {};
  for (const photo of state.photos.protect) {
    if (!state.faces[photo.id]) continue;
    chosen[photo.id] = Array.from(document.querySelectorAll(`input.face-pick[data-photo="${photo.id}"]`))
      .filter((input) => input.checked).map((input) => Number(input.dataset.index));
  }
  return chosen;
}

function placeCheckPhoto(photo, slot) {
  state.check[slot] = photo;
  const img = $(`preview-check-${slot}`);
  img.src = `/api/session/${state.session}/photos/${photo.id}/original`;
  img.alt = photo.name;
  img.hidden = false;
}

function wireDrop(zone) {
  const role = zone.dataset.role, slot = zone.dataset.slot;
  const input = $(zone.dataset.files);
  input.addEventListener("change", () => { addFiles(role, input.files, slot); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    addFiles(role, e.dataTransfer.files, slot);
  });
}

function refreshButtons() {
  $("protect-button").disabled = state.busy || state.photos.protect.length === 0 || (state.pending || 0) > 0;
  $("enroll-button").disabled = state.busy || state.photos.enroll.length === 0;
  $("apply-button").disabled = state.busy || state.photos.apply.length === 0 || !state.mask;
  $("check-button").disabled = state.busy || !(state.check.a && state.check.b);
}

// ------------------------------------------------------------------------------------------------- jobs

async function start(path, body, job) {
  try {
    state.busy = true;
    refreshButtons();
    if (job === "protect" || job === "apply") {
      $(`progress-${job}`).hidden = false;
      setProgress(job, 0, "waiting for the computer…");
      $(`zip-${job}`).hidden = true;
      $(`results-${job}`).replaceChildren();
    }
    await call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (error) {
    state.busy = false;
    refreshButtons();
    message(error.message);
  }
}

function protect() {
  const chosen = document.querySelector('input[name="strength"]:checked');
  const iters = $("iters-protect").value;
  start("/protect", { photos: state.photos.protect.map((p) => p.id), strength: chosen ? chosen.value : "mid",
                      seed: Number($("seed-protect").value || 0), iters: iters ? Number(iters) : null,
                      faces: chosenFaces() }, "protect");
}

function setProgress(job, value, status) {
  const box = $(`progress-${job}`);
  box.querySelector("progress").value = value;
  box.querySelector(".percent").textContent = `${value} %`;
  if (status !== undefined) {
    box.querySelector(".status").textContent = status;
    box.dataset.since = String(Date.now());
    box.dataset.status = status;
  }
}

function tick() {
  // While a photo is being worked on, the seconds it has taken so far (a photo takes a while: the bar moves per photo).
  for (const job of ["protect", "apply"]) {
    const box = $(`progress-${job}`);
    if (!state.busy || box.hidden || !box.dataset.since) continue;
    const seconds = Math.round((Date.now() - Number(box.dataset.since)) / 1000);
    box.querySelector(".status").textContent = `${box.dataset.status} · ${seconds} s`;
  }
}

function photoById(id) {
  for (const list of Object.values(state.photos)) for (const p of list) if (p.id === id) return p;
  return null;
}

function onEvent(event) {
  const job = event.job;
  if (event.type === "photo-start") {
    const photo = photoById(event.id);
    setProgress(job, event.percent, `working on ${photo ? photo.name : "a photo"} (${event.index + 1} of ${event.total})`);
  } else if (event.type === "frame") {
    const photo = photoById(event.id);
    const of = event.frames ? ` of ${event.frames}` : "";
    setProgress(job, event.percent, `${photo ? photo.name : "the video"}: frame ${event.frame}${of}`);
  } else if (event.type === "photo-done") {
    setProgress(job, event.percent, `${event.index} of ${event.total} done`);
    showResult(job, event);
  } else if (event.type === "enroll-start") {
    $("enroll-status").textContent = `Learning the mask from ${event.photos} photos… (this takes a while)`;
  } else if (event.type === "enroll-done") {
    state.mask = event.name;
    $("enroll-status").textContent = `The mask of ${event.name} is ready: now add photos in step 2.`;
    const link = $("mask-download");
    link.href = `/api/session/${state.session}/mask`;
    link.hidden = false;
  } else if (event.type === "verify-done") {
    showVerdicts($("check-verdicts"), event.faces);
    $("check-status").textContent = event.message || "";
  } else if (event.type === "job-done" || event.type === "job-failed") {
    state.busy = false;
    refreshButtons();
    if (event.type === "job-failed") {
      message(event.message);
      if (job === "enroll") $("enroll-status").textContent = "";
    }
    if (job === "verify" && event.type === "job-done") $("check-status").textContent ||= "done";
  }
}

// ------------------------------------------------------------------------------------------------- results

function showVerdicts(list, faces) {
  list.replaceChildren();
  if (!faces.length) list.append(el("li", { class: "unchecked", text: "No face found." }));
  for (const face of faces) {
    const kind = !face.checked ? "unchecked" : face.protected ? "protected" : "recognised";
    list.append(el("li", { class: kind, text: face.words }));
  }
}

function showResult(job, event) {
  const photo = photoById(event.id);
  const item = $(`photo-${event.id}`);
  if (item) item.classList.add(event.status === "ok" ? "done" : "failed");
  const card = el("div", { class: "result", id: `result-${event.id}` }, el("h3", { text: photo ? photo.name : "" }));
  const base = `/api/session/${state.session}/photos/${event.id}`;
  if (event.status !== "ok") {
    card.append(el("p", { class: "muted", text: event.message }));
    $(`results-${job}`).append(card);
    return;
  }
  const stamp = Date.now();
  if (event.kind === "video") {
    const video = el("video", { src: `${base}/result?t=${stamp}`, controls: "", preload: "metadata" });
    card.append(video, el("p", { text: event.message }),
                el("a", { class: "button", href: `${base}/result?download=1`, download: "", text: "Download this video" }));
    $(`results-${job}`).append(card);
    showZip(job);
    return;
  }
  const before = el("img", { class: "before", src: `${base}/original`, alt: "before" });
  const after = el("img", { class: "after", src: `${base}/result?t=${stamp}`, alt: "after" });
  const compare = el("div", { class: "compare" }, before, after,
                     el("span", { class: "label", text: "before" }), el("span", { class: "label", text: "after" }));
  compare.lastChild.style.right = "6px";
  compare.children[2].style.left = "6px";
  const slider = el("input", { type: "range", min: "0", max: "100", value: "50", class: "slider",
                               "aria-label": "before / after" });
  const cut = () => { after.style.clipPath = `inset(0 0 0 ${slider.value}%)`; };
  slider.addEventListener("input", cut);
  cut();
  const width = photo ? photo.width : 1, height = photo ? photo.height : 1;
  for (const face of event.faces) {
    if (!face.box) continue;
    const [x0, y0, x1, y1] = face.box;
    const box = el("div", { class: "face", title: `face ${face.face}` });
    Object.assign(box.style, { left: `${100 * x0 / width}%`, top: `${100 * y0 / height}%`,
                               width: `${100 * (x1 - x0) / width}%`, height: `${100 * (y1 - y0) / height}%` });
    compare.append(box);
  }
  const verdicts = el("ul", { class: "verdicts" });
  showVerdicts(verdicts, event.faces);
  const download = el("a", { class: "button", href: `${base}/result?download=1`, download: "",
                             text: "Download this photo" });
  card.append(compare, slider, zooms(base, stamp, event.faces), verdicts, download);
  $(`results-${job}`).append(card);
  showZip(job);
}

function showZip(job) {
  const zip = $(`zip-${job}`);
  zip.href = `/api/session/${state.session}/results.zip?role=${job}`;
  zip.hidden = false;
}

function zooms(base, stamp, faces) {
  // Each face at 1:1 pixels (one photo pixel = one screen pixel), before and after side by side.
  const box = el("div", { class: "zooms" });
  const size = 224;
  for (const face of faces.slice(0, 4)) {
    if (!face.box) continue;
    const cx = (face.box[0] + face.box[2]) / 2, cy = (face.box[1] + face.box[3]) / 2;
    for (const [label, url] of [["before", `${base}/original`], ["after", `${base}/result?t=${stamp}`]]) {
      const pane = el("div", { class: "pane" });
      Object.assign(pane.style, { backgroundImage: `url("${url}")`,
                                  backgroundPosition: `${Math.round(size / 2 - cx)}px ${Math.round(size / 2 - cy)}px` });
      box.append(el("figure", { class: "zoom" }, pane,
                    el("figcaption", { text: `face ${face.face}, ${label}, 1:1 pixels` })));
    }
  }
  return box;
}

// ------------------------------------------------------------------------------------------------- start

async function main() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => showTab(tab.id.replace("tab-", "")));
  }
  for (const zone of document.querySelectorAll(".drop")) wireDrop(zone);
  $("folder-protect").addEventListener("change", (e) => {
    const photos = Array.from(e.target.files).filter((f) => /\.(jpe?g|png|webp)$/i.test(f.name));
    addFiles("protect", photos);
    e.target.value = "";
  });
  $("protect-button").addEventListener("click", protect);
  $("enroll-button").addEventListener("click", () => start("/enroll", {
    photos: state.photos.enroll.map((p) => p.id), name: $("person-name").value }, "enroll"));
  $("apply-button").addEventListener("click", () => start("/apply", {
    photos: state.photos.apply.map((p) => p.id) }, "apply"));
  $("check-button").addEventListener("click", () => {
    $("check-verdicts").replaceChildren();
    $("check-status").textContent = "checking… (every model looks at both photos)";
    start("/verify", { photos: [state.check.a.id, state.check.b.id] }, "verify");
  });
  try {
    state.info = await (await fetch("/api/info")).json();
    const opened = await fetch("/api/session", { method: "POST" });
    const body = await opened.json();
    if (!opened.ok) throw new Error(body.error);
    state.session = body.session;
  } catch (error) {
    message(`The app could not start a session: ${error.message}`);
    return;
  }
  showStrengths(state.info.strengths);
  $("footer").textContent = `faceveil ${state.info.version} · results checked by ${state.info.judges.length} ` +
    `face-recognition models: ${state.info.judges.join(", ")}`;
  const events = new EventSource(`/api/session/${state.session}/events`);
  events.onmessage = (e) => onEvent(JSON.parse(e.data));
  window.addEventListener("pagehide", () => navigator.sendBeacon(`/api/session/${state.session}/end`));
  setInterval(tick, 1000);
  document.body.dataset.ready = "true";
  refreshButtons();
}

main();
