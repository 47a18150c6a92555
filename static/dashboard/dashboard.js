// Agent dashboard live updates: the agent websocket (/ws/agent/) sends
// {"type": "inbox.changed", "conversation_id", "kind"}; each element with data-refresh-url
// (the inbox list, or a conversation's transcript when data-conversation-id matches) is
// re-fetched as server-rendered HTML and swapped in. Reconnects with backoff, and re-fetches
// everything each time the socket opens, since changes made while it was closed (or before the page's
// first connection) sent events nobody heard.
//
// Every customer message sends an event to every open dashboard, so re-fetches are throttled per
// element: the first event waits QUIET_MS (a question and its answer's first events coalesce), then
// at most one fetch starts per MIN_INTERVAL_MS and never two at once; events meanwhile are
// coalesced into one trailing fetch, so the last change is always shown.
(function () {
  "use strict";
  const QUIET_MS = 150;
  const MIN_INTERVAL_MS = 1500;
  const live = document.getElementById("live");
  const state = new Map(); // element -> {timer, busy, again, last (ms of its last fetch's start)}

  /** The keys (message ids) of the open <details> inside ``element``, to keep them open after a swap. */
  function openDetails(element) {
    return new Set([...element.querySelectorAll("details[open]")].map(
      (details) => details.closest("[data-message-id]")?.dataset.messageId).filter(Boolean));
  }

  function reopenDetails(element, keys) {
    for (const key of keys) {
      element.querySelector(`[data-message-id="${CSS.escape(key)}"] details`)?.setAttribute("open", "");
    }
  }

  function refresh(element) {
    let entry = state.get(element);
    if (!entry) {
      entry = { timer: null, busy: false, again: false, last: -Infinity };
      state.set(element, entry);
    }
    if (entry.busy) { entry.again = true; return; } // one trailing fetch once this one ends
    if (entry.timer !== null) return; // already scheduled: this event is coalesced into it
    const wait = Math.max(QUIET_MS, entry.last + MIN_INTERVAL_MS - Date.now());
    entry.timer = setTimeout(() => { entry.timer = null; load(element, entry); }, wait);
  }

  async function load(element, entry) {
    entry.busy = true;
    entry.last = Date.now();
    const url = element.dataset.refreshUrl + (element.id === "inbox" ? window.location.search : "");
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } });
      if (response.redirected) {
        // Signed out meanwhile: the fragment URL sent us to the login page. Show it, whole.
        window.location.reload();
        return;
      }
      if (!response.ok) return;
      const html = await response.text();
      const keep = openDetails(element);
      element.innerHTML = html;
      reopenDetails(element, keep);
      element.dispatchEvent(new CustomEvent("dashboard:refreshed", { bubbles: true }));
    } catch (error) { /* next event retries */ } finally {
      entry.busy = false;
      if (entry.again) { entry.again = false; refresh(element); }
    }
  }

  function refreshAll() {
    document.querySelectorAll("[data-refresh-url]").forEach(refresh);
  }

  function onEvent(event) {
    if (event.type !== "inbox.changed") return;
    document.querySelectorAll("[data-refresh-url]").forEach((element) => {
      const only = element.dataset.conversationId;
      if (!only || only === event.conversation_id) refresh(element);
    });
  }

  let delay = 500;
  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws/agent/`);
    socket.addEventListener("open", () => {
      delay = 500;
      if (live) { live.textContent = "live"; live.classList.add("on"); }
      document.body.dataset.live = "1";
      refreshAll();
    });
    socket.addEventListener("message", (message) => {
      try { onEvent(JSON.parse(message.data)); } catch (error) { /* ignore bad frames */ }
    });
    socket.addEventListener("close", () => {
      if (live) { live.textContent = "offline"; live.classList.remove("on"); }
      delete document.body.dataset.live;
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    });
  }
  if (document.querySelector("[data-refresh-url]") || live) connect();
})();
