// Agent dashboard live updates: the agent websocket (/ws/agent/) sends
// {"type": "inbox.changed", "conversation_id", "kind"}; each element with data-refresh-url
// (the inbox list, or a conversation's transcript when data-conversation-id matches) is
// re-fetched as server-rendered HTML and swapped in. Reconnects with backoff, and re-fetches
// everything each time the socket opens, since changes made while it was closed (or before the page's
// first connection) sent events nobody heard.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const pending = new Map(); // element -> debounce timer
  const latest = new Map(); // element -> number of its newest fetch (older answers are dropped)

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
    if (pending.has(element)) return;
    pending.set(element, setTimeout(async () => {
      pending.delete(element);
      const ticket = (latest.get(element) || 0) + 1;
      latest.set(element, ticket);
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
        if (latest.get(element) !== ticket) return; // a newer fetch was started: its answer wins
        const keep = openDetails(element);
        element.innerHTML = html;
        reopenDetails(element, keep);
        element.dispatchEvent(new CustomEvent("dashboard:refreshed", { bubbles: true }));
      } catch (error) { /* next event retries */ }
    }, 150));
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
