// Activity: the latest recognitions (GET /recognitions, newest first, paged with `before`),
// each face with its name, similarity and crop. Crops are fetched with the credential and
// shown from blob: URLs (an <img> cannot send headers).
import { $, api, el, guarded, imageUrl, say } from "./api.js";

const PAGE = 20;
let nextBefore = null;
let urls = [];

export function init() {
  $("activity-refresh").addEventListener("click", () => guarded("activity-status", () => load(null)));
  $("activity-older").addEventListener("click", () => guarded("activity-status", () => load(nextBefore)));
}

export function show() {
  guarded("activity-status", () => load(null));
}

async function load(before) {
  const page = await api(`/recognitions?limit=${PAGE}` + (before !== null ? `&before=${before}` : ""));
  const list = $("activity-list");
  if (before === null) {
    for (const u of urls) URL.revokeObjectURL(u);
    urls = [];
    list.replaceChildren();
  }
  for (const item of page.items) list.append(entry(item));
  nextBefore = page.next_before;
  $("activity-older").disabled = nextBefore === null || nextBefore === undefined;
  $("activity-empty").hidden = list.children.length > 0;
  list.dataset.count = String(list.children.length);
  say("activity-status", "");
}

function entry(item) {
  const fields = Object.entries(item.fields || {})
    .filter(([, v]) => typeof v !== "object" || v === null)
    .map(([k, v]) => `${k}: ${v}`)
    .join(", ");
  const faces = el("div", { class: "faces" });
  for (const f of item.faces) {
    const name = typeof f.name === "string" ? f.name : "?";
    const sim = typeof f.similarity === "number" ? f.similarity.toFixed(3) : "";
    const figure = el("figure", { "data-name": name });
    if (f.crop_url) {
      const img = el("img", { alt: `crop of ${name}`, "data-crop": f.crop_url });
      figure.append(img);
      imageUrl(f.crop_url).then((u) => {
        urls.push(u);
        img.src = u;
      }, (e) => {
        img.alt = `crop not available: ${e.message}`;
      });
    }
    figure.append(el("figcaption", { text: sim ? `${name} (${sim})` : name }));
    faces.append(figure);
  }
  return el("li", { "data-id": String(item.id), "data-source": item.source },
    el("div", {}, el("strong", { text: `#${item.id}` }), ` ${item.source}`, el("span", { class: "muted", text: fields ? ` (${fields})` : "" })),
    faces);
}
