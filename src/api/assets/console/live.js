// Live: the browser's camera through GET /api/stream. One frame is in flight at a time: the
// newest picture is sent only when the previous answer came back, and no faster than the
// chosen rate, so the browser never builds a queue. Each answer's boxes and names are drawn on
// a canvas over the video; #live-names holds the last answer's names (data-names, joined by
// "|") and its frame id (data-frame).
import { $, credential, guarded, openCamera, say, videoReady } from "./api.js";

let camera = null;
let ws = null;
let run = null; // the running stream's state
const grab = document.createElement("canvas");

export function init() {
  $("live-start").addEventListener("click", () => guarded("live-status", start));
  $("live-stop").addEventListener("click", () => stop());
}

export function show() {}

export function hide() {
  stop();
}

/** A subprotocol carrying the credential, when it is a valid protocol token (else null). */
function credentialProtocol(c) {
  const token = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
  if (!c || !token.test(c.secret)) return null;
  return (c.kind === "bearer" ? "facerec.bearer." : "facerec.key.") + c.secret;
}

async function start() {
  if (run) return;
  $("live-start").disabled = true;
  try {
    camera = await openCamera();
    const video = $("live-video");
    video.srcObject = camera;
    await video.play();
    await videoReady(video);
  } catch (e) {
    stop();
    throw e;
  }
  const c = credential();
  const viaProtocol = credentialProtocol(c);
  const protocols = viaProtocol ? ["facerec.v1", viaProtocol] : ["facerec.v1"];
  const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/api/stream`;
  const state = { sent: 0, answered: 0, dropped: 0, inFlight: false, lastSent: 0, ready: false, timer: null, last: null };
  run = state;
  ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  ws.addEventListener("open", () => {
    // The first message: the stream's settings, and the credential when it could not travel as
    // a subprotocol (the server reads both from the first message only).
    const first = { log: $("live-log").checked };
    if (c && !viaProtocol) first[c.kind === "bearer" ? "token" : "api_key"] = c.secret;
    ws.send(JSON.stringify(first));
    say("live-status", "Connected; waiting for the server...");
  });
  ws.addEventListener("message", (ev) => onMessage(state, ev.data));
  ws.addEventListener("close", (ev) => {
    if (run === state) {
      say("live-status", `Stream closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ""}).`, ev.code === 1000 ? "" : "error");
      stop(true);
    }
  });
  $("live-stop").disabled = false;
  $("live-log").disabled = true;
}

function onMessage(state, data) {
  if (typeof data !== "string") return;
  let m;
  try {
    m = JSON.parse(data);
  } catch {
    return;
  }
  if (m.type === "ready") {
    state.ready = true;
    say("live-status", `Streaming (server: up to ${m.max_fps} frames/s, ${Math.round(m.max_frame_bytes / 1024)} KiB a frame).`, "ok");
    pump(state);
  } else if (m.type === "frame") {
    state.answered += 1;
    state.dropped = m.dropped;
    state.last = m;
    draw(m);
    stats(state);
    state.inFlight = false;
    pump(state);
  } else if (m.type === "error") {
    say("live-status", `${m.message} (${m.code})`, "error");
    if (m.frame_id !== undefined) {
      state.inFlight = false;
      pump(state);
    }
  }
}

/** Sends the newest picture when nothing is in flight and the rate allows. */
function pump(state) {
  if (run !== state || !state.ready || state.inFlight || !ws || ws.readyState !== WebSocket.OPEN) return;
  const fps = Math.min(30, Math.max(1, Number($("live-fps").value) || 8));
  const wait = state.lastSent + 1000 / fps - performance.now();
  if (wait > 0) {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => pump(state), wait);
    return;
  }
  const video = $("live-video");
  if (video.readyState < 2 || !video.videoWidth) {
    state.timer = setTimeout(() => pump(state), 100);
    return;
  }
  state.inFlight = true;
  state.lastSent = performance.now();
  grab.width = video.videoWidth;
  grab.height = video.videoHeight;
  grab.getContext("2d").drawImage(video, 0, 0);
  grab.toBlob((blob) => {
    if (run !== state || !blob || ws.readyState !== WebSocket.OPEN) {
      state.inFlight = false;
      return;
    }
    ws.send(blob);
    state.sent += 1;
    stats(state);
  }, "image/jpeg", 0.8);
}

function stats(state) {
  const t = state.last && state.last.timings;
  $("live-stats").textContent = `frames sent ${state.sent}, answered ${state.answered}, dropped by the server ${state.dropped}` +
    (t ? `; last frame: detect ${t.detect_ms} ms, identify ${t.identify_ms} ms, total ${t.total_ms} ms` : "");
  $("live-stats").dataset.sent = String(state.sent);
  $("live-stats").dataset.answered = String(state.answered);
  $("live-stats").dataset.dropped = String(state.dropped);
}

/** Boxes and names of one answer over the video. */
function draw(answer) {
  const canvas = $("live-overlay");
  const video = $("live-video");
  canvas.width = video.clientWidth || answer.width;
  canvas.height = video.clientHeight || answer.height;
  const sx = canvas.width / answer.width;
  const sy = canvas.height / answer.height;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.lineWidth = 3;
  g.font = "600 16px system-ui, 'DejaVu Sans', sans-serif";
  g.textBaseline = "bottom";
  const names = [];
  for (const f of answer.faces) {
    const [x1, y1, x2, y2] = f.bbox;
    const known = !/^Unknown( \d+)?$/.test(f.name);
    const colour = known ? "#2ecc71" : "#f39c12";
    g.strokeStyle = colour;
    g.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
    const label = typeof f.similarity === "number" ? `${f.name} ${f.similarity.toFixed(2)}` : f.name;
    const w = g.measureText(label).width + 8;
    g.fillStyle = colour;
    g.fillRect(x1 * sx, y1 * sy - 22, w, 22);
    g.fillStyle = "#000";
    g.fillText(label, x1 * sx + 4, y1 * sy - 3);
    names.push(f.name);
  }
  const out = $("live-names");
  out.textContent = names.length ? names.join(", ") : "(no face)";
  out.dataset.names = names.join("|");
  out.dataset.frame = String(answer.frame_id);
}

/** Ends the stream and releases the camera. */
export function stop(closedByServer = false) {
  if (run) clearTimeout(run.timer);
  run = null;
  if (ws && !closedByServer && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  ws = null;
  if (camera) for (const t of camera.getTracks()) t.stop();
  camera = null;
  $("live-video").srcObject = null;
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
  $("live-log").disabled = false;
}
