// People: the users of the original contract. List them with their sample counts (GET /users),
// create (POST /users), delete (DELETE /users/{name}), and enrol photos, uploaded or taken with
// the camera, as /calculate_average_embedding takes them (multipart: `username`, `files`...).
import { $, api, confirmButton, el, guarded, openCamera, say, snapshot, videoReady } from "./api.js";

let camera = null;
let snaps = []; // {blob, url}

export function init() {
  $("people-create").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded("people-status", create);
  });
  $("people-enrol").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded("people-status", () => enrol([...$("enrol-files").files].map((f) => [f, f.name])));
  });
  $("snap-open").addEventListener("click", () => guarded("people-status", openSnap));
  $("snap-take").addEventListener("click", () => guarded("people-status", takeSnap));
  $("snap-enrol").addEventListener("click", () =>
    guarded("people-status", () => enrol(snaps.map((s, i) => [s.blob, `snapshot-${i + 1}.jpg`]))));
  $("snap-close").addEventListener("click", closeSnap);
}

export function show() {
  guarded("people-status", refresh);
}

export function hide() {
  closeSnap();
}

async function refresh() {
  const list = await api("/users");
  const body = $("people-table").querySelector("tbody");
  body.replaceChildren();
  const select = $("enrol-user");
  const chosen = select.value;
  select.replaceChildren();
  for (const u of list.users) {
    const row = el("tr", { "data-user": u.username },
      el("td", { text: u.username }),
      el("td", { class: "num samples", "data-samples": String(u.samples), text: String(u.samples) }),
      el("td", { class: "muted", text: u.model_id || "-" }),
      el("td", { class: "muted", text: u.updated_at || "" }),
      el("td", {}, confirmButton("Delete", () => guarded("people-status", () => remove(u.username)))));
    body.append(row);
    select.append(el("option", { value: u.username, text: u.username }));
  }
  if (list.users.some((u) => u.username === chosen)) select.value = chosen;
  $("people-empty").hidden = list.users.length > 0;
  $("people-table").dataset.count = String(list.count);
}

async function create() {
  const name = $("people-new-name").value.trim();
  await api("/users", { method: "POST", json: { username: name } });
  $("people-new-name").value = "";
  await refresh();
  $("enrol-user").value = name;
  say("people-status", `Created ${name}.`, "ok");
}

async function remove(name) {
  await api(`/users/${encodeURIComponent(name)}`, { method: "DELETE" });
  await refresh();
  say("people-status", `Deleted ${name}.`, "ok");
}

/** Enrols `files` ([blob, file name] pairs) for the chosen user. */
async function enrol(files) {
  const user = $("enrol-user").value;
  if (!user) throw new Error("create a user first");
  if (files.length === 0) throw new Error("choose photos (or take snapshots) first");
  const form = new FormData();
  form.append("username", user);
  for (const [blob, name] of files) form.append("files", blob, name);
  say("people-status", `Enrolling ${files.length} image(s) for ${user}...`);
  const r = await api("/calculate_average_embedding", { method: "POST", body: form });
  // LEGACY_STATUS=original answers its two errors with HTTP 200 and `status: "error"`.
  if (r && r.status === "error") throw new Error(r.message);
  const skipped = (r.skipped || []).map((s) => `${s.file}: ${s.code}`);
  await refresh();
  say("people-status", `Enrolled ${r.images} image(s) for ${user}` + (skipped.length ? `; skipped ${skipped.join(", ")}` : "."), "ok");
  if (files.length && snaps.length && files[0][0] === snaps[0].blob) clearSnaps();
}

async function openSnap() {
  if (camera) return;
  camera = await openCamera();
  const v = $("snap-video");
  v.srcObject = camera;
  v.hidden = false;
  await v.play();
  await videoReady(v);
  $("snap-take").disabled = false;
  $("snap-close").disabled = false;
}

async function takeSnap() {
  const blob = await snapshot($("snap-video"), document.createElement("canvas"));
  const url = URL.createObjectURL(blob);
  snaps.push({ blob, url });
  $("snap-list").append(el("img", { src: url, alt: `snapshot ${snaps.length}` }));
  $("snap-enrol").disabled = false;
}

function clearSnaps() {
  for (const s of snaps) URL.revokeObjectURL(s.url);
  snaps = [];
  $("snap-list").replaceChildren();
  $("snap-enrol").disabled = true;
}

function closeSnap() {
  if (camera) for (const t of camera.getTracks()) t.stop();
  camera = null;
  const v = $("snap-video");
  v.srcObject = null;
  v.hidden = true;
  $("snap-take").disabled = true;
  $("snap-close").disabled = true;
}
