/*
 * Support chat widget: one static script, no build step.
 *
 *   <script src="https://support.example.com/static/widget/widget.js"
 *           data-server="https://support.example.com" defer></script>
 *
 * Optional attributes: data-server (default: where this script was loaded from), data-collection
 * (the knowledge-base collection the page expects; the server answers from the collection an admin
 * mapped to the page's origin, and refuses to start a conversation when the two differ), data-title
 * (panel heading, default "Support").
 *
 * Signed-in customers (identity verification, as Intercom's user_hash): the host site's server signs
 * its user id with the site's identity secret (admin: Widget sites) and adds
 *   data-user-id="42" data-user-hash="<hex HMAC-SHA256(secret, "42")>"
 * (or sets window.supportbotSettings = { userId, userHash } before this script loads). The widget
 * then starts verified conversations and, on a device where none is stored, offers the customer's
 * earlier conversations on this site (POST /api/conversations/verified/) to resume
 * (POST /api/conversations/<id>/resume/ returns its token). A wrong hash is refused by the server.
 *
 * The widget renders in a shadow root (the host page's CSS cannot reach it), streams answers over a
 * websocket (/ws/chat/<id>/), shows numbered citations that open the cited passage, and
 * keeps the conversation id and token in localStorage so it survives a page reload. The token never
 * goes in a URL: the HTTP API gets it in the X-Conversation-Token header, the websocket as the
 * subprotocol "supportbot.token.<token>" beside "supportbot.chat" (the server selects the latter). Everything that
 * comes from the server or the user is rendered with textContent, never as HTML.
 *
 * Feedback: thumbs up/down (then an optional comment) under each answer, and a 1-5 rating of the
 * conversation ("Rate" in the header, offered by itself when an agent resolves it), sent to
 * /api/conversations/<id>/messages/<message id>/feedback/ and /api/conversations/<id>/rating/ with
 * the conversation's token.
 */
(() => {
  "use strict";

  const script = document.currentScript;
  if (!script || window.__supportbotWidget) return;
  window.__supportbotWidget = true;

  const SERVER = (script.dataset.server || new URL(script.src, location.href).origin).replace(/\/+$/, "");
  const COLLECTION = script.dataset.collection || ""; // "": the origin's collection, whatever it is
  const TITLE = script.dataset.title || "Support";
  const SETTINGS = (window.supportbotSettings && typeof window.supportbotSettings === "object") ? window.supportbotSettings : {};
  const USER_ID = script.dataset.userId || (SETTINGS.userId == null ? "" : String(SETTINGS.userId));
  const USER_HASH = script.dataset.userHash || (SETTINGS.userHash == null ? "" : String(SETTINGS.userHash));
  // Sent with the requests that start, list and resume a signed-in customer's conversations.
  const IDENTITY = USER_ID ? { user_id: USER_ID, user_hash: USER_HASH } : {};
  // Per signed-in user: another account on this browser does not reopen this one's conversation.
  const STORAGE_KEY = `supportbot:${SERVER}:${COLLECTION || "default"}${USER_ID ? `:user:${USER_ID}` : ""}`;
  // The longest question the server accepts (its WIDGET_MESSAGE_MAX_CHARS): unknown until a response
  // that gives this page a conversation says it ("message_max_chars"); the server refuses longer ones
  // either way, this only lets the customer know before sending.
  let maxChars = null;
  // The longest feedback or rating comment the server accepts (its FEEDBACK_COMMENT_MAX_CHARS), learnt
  // from the same responses ("feedback_comment_max_chars"); until then the comment boxes have no maxlength.
  let feedbackMaxChars = null;
  const RECONNECT_MAX_MS = 30000;
  // Close code of a socket the server cannot keep (its Redis is down): reconnect after the delay of the
  // chat.unavailable frame sent before it, never sooner (chat.redis_outage.CLOSE_UNAVAILABLE).
  const CLOSE_UNAVAILABLE = 4503;

  // --- DOM helpers: text goes in through textContent / text nodes only ---------------------------

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  function svgIcon(pathData) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", pathData);
    svg.append(path);
    return svg;
  }

  const ICON_CHAT = "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z";
  const ICON_CLOSE = "M6 6l12 12M18 6L6 18";

  const STYLE = `
    :host { all: initial; }
    * { box-sizing: border-box; }
    .root { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000;
      font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2b33; }
    button { font: inherit; cursor: pointer; }
    button:focus-visible, textarea:focus-visible { outline: 3px solid #f2b134; outline-offset: 2px; }
    .launcher { width: 60px; height: 60px; border-radius: 50%; border: none; background: #0f5c6e;
      color: #fff; box-shadow: 0 6px 20px rgba(0,0,0,.25); display: grid; place-items: center;
      position: relative; }
    .launcher svg { width: 28px; height: 28px; fill: none; stroke: currentColor; stroke-width: 2;
      stroke-linejoin: round; }
    .launcher .dot { position: absolute; top: 6px; right: 6px; width: 12px; height: 12px;
      border-radius: 50%; background: #e4572e; border: 2px solid #fff; }
    .panel { position: absolute; right: 0; bottom: 76px; width: min(380px, calc(100vw - 40px));
      height: min(560px, calc(100vh - 120px)); background: #fff; border-radius: 14px;
      box-shadow: 0 12px 40px rgba(0,0,0,.28); display: flex; flex-direction: column; overflow: hidden; }
    .panel[hidden], .passage[hidden], .status[hidden], .dot[hidden], .rate[hidden] { display: none; }
    header { background: #0f5c6e; color: #fff; padding: 12px 14px; display: flex; align-items: center; gap: 8px; }
    header h2 { font-size: 16px; margin: 0; flex: 1; font-weight: 600; }
    .human { background: #fff; color: #0f5c6e; border: none; border-radius: 999px; padding: 5px 12px;
      font-size: 13px; font-weight: 600; }
    .human:disabled { opacity: .7; cursor: default; }
    .rate { background: transparent; color: #fff; border: 1px solid rgba(255,255,255,.7);
      border-radius: 999px; padding: 4px 10px; font-size: 13px; }
    .icon { background: transparent; border: none; color: #fff; width: 32px; height: 32px;
      display: grid; place-items: center; border-radius: 6px; }
    .icon svg { width: 18px; height: 18px; stroke: currentColor; stroke-width: 2.5; fill: none; }
    .status { background: #fff4dc; color: #6b4a00; padding: 6px 14px; font-size: 13px; }
    .messages { flex: 1; overflow-y: auto; padding: 14px; display: flex; flex-direction: column; gap: 10px;
      background: #f5f7f8; }
    .msg { max-width: 85%; padding: 8px 12px; border-radius: 12px; white-space: pre-wrap;
      overflow-wrap: anywhere; }
    .msg .who { display: block; font-size: 11px; font-weight: 600; text-transform: uppercase;
      letter-spacing: .04em; color: #5b6b73; margin-bottom: 2px; white-space: normal; }
    .user { align-self: flex-end; background: #0f5c6e; color: #fff; }
    .user .who { color: #cfe6ec; }
    .assistant, .agent { align-self: flex-start; background: #fff; border: 1px solid #dde4e7; }
    .agent { border-color: #0f5c6e; }
    .msg[aria-busy="true"] .body::after { content: "▍"; animation: blink 1s steps(2) infinite; }
    @keyframes blink { 50% { opacity: 0; } }
    @media (prefers-reduced-motion: reduce) { .msg[aria-busy="true"] .body::after { animation: none; } }
    .note { align-self: center; font-size: 13px; color: #5b6b73; text-align: center; max-width: 90%; }
    .note.error { color: #a8201a; }
    .cite { border: none; background: #e3f1f4; color: #0f5c6e; border-radius: 4px; padding: 0 4px;
      margin: 0 1px; font-size: 12px; font-weight: 700; vertical-align: 1px; }
    .sources { margin-top: 6px; display: flex; flex-wrap: wrap; gap: 4px; white-space: normal; }
    .source { border: 1px solid #c5d7dc; background: #fff; color: #0f5c6e; border-radius: 999px;
      padding: 2px 10px; font-size: 12px; max-width: 100%; overflow: hidden; text-overflow: ellipsis;
      white-space: nowrap; }
    .inline-human { margin-top: 6px; border: 1px solid #0f5c6e; background: #fff; color: #0f5c6e;
      border-radius: 999px; padding: 3px 12px; font-size: 13px; }
    form { display: flex; gap: 8px; padding: 10px; border-top: 1px solid #dde4e7; background: #fff; }
    textarea { flex: 1; resize: none; border: 1px solid #b9c6cc; border-radius: 10px; padding: 8px 10px;
      font: inherit; color: inherit; min-height: 42px; max-height: 120px; }
    .send { border: none; background: #0f5c6e; color: #fff; border-radius: 10px; padding: 0 16px;
      font-weight: 600; }
    .send:disabled { background: #8aa9b1; cursor: default; }
    .passage { position: absolute; inset: 56px 0 0 0; background: #fff; display: flex;
      flex-direction: column; }
    .passage-head { display: flex; align-items: center; gap: 8px; padding: 10px 14px;
      border-bottom: 1px solid #dde4e7; }
    .passage-head h3 { margin: 0; font-size: 15px; flex: 1; }
    .page-link { font-size: 13px; color: #0f5c6e; white-space: nowrap; }
    .notice { margin: 0 0 10px; padding: 8px 10px; background: #fff4d6; border-radius: 6px; color: #5c4400;
      white-space: normal; }
    .back { border: 1px solid #0f5c6e; background: #fff; color: #0f5c6e; border-radius: 8px;
      padding: 3px 10px; font-size: 13px; }
    .passage-body { padding: 14px; overflow-y: auto; white-space: pre-wrap; overflow-wrap: anywhere;
      color: #3d4b52; }
    mark { background: #ffe58a; color: #1d2b33; padding: 1px 0; border-radius: 2px; }
    .feedback { margin-top: 6px; display: flex; flex-wrap: wrap; align-items: center; gap: 4px;
      white-space: normal; font-size: 12px; color: #5b6b73; }
    .thumb { border: 1px solid #c5d7dc; background: #fff; border-radius: 6px; padding: 0 6px;
      font-size: 14px; line-height: 22px; }
    .thumb[aria-pressed="true"] { background: #0f5c6e; border-color: #0f5c6e; }
    .feedback-comment, .rating { display: flex; flex-direction: column; gap: 6px; padding: 0; border: none;
      background: transparent; width: 100%; white-space: normal; }
    .feedback-comment textarea, .rating textarea { min-height: 52px; font-size: 13px; }
    .feedback-comment .actions, .rating .actions { display: flex; gap: 6px; }
    .small { border: 1px solid #0f5c6e; background: #fff; color: #0f5c6e; border-radius: 8px;
      padding: 3px 10px; font-size: 13px; }
    .small.primary { background: #0f5c6e; color: #fff; }
    .small:disabled { opacity: .6; cursor: default; }
    .rating-card { align-self: stretch; background: #fff; border: 1px solid #c5d7dc; border-radius: 12px;
      padding: 10px 12px; }
    .rating-card p { margin: 0 0 6px; font-weight: 600; font-size: 14px; }
    .stars { display: flex; gap: 4px; }
    .star { border: 1px solid #c5d7dc; background: #fff; color: #8aa9b1; border-radius: 6px;
      width: 36px; height: 32px; font-size: 18px; line-height: 1; }
    .star.on { color: #d98b00; border-color: #d98b00; }
    .feedback-status:empty { display: none; }
    .earlier { align-self: stretch; display: flex; flex-direction: column; gap: 4px; font-size: 13px; }
    .earlier p { margin: 0; color: #5b6b73; }
    .earlier button { text-align: left; border: 1px solid #c5d7dc; background: #fff; color: #0f5c6e;
      border-radius: 8px; padding: 4px 10px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
    .sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
      white-space: nowrap; }
  `;

  // --- state ---------------------------------------------------------------------------------------

  const state = {
    conversation: loadConversation(), // {id, token} or null
    status: "bot",
    socket: null,
    socketOpen: false,
    reconnectDelay: 1000,
    reconnectTimer: null,
    outbox: [], // frames waiting for the socket
    streaming: null, // {node, body, text} of the answer being streamed
    pendingQuestion: null, // the question being answered (re-sent after chat.busy)
    unavailableMs: 0, // the retry delay of a chat.unavailable frame on the current socket
    busyTimer: null,
  };

  function loadConversation() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
      if (saved && typeof saved.id === "string" && typeof saved.token === "string") return saved;
    } catch (error) { /* storage blocked or corrupt: start fresh */ }
    return null;
  }

  function saveConversation(conversation) {
    state.conversation = conversation;
    rateButton.hidden = !conversation;
    try {
      if (conversation) localStorage.setItem(STORAGE_KEY, JSON.stringify(conversation));
      else localStorage.removeItem(STORAGE_KEY);
    } catch (error) { /* private mode: the conversation lasts for this page only */ }
  }

  // --- DOM -----------------------------------------------------------------------------------------

  const host = document.createElement("supportbot-widget");
  host.style.setProperty("all", "initial", "important");
  host.style.setProperty("display", "block", "important");
  const shadow = host.attachShadow({ mode: "open" });

  const launcherDot = el("span", { class: "dot", hidden: true });
  const launcher = el("button", {
    class: "launcher", type: "button", "aria-label": `Open ${TITLE} chat`, "aria-expanded": "false",
    "aria-controls": "supportbot-panel", onclick: () => togglePanel(),
  }, [svgIcon(ICON_CHAT), launcherDot]);

  const humanButton = el("button", { class: "human", type: "button", text: "Talk to a human", onclick: () => requestHuman() });
  const rateButton = el("button", {
    class: "rate", type: "button", text: "Rate", "aria-label": "Rate this conversation", hidden: true,
    onclick: () => showRating(),
  });
  const closeButton = el("button", { class: "icon", type: "button", "aria-label": "Close chat", onclick: () => togglePanel(false) }, [svgIcon(ICON_CLOSE)]);
  const statusLine = el("div", { class: "status", role: "status", "aria-live": "polite", hidden: true });
  const messages = el("div", { class: "messages", role: "log", "aria-live": "polite", "aria-label": "Conversation" });
  const input = el("textarea", {
    id: "supportbot-input", rows: "1", placeholder: "Ask a question…",
    "aria-label": "Your question", autocomplete: "off",
  });
  const sendButton = el("button", { class: "send", type: "submit", text: "Send" });
  const form = el("form", { onsubmit: (event) => { event.preventDefault(); sendQuestion(); } }, [input, sendButton]);

  const passageTitle = el("h3", { id: "supportbot-passage-title" });
  const passageBody = el("div", { class: "passage-body", tabindex: "0" });
  const passageBack = el("button", { class: "back", type: "button", text: "Back to chat", onclick: () => closePassage() });
  // The web page a cited passage came from (website sources only), opened in a new tab.
  const passageLink = el("a", { class: "page-link", target: "_blank", rel: "noopener noreferrer", text: "Open the page ↗" });
  passageLink.hidden = true;
  const passage = el("section", {
    class: "passage", role: "region", "aria-labelledby": "supportbot-passage-title", hidden: true,
  }, [el("div", { class: "passage-head" }, [passageTitle, passageLink, passageBack]), passageBody]);

  const panel = el("section", {
    class: "panel", id: "supportbot-panel", role: "dialog", "aria-label": `${TITLE} chat`, hidden: true,
  }, [
    el("header", {}, [el("h2", { text: TITLE }), humanButton, rateButton, closeButton]),
    statusLine, messages, passage, form,
  ]);

  shadow.append(el("style", { text: STYLE }), el("div", { class: "root" }, [panel, launcher]));

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendQuestion();
    }
  });
  input.addEventListener("input", () => {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 120)}px`;
  });
  panel.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    event.stopPropagation();
    if (!passage.hidden) closePassage();
    else togglePanel(false);
  });

  function togglePanel(open = panel.hidden) {
    panel.hidden = !open;
    launcher.setAttribute("aria-expanded", String(open));
    launcher.setAttribute("aria-label", open ? `Close ${TITLE} chat` : `Open ${TITLE} chat`);
    if (open) {
      launcherDot.hidden = true;
      input.focus();
      scrollToEnd();
    } else {
      launcher.focus();
    }
  }

  function setStatus(text) {
    statusLine.textContent = text || "";
    statusLine.hidden = !text;
  }

  function scrollToEnd() {
    messages.scrollTop = messages.scrollHeight;
  }

  function notifyUnread() {
    if (panel.hidden) launcherDot.hidden = false;
  }

  function addNote(text, { error = false } = {}) {
    const note = el("div", { class: error ? "note error" : "note", role: error ? "alert" : null, text });
    messages.append(note);
    scrollToEnd();
    return note;
  }

  const ROLE_LABELS = { user: "You", assistant: "Assistant", agent: "Support agent" };

  function addMessage(role, text) {
    const body = el("span", { class: "body", text });
    const node = el("div", { class: `msg ${role}`, "data-role": role }, [
      el("span", { class: "who", text: ROLE_LABELS[role] || role }), body,
    ]);
    messages.append(node);
    scrollToEnd();
    return { node, body };
  }

  /** Fill ``body`` with ``text``, turning each [n] that names a citation into a button. */
  function renderAnswer(node, body, text, citations, abstained) {
    const byNumber = new Map((citations || []).map((c) => [Number(c.n), c]));
    body.textContent = "";
    const marker = /\[(\d+)\]/g;
    let last = 0;
    for (const match of text.matchAll(marker)) {
      const citation = byNumber.get(Number(match[1]));
      if (!citation) continue;
      body.append(document.createTextNode(text.slice(last, match.index)));
      body.append(citeButton(citation, `[${citation.n}]`, "cite"));
      last = match.index + match[0].length;
    }
    body.append(document.createTextNode(text.slice(last)));
    node.querySelector(".sources")?.remove();
    node.querySelector(".inline-human")?.remove();
    if (byNumber.size) {
      const list = el("div", { class: "sources", "aria-label": "Sources" });
      for (const citation of [...byNumber.values()].sort((a, b) => a.n - b.n)) {
        list.append(citeButton(citation, `[${citation.n}] ${citation.source_title || citation.title || "Source"}`, "source"));
      }
      node.append(list);
    }
    if (abstained && state.status === "bot") {
      node.append(el("button", { class: "inline-human", type: "button", text: "Talk to a human", onclick: () => requestHuman() }));
    }
  }

  function citeButton(citation, label, className) {
    const title = citation.source_title || citation.title || "Source";
    return el("button", {
      class: className, type: "button", text: label, "data-chunk-id": String(citation.chunk_id),
      "aria-label": `Source ${citation.n}: ${title}`, title,
      onclick: () => openPassage(citation),
    });
  }

  // --- cited passages ------------------------------------------------------------------------------

  let passageOpener = null;

  async function openPassage(citation) {
    passageOpener = shadow.activeElement;
    passageTitle.textContent = citation.source_title || citation.title || "Source";
    passageBody.textContent = "Loading the passage…";
    passageLink.hidden = true;
    passage.hidden = false;
    passageBack.focus();
    const { id, token } = state.conversation || {};
    try {
      const response = await fetch(`${SERVER}/api/conversations/${encodeURIComponent(id)}/passages/${encodeURIComponent(citation.chunk_id)}/`, {
        headers: { "X-Conversation-Token": token }, cache: "no-store",
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      passageTitle.textContent = data.title || "Source";
      if (/^https?:\/\//i.test(data.url || "")) {
        passageLink.href = data.url;
        passageLink.hidden = false;
      }
      passageBody.textContent = "";
      if (data.status === "changed" || data.status === "removed") {
        // The source was re-ingested without the cited text, or deleted: say so, and show the page
        // as it is now (its link is in the header when it is a web page).
        passageBody.append(el("p", { class: "notice", role: "status", text: data.notice || "This page has changed." }));
        if (data.after) passageBody.append(document.createTextNode(`${data.after}…`));
        return;
      }
      if (data.before) passageBody.append(document.createTextNode(`…${data.before}`));
      passageBody.append(el("mark", { text: data.passage || "" }));
      if (data.after) passageBody.append(document.createTextNode(`${data.after}…`));
      const mark = passageBody.querySelector("mark");
      passageBody.scrollTop = Math.max(0, mark.offsetTop - passageBody.offsetTop - 40);
    } catch (error) {
      passageBody.textContent = "This passage is no longer available.";
    }
  }

  function closePassage() {
    passage.hidden = true;
    (passageOpener && passageOpener.isConnected ? passageOpener : input).focus();
  }

  // --- conversation over HTTP ----------------------------------------------------------------------

  async function api(path, { method = "GET", body } = {}) {
    const headers = body === undefined ? {} : { "Content-Type": "application/json" };
    if (state.conversation) headers["X-Conversation-Token"] = state.conversation.token;
    const response = await fetch(`${SERVER}/api/${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  }

  async function ensureConversation() {
    if (state.conversation) return state.conversation;
    const body = COLLECTION ? { collection: COLLECTION, ...IDENTITY } : { ...IDENTITY };
    const { ok, status, data } = await api("conversations/", { method: "POST", body });
    if (status === 429) {
      const error = new Error(data.error || "too many new conversations");
      error.retryAfterS = Math.max(1, Math.ceil(Number(data.retry_after_s) || 60));
      throw error;
    }
    if (!ok) {
      // e.g. a user_hash the server refused: the reason is for the site's developers, not the customer
      console.warn(`supportbot: could not start a conversation (HTTP ${status}): ${data.error || "no reason given"}`);
      throw new Error(data.error || "could not start a conversation");
    }
    applyLimits(data);
    saveConversation({ id: data.id, token: data.token });
    connect();
    return state.conversation;
  }

  /** Take the server's limits from a response that gives this page a conversation. */
  function applyLimits(data) {
    const limit = serverLimit(data, "message_max_chars");
    if (limit !== null) {
      maxChars = limit;
      input.maxLength = limit;
    }
    feedbackMaxChars = serverLimit(data, "feedback_comment_max_chars") ?? feedbackMaxChars;
  }

  /** ``data[key]`` when it is a whole number of at least 1, else null (an older server, a bad value). */
  function serverLimit(data, key) {
    const limit = Number(data && data[key]);
    return Number.isInteger(limit) && limit >= 1 ? limit : null;
  }

  /** Re-render the log from the stored transcript. Returns false if the conversation is gone. */
  async function loadTranscript() {
    const { id } = state.conversation;
    const { ok, status, data } = await api(`conversations/${encodeURIComponent(id)}/messages/`);
    if (status === 403 || status === 404) {
      forgetConversation();
      return false;
    }
    if (!ok) throw new Error(data.error || `HTTP ${status}`);
    applyLimits(data);
    messages.textContent = "";
    ratingCard = null;
    state.streaming = null;
    state.pendingQuestion = null; // answered and stored, or lost with the connection: either way, done
    clearTimeout(state.busyTimer);
    applyStatus(data.status, { quiet: true });
    if (!data.messages.length) greet();
    for (const message of data.messages) {
      const { node, body } = addMessage(message.role, message.text);
      if (message.role === "assistant") {
        renderAnswer(node, body, message.text, message.citations, message.abstained);
        addFeedback(node, message.id);
      }
    }
    updateSendButton();
    return true;
  }

  function forgetConversation() {
    closeSocket();
    saveConversation(null);
    messages.textContent = "";
    ratingCard = null;
    state.streaming = null;
    applyStatus("bot", { quiet: true });
    greet();
    offerEarlier();
  }

  /** For a signed-in customer on a device with no stored conversation: list their earlier
   * conversations on this site (from any device), each resumable with one click. */
  async function offerEarlier() {
    if (!USER_ID || state.conversation) return;
    let result;
    try {
      result = await api("conversations/verified/", { method: "POST", body: IDENTITY });
    } catch (error) { return; } // offline: the customer can still start a new conversation
    if (!result.ok) {
      console.warn(`supportbot: earlier conversations refused (HTTP ${result.status}): ${result.data.error || "no reason given"}`);
      return;
    }
    const earlier = result.data.conversations || [];
    if (!earlier.length || state.conversation) return;
    const card = el("div", { class: "earlier", role: "group", "aria-label": "Your earlier conversations" },
      [el("p", { text: "Continue an earlier conversation:" })]);
    for (const item of earlier.slice(0, 5)) {
      const when = new Date(item.updated_at).toLocaleDateString();
      card.append(el("button", {
        type: "button", text: `${item.preview} · ${when}`, title: item.preview,
        onclick: () => resumeConversation(item.id, card),
      }));
    }
    messages.append(card);
    scrollToEnd();
  }

  async function resumeConversation(id, card) {
    for (const button of card.querySelectorAll("button")) button.disabled = true;
    const { ok, data } = await api(`conversations/${encodeURIComponent(id)}/resume/`, { method: "POST", body: IDENTITY })
      .catch(() => ({ ok: false, data: {} }));
    if (!ok) {
      for (const button of card.querySelectorAll("button")) button.disabled = false;
      addNote(data.error || "could not open that conversation", { error: true });
      return;
    }
    closeSocket(); // a conversation started here meanwhile is left for this one
    applyLimits(data);
    saveConversation({ id: data.id, token: data.token });
    if (await loadTranscript().catch(() => false)) connect();
  }

  function greet() {
    addNote("Hi! Ask a question about our products, orders or policies. Answers cite their sources.");
  }

  // --- websocket -----------------------------------------------------------------------------------

  function connect() {
    if (!state.conversation || state.socket) return;
    clearTimeout(state.reconnectTimer);
    const { id, token } = state.conversation;
    const url = `${SERVER.replace(/^http/, "ws")}/ws/chat/${encodeURIComponent(id)}/`;
    const socket = new WebSocket(url, ["supportbot.chat", `supportbot.token.${token}`]);
    state.socket = socket;
    socket.addEventListener("open", () => {
      state.socketOpen = true;
      state.reconnectDelay = 1000;
      setStatus(statusText());
      updateSendButton();
      while (state.outbox.length && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(state.outbox.shift()));
    });
    socket.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch (error) { return; }
      if (frame && typeof frame.type === "string") handleFrame(frame);
    });
    socket.addEventListener("close", (event) => {
      if (state.socket !== socket) return; // closed on purpose
      const wasOpen = state.socketOpen;
      const unavailableMs = state.unavailableMs || (event.code === CLOSE_UNAVAILABLE ? 5000 : 0);
      state.unavailableMs = 0;
      state.socket = null;
      state.socketOpen = false;
      updateSendButton();
      if (state.streaming) finishStreaming();
      if (unavailableMs) scheduleReconnect(false, unavailableMs);
      else scheduleReconnect(wasOpen);
    });
  }

  function closeSocket() {
    clearTimeout(state.reconnectTimer);
    const socket = state.socket;
    state.socket = null;
    state.socketOpen = false;
    if (socket) socket.close();
  }

  /** Reload the transcript and reopen the socket after a delay: 0.5 s after an open socket dropped,
   * else the back-off (doubling up to RECONNECT_MAX_MS), and never before minDelayMs (the server's
   * retry delay when it said it is unavailable). */
  function scheduleReconnect(wasOpen, minDelayMs = 0) {
    setStatus(minDelayMs
      ? `The chat is briefly unavailable, reconnecting in ${Math.ceil(minDelayMs / 1000)} s…`
      : "Connection lost, reconnecting…");
    const delay = Math.max(wasOpen ? 500 : state.reconnectDelay, minDelayMs);
    state.reconnectDelay = Math.min(state.reconnectDelay * 2, RECONNECT_MAX_MS);
    state.reconnectTimer = setTimeout(async () => {
      // Catch up on what was said while disconnected; a refused token means the conversation is gone.
      try {
        if (!(await loadTranscript())) return;
      } catch (error) {
        scheduleReconnect(false); // the server is unreachable: back off and try again
        return;
      }
      connect();
    }, delay);
  }

  function send(frame) {
    if (state.socket && state.socketOpen) state.socket.send(JSON.stringify(frame));
    else {
      state.outbox.push(frame);
      connect();
    }
  }

  // --- frames from the server ----------------------------------------------------------------------

  function handleFrame(frame) {
    switch (frame.type) {
      case "chat.token": {
        if (!state.streaming) state.streaming = startStreaming();
        state.streaming.text += frame.text || "";
        state.streaming.body.textContent = state.streaming.text;
        scrollToEnd();
        break;
      }
      case "chat.citations":
        if (!state.streaming) state.streaming = startStreaming();
        state.streaming.citations = Array.isArray(frame.citations) ? frame.citations : [];
        break;
      case "chat.done": {
        const current = state.streaming || startStreaming();
        if (typeof frame.text === "string" && frame.text) current.text = frame.text;
        renderAnswer(current.node, current.body, current.text, current.citations, frame.abstained);
        addFeedback(current.node, frame.message_id);
        state.pendingQuestion = null;
        finishStreaming();
        setStatus(statusText());
        notifyUnread();
        break;
      }
      case "chat.busy":
      case "chat.rate_limited": {
        // Nothing was stored for the question: send it again after the server's delay.
        dropEmptyStreaming();
        const seconds = Math.max(1, Number(frame.retry_after_s) || 2);
        setStatus(frame.type === "chat.busy"
          ? `The assistant is busy, retrying in ${Math.ceil(seconds)} s…`
          : `You're sending questions quickly; yours goes in ${Math.ceil(seconds)} s…`);
        clearTimeout(state.busyTimer);
        const question = state.pendingQuestion;
        state.busyTimer = setTimeout(() => {
          if (question) {
            state.streaming = startStreaming();
            send({ type: "chat.message", text: question });
          }
        }, seconds * 1000);
        break;
      }
      case "chat.unavailable": {
        // The server cannot keep this socket (its Redis is down) and closes it (CLOSE_UNAVAILABLE):
        // nothing sent on it was stored. Reconnect after its delay; an unanswered question goes back
        // into the input box to be sent again.
        state.unavailableMs = Math.max(1, Number(frame.retry_after_s) || 5) * 1000;
        const question = state.pendingQuestion;
        state.pendingQuestion = null;
        clearTimeout(state.busyTimer);
        dropEmptyStreaming();
        if (question) {
          if (!input.value) input.value = question;
          addNote(frame.message || "The chat is briefly unavailable.", { error: true });
        }
        break;
      }
      case "chat.error":
        if (frame.code !== "answer_in_progress") {
          state.pendingQuestion = null;
          dropEmptyStreaming();
          humanButton.disabled = state.status === "needs_human" || state.status === "agent";
        }
        addNote(frame.message || "Something went wrong.", { error: true });
        break;
      case "chat.agent_active":
        state.pendingQuestion = null;
        dropEmptyStreaming();
        if (frame.status === "needs_human") {
          // the message asked for a person (or said yes to the bot's offer of one): handed over
          applyStatus("needs_human");
        } else {
          applyStatus("agent", { quiet: true });
          setStatus("A support agent will answer here.");
        }
        break;
      case "chat.agent_message":
        addMessage("agent", String(frame.text || ""));
        notifyUnread();
        break;
      case "chat.status":
        applyStatus(frame.status);
        break;
      default:
        break;
    }
  }

  function startStreaming() {
    const { node, body } = addMessage("assistant", "");
    node.setAttribute("aria-busy", "true");
    sendButton.disabled = true;
    return { node, body, text: "", citations: [] };
  }

  function finishStreaming() {
    if (state.streaming) state.streaming.node.removeAttribute("aria-busy");
    state.streaming = null;
    updateSendButton();
  }

  function dropEmptyStreaming() {
    if (state.streaming && !state.streaming.text) state.streaming.node.remove();
    finishStreaming();
  }

  function updateSendButton() {
    sendButton.disabled = Boolean(state.streaming || state.pendingQuestion);
  }

  const STATUS_TEXT = {
    needs_human: "We've asked a person to join. They will reply here.",
    agent: "A support agent is in this conversation.",
    resolved: "This conversation is marked resolved. Ask again to reopen it.",
  };

  function statusText() {
    return STATUS_TEXT[state.status] || "";
  }

  function applyStatus(status, { quiet = false } = {}) {
    if (!status) return;
    const changed = status !== state.status;
    state.status = status;
    humanButton.disabled = status === "needs_human" || status === "agent";
    humanButton.textContent = humanButton.disabled ? "Human requested" : "Talk to a human";
    if (status !== "bot") for (const button of messages.querySelectorAll(".inline-human")) button.remove();
    setStatus(statusText());
    if (changed && !quiet && STATUS_TEXT[status]) addNote(STATUS_TEXT[status]);
    if (changed && !quiet && status === "resolved") showRating();
  }

  // --- user actions --------------------------------------------------------------------------------

  async function sendQuestion() {
    const text = input.value.trim();
    if (!text || state.streaming || state.pendingQuestion) return;
    if (maxChars !== null && text.length > maxChars) {
      addNote(`Please keep messages under ${maxChars} characters.`, { error: true });
      return;
    }
    input.value = "";
    input.style.height = "auto";
    addMessage("user", text);
    state.streaming = startStreaming();
    state.pendingQuestion = text;
    try {
      await ensureConversation();
    } catch (error) {
      state.pendingQuestion = null;
      dropEmptyStreaming();
      addNote(error.retryAfterS
        ? `Too many new chats from your network right now. Please try again in ${error.retryAfterS} s.`
        : "Sorry, the chat is unavailable right now. Please try again later.", { error: true });
      return;
    }
    send({ type: "chat.message", text });
  }

  async function requestHuman() {
    humanButton.disabled = true;
    try {
      await ensureConversation();
      if (state.socketOpen) {
        send({ type: "chat.handoff" });
        return;
      }
      const { ok, data } = await api(`conversations/${encodeURIComponent(state.conversation.id)}/handoff/`, { method: "POST" });
      if (!ok) throw new Error(data.error || "handoff failed");
      applyStatus(data.status);
    } catch (error) {
      humanButton.disabled = false;
      addNote("Sorry, we could not reach a person right now. Please try again.", { error: true });
    }
  }


  // --- feedback: thumbs on each answer, a rating of the conversation ---------------------------------

  /** Under an answer (its stored message id), "Helpful?" thumbs up/down; after a thumb is sent, an
   *  optional comment box. Sending again replaces the customer's earlier feedback on the answer. */
  function addFeedback(node, messageId) {
    if (!Number.isInteger(messageId) || node.querySelector(".feedback")) return;
    const status = el("span", { class: "feedback-status", role: "status" });
    const thumbs = [["up", "👍", "Helpful"], ["down", "👎", "Not helpful"]].map(([value, icon, label]) =>
      el("button", {
        class: "thumb", type: "button", text: icon, "aria-label": label, "aria-pressed": "false",
        "data-value": value, onclick: () => choose(value),
      }));
    const row = el("div", { class: "feedback", role: "group", "aria-label": "Was this answer helpful?" },
      [el("span", { text: "Helpful?", "aria-hidden": "true" }), ...thumbs, status]);
    node.append(row);
    let chosen = null;
    let commentForm = null;

    async function post(value, comment) {
      const path = `conversations/${encodeURIComponent(state.conversation.id)}/messages/${messageId}/feedback/`;
      const { ok } = await api(path, { method: "POST", body: comment ? { value, comment } : { value } });
      if (!ok) throw new Error("feedback refused");
    }

    async function choose(value) {
      for (const button of thumbs) button.disabled = true;
      status.textContent = "";
      try {
        await post(value, "");
        chosen = value;
        for (const button of thumbs) button.setAttribute("aria-pressed", String(button.dataset.value === value));
        openComment();
      } catch (error) {
        status.textContent = "Could not send your feedback. Please try again.";
      } finally {
        for (const button of thumbs) button.disabled = false;
      }
    }

    function openComment() {
      if (commentForm) {
        commentForm.querySelector("textarea").focus();
        return;
      }
      const box = el("textarea", { rows: "2", maxlength: feedbackMaxChars, "aria-label": "Tell us more (optional)",
        placeholder: "Tell us more (optional)" });
      const sendComment = el("button", { class: "small primary", type: "submit", text: "Send comment" });
      const skip = el("button", { class: "small", type: "button", text: "No comment", onclick: () => closeComment("Thanks for your feedback.") });
      commentForm = el("form", { class: "feedback-comment", onsubmit: (event) => { event.preventDefault(); submit(); } },
        [box, el("div", { class: "actions" }, [sendComment, skip])]);
      box.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
      });
      row.append(commentForm);
      box.focus();
      scrollToEnd();

      async function submit() {
        const comment = box.value.trim();
        if (!comment) { closeComment("Thanks for your feedback."); return; }
        sendComment.disabled = true;
        try {
          await post(chosen, comment);
          closeComment("Thanks for your feedback.");
        } catch (error) {
          status.textContent = "Could not send your comment. Please try again.";
          sendComment.disabled = false;
        }
      }
    }

    function closeComment(message) {
      if (commentForm) {
        commentForm.querySelector("textarea").value = "";
        commentForm.remove();
        commentForm = null;
      }
      status.textContent = message;
      const pressed = thumbs.find((button) => button.getAttribute("aria-pressed") === "true");
      (pressed || input).focus();
    }
  }

  let ratingCard = null;

  /** The end-of-conversation rating card (1-5 and an optional comment), at the end of the log. */
  function showRating() {
    if (!state.conversation) return;
    if (ratingCard && ratingCard.isConnected) {
      ratingCard.querySelector(".star").focus();
      return;
    }
    let rating = 0;
    const stars = [1, 2, 3, 4, 5].map((n) => el("button", {
      class: "star", type: "button", text: "★", "aria-label": `${n} out of 5`, "aria-pressed": "false",
      "data-rating": String(n), onclick: () => pick(n),
    }));
    const comment = el("textarea", { rows: "2", maxlength: feedbackMaxChars, "aria-label": "Comment (optional)",
      placeholder: "Comment (optional)" });
    const sendRating = el("button", { class: "small primary", type: "submit", text: "Send rating", disabled: true });
    const later = el("button", { class: "small", type: "button", text: "Not now", onclick: () => close() });
    const problem = el("span", { class: "feedback-status", role: "alert" });
    const starGroup = el("div", { class: "stars", role: "group", "aria-label": "Rating from 1 (poor) to 5 (excellent)" }, stars);
    starGroup.addEventListener("keydown", (event) => {
      const index = stars.indexOf(shadow.activeElement);
      if (index === -1) return;
      const step = { ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      stars[Math.min(4, Math.max(0, index + step))].focus();
    });
    const form = el("form", { class: "rating", "aria-label": "Rate this conversation", onsubmit: (event) => { event.preventDefault(); submit(); } }, [
      el("p", { text: "How would you rate this conversation?" }), starGroup, comment,
      el("div", { class: "actions" }, [sendRating, later]), problem,
    ]);
    const card = el("div", { class: "rating-card" }, [form]);
    ratingCard = card;
    messages.append(card);
    scrollToEnd();
    stars[0].focus();

    function pick(n) {
      rating = n;
      stars.forEach((star, i) => {
        star.classList.toggle("on", i < n);
        star.setAttribute("aria-pressed", String(i === n - 1));
      });
      sendRating.disabled = false;
    }

    async function submit() {
      if (!rating) return;
      sendRating.disabled = true;
      problem.textContent = "";
      try {
        const body = comment.value.trim() ? { rating, comment: comment.value.trim() } : { rating };
        const { ok } = await api(`conversations/${encodeURIComponent(state.conversation.id)}/rating/`, { method: "POST", body });
        if (!ok) throw new Error("rating refused");
      } catch (error) {
        problem.textContent = "Could not send your rating. Please try again.";
        sendRating.disabled = false;
        return;
      }
      const sent = rating;
      close();
      addNote(`Thanks for rating this conversation ${sent} out of 5.`);
    }

    function close() {
      rating = 0;
      comment.value = "";
      card.remove();
      if (ratingCard === card) ratingCard = null;
      input.focus();
    }
  }

  // --- start ---------------------------------------------------------------------------------------

  async function start() {
    document.body.append(host);
    rateButton.hidden = !state.conversation;
    if (!state.conversation) {
      greet();
      offerEarlier();
      return;
    }
    try {
      if (await loadTranscript()) connect();
    } catch (error) {
      greet();
      scheduleReconnect(false);
    }
  }

  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start, { once: true });
})();
