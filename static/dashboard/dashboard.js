// Agent dashboard live updates: the agent websocket (/ws/agent/) sends
// {"type": "inbox.changed", "conversation_id", "kind"}; each element with data-refresh-url
// (the inbox list, or a conversation's transcript when data-conversation-id matches) is
// re-fetched as server-rendered HTML and swapped in. Reconnects with backoff.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const pending = new Map();

  function refresh(element) {
    if (pending.has(element)) return;
    pending.set(element, setTimeout(async () => {
      pending.delete(element);
      const url = element.dataset.refreshUrl + (element.id === "inbox" ? window.location.search : "");
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } });
        if (response.ok) {
          element.innerHTML = await response.text();
          element.dispatchEvent(new CustomEvent("dashboard:refreshed", { bubbles: true }));
        }
      } catch (error) { /* next event retries */ }
    }, 150));
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
  connect();
})();
