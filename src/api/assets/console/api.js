// What every tab shares: the credential (kept in sessionStorage only), `api` (fetch with the
// credential, errors as exceptions carrying the server's `code`), images fetched with the
// credential into blob: URLs (an <img> cannot send headers), and small DOM helpers.

const STORE_KEY = "facerec.console.credential";

/** The credential in use: {kind: "key" | "bearer", secret} or null. */
export function credential() {
  try {
    const c = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    return c && typeof c.secret === "string" && c.secret ? c : null;
  } catch {
    return null;
  }
}

export function setCredential(kind, secret) {
  sessionStorage.setItem(STORE_KEY, JSON.stringify({ kind, secret }));
}

export function forgetCredential() {
  sessionStorage.removeItem(STORE_KEY);
}

/** The headers that carry the credential (names as src/api/auth.rs reads them). */
export function authHeaders() {
  const c = credential();
  if (!c) return {};
  return c.kind === "bearer" ? { Authorization: `Bearer ${c.secret}` } : { "X-API-Key": c.secret };
}

/** An error answer of the server. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(code ? `${message} (${code})` : message);
    this.status = status;
    this.code = code;
  }
}

// Called with the error when an answer is 401 (main.js shows the login form).
let onUnauthorized = () => {};
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

/** fetch(path) with the credential; the JSON answer, or throws ApiError. */
export async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const resp = await fetch(path, { method: options.method || "GET", headers, body, credentials: "same-origin" });
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, data && data.code, (data && data.message) || `${resp.status} ${resp.statusText}`);
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  return data;
}

/** An image fetched with the credential, as a blob: URL (revoke it with URL.revokeObjectURL). */
export async function imageUrl(path) {
  const resp = await fetch(path, { headers: authHeaders(), credentials: "same-origin" });
  if (!resp.ok) {
    if (resp.status === 401) onUnauthorized(new ApiError(401, "unauthorized", "credentials required"));
    throw new ApiError(resp.status, null, `${path}: ${resp.status}`);
  }
  return URL.createObjectURL(await resp.blob());
}

/** document.getElementById, failing loudly when the page and the script disagree. */
export function $(id) {
  const e = document.getElementById(id);
  if (!e) throw new Error(`no element #${id}`);
  return e;
}

/** A new element with attributes, text and children. */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

/** Shows a message in a status line (`kind`: "ok", "error" or ""). */
export function say(id, message, kind = "") {
  const s = $(id);
  s.textContent = message;
  s.className = `status ${kind}`;
}

/** Runs `f`, showing its error in the status line `id`. */
export async function guarded(id, f) {
  try {
    return await f();
  } catch (e) {
    say(id, e.message || String(e), "error");
    return undefined;
  }
}

/** A button that asks once more before acting ("Delete" -> "Really delete?"). */
export function confirmButton(label, action) {
  const b = el("button", { type: "button", class: "danger", text: label });
  let armed = false;
  b.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      b.textContent = "Really delete?";
      setTimeout(() => {
        armed = false;
        b.textContent = label;
      }, 4000);
      return;
    }
    b.disabled = true;
    await action();
  });
  return b;
}

/** A camera stream (getUserMedia); a clear message when the browser gives none. */
export async function openCamera(width = 640, height = 480) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera here: a camera needs a secure page (HTTPS, or the address localhost/127.0.0.1)");
  }
  return navigator.mediaDevices.getUserMedia({ video: { width: { ideal: width }, height: { ideal: height } }, audio: false });
}

/** The current picture of a playing <video> as a JPEG blob. */
export function snapshot(video, canvas, quality = 0.85) {
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve, reject) =>
    canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("the browser could not encode the picture"))), "image/jpeg", quality));
}

/** Waits until a <video> has a picture (bounded). */
export function videoReady(video, limitMs = 20000) {
  return new Promise((resolve, reject) => {
    if (video.readyState >= 2 && video.videoWidth > 0) return resolve();
    const t = setTimeout(() => reject(new Error("the camera gave no picture")), limitMs);
    video.addEventListener("loadeddata", () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });
}
