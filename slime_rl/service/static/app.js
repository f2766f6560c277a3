// Entry point: hash routing between the pages, and the token box shown when the API answers 401.
//
// Routes: #/new (wizard), #/jobs (list), #/jobs/<id> (job page), #/compare?ids=a,b (compare).
// Each page is a function (root, routeParams, query) -> {dispose}; dispose stops its refresh timers, so
// leaving a page leaves nothing polling behind.

import { captureTokenFromUrl, getToken, setToken, setUnauthorizedHandler } from "./api.js";
import { el, replace } from "./dom.js";
import { wizardView } from "./wizard.js";
import { jobsView } from "./jobs.js";
import { jobView } from "./job.js";
import { compareView } from "./compare.js";

const ROUTES = [
  [/^\/new$/, wizardView, "new"],
  [/^\/jobs$/, jobsView, "jobs"],
  [/^\/jobs\/([^/]+)$/, jobView, "jobs"],
  [/^\/compare$/, compareView, "jobs"],
];
const DEFAULT_ROUTE = "#/new";

const root = document.getElementById("view");
const authBox = document.getElementById("auth");
let current = null; // the mounted page's {dispose}
let generation = 0; // bumped on every navigation, so a page that finishes loading late is dropped

async function route() {
  const gen = ++generation;
  current?.dispose();
  current = null;
  // A #token=... link opened in a tab that already shows the page arrives as a hash change, not a load.
  if (captureTokenFromUrl()) hideTokenBox();
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const found = ROUTES.map(([re, view, nav]) => [re.exec(path), view, nav]).find(([m]) => m);
  if (!found) {
    location.replace(DEFAULT_ROUTE); // fires hashchange, which routes again
    return;
  }
  const [match, view, nav] = found;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === nav);
  replace(root, el("p", { class: "help" }, "Loading…"));
  try {
    const page = await view(root, match.slice(1).map(decodeURIComponent), new URLSearchParams(search));
    if (gen !== generation) page?.dispose();
    else current = page;
  } catch (err) {
    if (gen !== generation || err.status === 401) return; // the token box is up
    replace(root, el("div", { class: "panel" }, el("h2", {}, "Something went wrong"),
      el("div", { class: "error-box", id: "page-error" }, err.message)));
  }
}

function showTokenBox() {
  if (!authBox.hidden) return;
  current?.dispose();
  current = null;
  generation++;
  const input = el("input", { type: "password", id: "token-input", autocomplete: "off",
    placeholder: "the token printed by slime-rl service" });
  const save = el("button", { type: "submit", id: "token-save", class: "primary" }, "Continue");
  const form = el("form", { class: "panel auth" },
    el("h2", {}, "Access token"),
    el("p", {}, getToken() ? "The service did not accept the stored token. Enter the current one."
      : "This service needs the access token it printed at start-up (or open the URL it printed)."),
    el("div", { class: "row" }, input, save));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!input.value.trim()) return;
    setToken(input.value);
    hideTokenBox();
    route();
  });
  replace(authBox, form);
  root.hidden = true;
  authBox.hidden = false;
  input.focus();
}

function hideTokenBox() {
  authBox.hidden = true;
  root.hidden = false;
}

setUnauthorizedHandler(showTokenBox);
window.addEventListener("hashchange", route);
route();
