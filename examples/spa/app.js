// A single-page app on jwtauth, in plain JavaScript (no build step).
//
// The access token lives in a variable of this script only: never in localStorage, sessionStorage or a
// cookie a script can read, so it is gone on a reload and an XSS cannot find it lying around. The refresh
// token never reaches this script at all: jwtauth keeps it in the HttpOnly cookie `jwtauth_refresh`, which
// the browser sends back to jwtauth on `credentials: "include"` requests. After a reload the page asks
// jwtauth for a new access token with that cookie ("silent refresh").
//
// Where jwtauth and the API are: ?auth=...&api=... in the page's address, else the README's defaults.
"use strict";

const query = new URLSearchParams(location.search);
const AUTH = query.get("auth") || "http://127.0.0.1:8000";
const API = query.get("api") || "http://127.0.0.1:9000";

let accessToken = null; // in memory only
let refreshTimer = null;
let refreshing = null; // the refresh in flight, shared by every caller in this tab

const $ = (id) => document.getElementById(id);

// Every call to jwtauth: a POST that carries the cookie. jwtauth checks the page's Origin against
// JWTAUTH_CORS_ORIGINS, so no other site can make the browser do this.
function callAuth(path, body) {
  const options = { method: "POST", credentials: "include" };
  if (body !== undefined) {
    options.headers = { "Content-Type": "application/json" };
    options.body = JSON.stringify(body);
  }
  return fetch(AUTH + path, options);
}

// A token response: the access token and how long it lives. The refresh token is not in it (it went into
// the cookie), so there is nothing else to keep.
function useTokens(body) {
  accessToken = body.access_token;
  clearTimeout(refreshTimer);
  // Refresh a minute before the access token expires, so API calls rarely meet an expired one.
  refreshTimer = setTimeout(refresh, Math.max(body.expires_in - 60, 5) * 1000);
  show();
}

function forget() {
  accessToken = null;
  clearTimeout(refreshTimer);
  show();
}

async function login(email, password) {
  const response = await callAuth("/login", { email, password });
  const body = await response.json();
  if (!response.ok) {
    say(`Login refused: ${body.error_description || body.error}`);
    return false;
  }
  useTokens(body);
  say("Logged in.");
  return true;
}

// POST /refresh with no body: jwtauth takes the refresh token from the cookie and sets the next one. Two
// tabs share the cookie; jwtauth gives concurrent refreshes of one token the same next token.
function refresh() {
  refreshing ??= (async () => {
    try {
      const response = await callAuth("/refresh");
      if (!response.ok) {
        forget(); // no cookie, or a session that has ended: log in again
        return false;
      }
      useTokens(await response.json());
      return true;
    } catch (error) {
      say(`jwtauth cannot be reached: ${error}`);
      return false;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

async function logout() {
  await callAuth("/logout"); // the cookie names the session; jwtauth ends it and clears the cookie
  forget();
  say("Logged out.");
}

// The API is another origin: it gets the access token in the Authorization header, and no cookie.
async function callApi() {
  if (!accessToken && !(await refresh())) {
    return say("Log in first.");
  }
  let response = await fetch(`${API}/orders`, { headers: { Authorization: `Bearer ${accessToken}` } });
  if (response.status === 401 && (await refresh())) {
    response = await fetch(`${API}/orders`, { headers: { Authorization: `Bearer ${accessToken}` } });
  }
  say(`GET /orders: ${response.status}\n${JSON.stringify(await response.json(), null, 2)}`);
}

// Display only: the page reads its own token's claims to greet the user. It verifies nothing; the API does.
function claims(token) {
  const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(payload));
}

function show() {
  $("status").textContent = accessToken ? `Logged in as ${claims(accessToken).email}` : "Logged out";
  $("login-form").hidden = Boolean(accessToken);
  $("session").hidden = !accessToken;
}

function say(text) {
  $("output").textContent = text;
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  login($("email").value, $("password").value);
});
$("call-api").addEventListener("click", callApi);
$("refresh").addEventListener("click", refresh);
$("logout").addEventListener("click", logout);

// On every load, a reload included: a live cookie logs the page in without asking for the password.
refresh().then(show);
