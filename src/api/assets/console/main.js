// The console's start: tabs (the URL's #hash picks one: #people, #faces, #live, #activity),
// the login form when the server wants credentials, and each tab's module.
import { $, api, credential, forgetCredential, say, setCredential, whenUnauthorized } from "./api.js";
import * as people from "./people.js";
import * as faces from "./faces.js";
import * as live from "./live.js";
import * as activity from "./activity.js";

const TABS = { people, faces, live, activity };
let current = null;

function tabFromHash() {
  const name = location.hash.replace(/^#/, "");
  return Object.hasOwn(TABS, name) ? name : "people";
}

function showTab(name) {
  if (current && current !== name && TABS[current].hide) TABS[current].hide();
  current = name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of Object.keys(TABS)) $(`tab-${t}`).hidden = t !== name;
  document.body.dataset.tab = name;
  TABS[name].show();
}

function showLogin(message) {
  $("login").hidden = false;
  $("panels").hidden = true;
  document.body.dataset.auth = "needed";
  if (message) say("login-status", message, "error");
  $("login-secret").focus();
}

function authState() {
  const c = credential();
  $("auth-state").textContent = c ? (c.kind === "bearer" ? "signed in with a token" : "signed in with an API key") : "";
  $("auth-forget").hidden = !c;
}

/** Asks a protected endpoint whether the credential (or none) is enough; then opens the tabs. */
async function start() {
  try {
    await api("/users");
  } catch (e) {
    if (e.status === 401) return showLogin(credential() ? "That credential was refused." : "");
    say("login-status", e.message, "error");
  }
  $("login").hidden = true;
  $("panels").hidden = false;
  document.body.dataset.auth = credential() ? "given" : "open";
  authState();
  showTab(tabFromHash());
}

whenUnauthorized(() => showLogin("The server asks for credentials (or refused the ones given)."));

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setCredential($("login-kind").value, $("login-secret").value.trim());
  $("login-secret").value = "";
  say("login-status", "");
  start();
});
$("auth-forget").addEventListener("click", () => {
  forgetCredential();
  live.stop();
  authState();
  start();
});
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => {
    location.hash = b.dataset.tab;
  });
}
window.addEventListener("hashchange", () => {
  if (!$("panels").hidden) showTab(tabFromHash());
});
for (const t of Object.values(TABS)) t.init();
start().finally(() => {
  document.body.dataset.ready = "1";
});
