// The service's REST API as seen from the page: bearer-token auth and JSON errors.
//
// The token arrives once in the page URL (`#token=XYZ` or `?token=XYZ`, as printed by `slime-rl service`), is
// kept in sessionStorage (gone when the tab closes) and removed from the address bar so it is not left in
// history or screenshots. Every /api call carries it as `Authorization: Bearer`.

const TOKEN_KEY = "slime_rl.token";

/** A non-2xx answer; `field` is the dotted request field the server blames (e.g. hyperparameters.lr_multiplier). */
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.field = body?.field || null;
    this.body = body || {};
  }
}

let onUnauthorized = () => {};

/** Register what happens on a 401 (the app shows the token box). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
}

/** Take a token from the URL (hash or query), store it, and strip it from the address bar; true if found. */
export function captureTokenFromUrl() {
  const url = new URL(location.href);
  const fromHash = new URLSearchParams(url.hash.slice(1)).get("token");
  const fromQuery = url.searchParams.get("token");
  const token = fromHash || fromQuery;
  if (!token) return false;
  setToken(token);
  url.searchParams.delete("token");
  if (fromHash) url.hash = "";
  history.replaceState(null, "", url.pathname + url.search + url.hash);
  return true;
}

/**
 * Call the API. `json` is sent as a JSON body; `body` is sent raw (file uploads). Resolves to the parsed JSON
 * answer; rejects with ApiError on a non-2xx answer (after calling the 401 handler for a 401).
 */
export async function api(method, path, { json, body, params } = {}) {
  const headers = {};
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/octet-stream";
  }
  let url = path;
  if (params) {
    const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
    if ([...q].length) url += `?${q}`;
  }
  const res = await fetch(url, { method, headers, body });
  let answer = null;
  try {
    answer = await res.json();
  } catch {
    answer = null; // an empty or non-JSON body (a proxy's error page): reported by status below
  }
  if (!res.ok) {
    const err = new ApiError(res.status, answer);
    if (res.status === 401) onUnauthorized(err);
    throw err;
  }
  return answer;
}

let optionsPromise = null;

/** GET /api/options once per page load (models, algorithms, tasks, hyperparameters). */
export function getOptions() {
  if (!optionsPromise) {
    optionsPromise = api("GET", "/api/options").catch((err) => {
      optionsPromise = null; // retry on the next call (e.g. after the token is entered)
      throw err;
    });
  }
  return optionsPromise;
}
