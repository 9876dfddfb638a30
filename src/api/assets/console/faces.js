// Faces: the second API's records. List them a page at a time (GET /api/face), register a
// display name with a photo (POST /api/face/register), search by photo with the scores
// (POST /api/face/search), delete (DELETE /api/face/{id}).
import { $, api, confirmButton, el, guarded, imageUrl, say } from "./api.js";

const PAGE = 20;
let offset = 0;
let urls = []; // blob: URLs of the listed thumbnails

export function init() {
  $("faces-register").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded("faces-status", register);
  });
  $("faces-search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded("faces-status", search);
  });
  $("faces-prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    guarded("faces-status", refresh);
  });
  $("faces-next").addEventListener("click", () => {
    offset += PAGE;
    guarded("faces-status", refresh);
  });
}

export function show() {
  guarded("faces-status", refresh);
}

async function refresh() {
  const page = await api(`/api/face?limit=${PAGE}&offset=${offset}`);
  for (const u of urls) URL.revokeObjectURL(u);
  urls = [];
  const body = $("faces-table").querySelector("tbody");
  body.replaceChildren();
  for (const f of page.items) {
    const img = el("img", { alt: f.display_name });
    const row = el("tr", { "data-id": f.id },
      el("td", {}, img),
      el("td", { class: "name", text: f.display_name }),
      el("td", { class: "muted", text: f.id }),
      el("td", { class: "muted", text: f.inserted_at }),
      el("td", {}, confirmButton("Delete", () => guarded("faces-status", () => remove(f.id, f.display_name)))));
    body.append(row);
    imageUrl(f.image_url).then((u) => {
      urls.push(u);
      img.src = u;
    }, () => {});
  }
  $("faces-table").dataset.total = String(page.total);
  $("faces-page").textContent = page.total ? `${offset + 1}-${offset + page.items.length} of ${page.total}` : "no records";
  $("faces-prev").disabled = offset === 0;
  $("faces-next").disabled = offset + page.items.length >= page.total;
}

async function register() {
  const file = $("faces-image").files[0];
  if (!file) throw new Error("choose a photo");
  const form = new FormData();
  form.append("displayName", $("faces-name").value.trim());
  form.append("image", file, file.name);
  const f = await api("/api/face/register", { method: "POST", body: form });
  say("faces-status", `Registered ${f.display_name} (${f.id}).`, "ok");
  $("faces-name").value = "";
  $("faces-image").value = "";
  await refresh();
}

async function search() {
  const file = $("faces-query").files[0];
  if (!file) throw new Error("choose a photo to search with");
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("topK", $("faces-topk").value || "5");
  form.append("threshold", $("faces-threshold").value || "0.35");
  const hits = await api("/api/face/search", { method: "POST", body: form });
  const list = $("faces-hits");
  list.replaceChildren();
  for (const h of hits) {
    list.append(el("li", { "data-id": h.id, "data-score": String(h.score) },
      el("span", { class: "name", text: h.display_name }),
      el("span", { class: "score", text: `score ${h.score.toFixed(3)}` })));
  }
  list.dataset.count = String(hits.length);
  say("faces-status", hits.length ? `${hits.length} match(es), closest first.` : "No match within the distance.", hits.length ? "ok" : "");
}

async function remove(id, name) {
  await api(`/api/face/${encodeURIComponent(id)}`, { method: "DELETE" });
  say("faces-status", `Deleted ${name}.`, "ok");
  await refresh();
}
