"""The agent desk end to end, in real headless Chromium with one browser context per person: a customer
(the widget on the demo page), agent alice and agent bob, against daphne serving the project on the test
database, with the real embedding model and the real GGUF model answering.

One scenario, in order:

1. alice signs in through the login page and opens the inbox (live over ``/ws/agent/``);
2. the customer asks through the widget; the conversation appears in alice's open inbox, no reload;
3. alice opens it, takes it over and replies; the customer's widget shows that a person joined and
   shows the reply;
4. the customer writes HTML that would run script; alice's transcript and inbox show it as text;
5. alice corrects the assistant's earlier answer (a supporting chunk, a reason);
6. bob signs in and approves it; ``manage.py export_training_data`` writes it.

The fixtures (Chromium, the demo knowledge base, the live server) are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from django.core.management import call_command

from chat import agent_services
from chat.models import Conversation, Message
from tests.browser.pages import CHROMIUM_ARGS, XSS, PageWatch, ask, open_widget, save_pages, stored_conversation
from tests.dashboard.conftest import make_agent
from tuning.models import Correction

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

QUESTION = "Do you ship internationally?"
REPLY = "Hi, I'm Alice from support. We ship to Canada, the UK and the EU."
CORRECTED = "Yes: we ship to Canada, the United Kingdom and the European Union in 7 to 14 business days [1]."
LIVE_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def agents(demo_knowledge_base, django_db_blocker) -> dict[str, str]:
    """Agents alice and bob (the "Agents" group, not staff), committed for the live server; their
    passwords by username. The knowledge-base fixture removes them afterwards."""
    with django_db_blocker.unblock():
        for name in ("alice", "bob"):
            make_agent(name)  # password "pw-<name>"
    return {"alice": "pw-alice", "bob": "pw-bob"}


async def sign_in(page, base_url: str, path: str, username: str, password: str) -> str:
    """Open ``path`` anonymously, follow the redirect to the login page, sign in; returns the URL of
    the login page that was shown."""
    await page.goto(base_url + path)
    login_url = page.url
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(base_url + path)
    return login_url


async def wait_live(page) -> None:
    """Wait until the page's agent websocket is open (the header's indicator says "live")."""
    await page.locator("#live.on").wait_for(timeout=LIVE_TIMEOUT_MS)


def test_customer_agent_takeover_correction_review_and_export(chromium_path, live_server_url, agents, tmp_path):
    base = live_server_url

    async def scenario():
        from playwright.async_api import async_playwright

        seen: dict = {}
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                customer_context, alice_context, bob_context = [
                    await browser.new_context(viewport={"width": 1200, "height": 800}) for _ in range(3)]
                customer, inbox = await customer_context.new_page(), await alice_context.new_page()
                customer_watch, inbox_watch = PageWatch(customer), PageWatch(inbox)
                pages = {"customer": customer, "alice-inbox": inbox}
                try:
                    return await steps(browser, customer, inbox, customer_watch, inbox_watch, alice_context,
                                       bob_context, pages, seen)
                except Exception:
                    saved = await save_pages(pages, tmp_path / "pages")
                    print(f"pages at the failure: {tmp_path / 'pages'}: {saved}")
                    raise
            finally:
                await browser.close()

    async def steps(browser, customer, inbox, customer_watch, inbox_watch, alice_context, bob_context, pages, seen):
        # 1. alice signs in through the login page and opens the inbox, live
        seen["login page"] = (await sign_in(inbox, base, "/dashboard/", "alice", agents["alice"])).removeprefix(base)
        await wait_live(inbox)
        await inbox.evaluate("() => { window.__sameDocument = true; }")
        seen["inbox rows before"] = await inbox.locator("#inbox tr.conversation").count()

        # 2. the customer asks through the widget on the demo page
        await customer.goto(base + "/")
        await open_widget(customer)
        await ask(customer, QUESTION)
        conversation_id = (await stored_conversation(customer))["id"]
        seen["conversation"] = conversation_id
        seen["answer"] = await customer.locator("supportbot-widget .msg.assistant .body").last.text_content()
        # ... and it appears in alice's open inbox, with its question, without a reload
        row = inbox.locator(f'#inbox tr.conversation[data-conversation-id="{conversation_id}"]')
        await row.get_by_role("link", name=QUESTION).wait_for(timeout=LIVE_TIMEOUT_MS)
        seen["inbox row state"] = await row.locator(".badge").text_content()
        seen["inbox not reloaded"] = await inbox.evaluate("() => window.__sameDocument === true")

        # 3. alice opens the conversation (another tab), takes it over and replies
        view = await alice_context.new_page()
        pages["alice-view"] = view
        view_watch = PageWatch(view)
        await view.goto(base + await row.get_by_role("link", name=QUESTION).get_attribute("href"))
        await wait_live(view)
        await view.get_by_role("button", name="Take over").click()
        await view.locator(".flash", has_text="You have taken this conversation.").wait_for()
        seen["status after take"] = await view.locator("#conversation-status").text_content()
        joined = customer.locator("supportbot-widget .note", has_text="A support agent is in this conversation.")
        await joined.wait_for(timeout=LIVE_TIMEOUT_MS)
        seen["customer status line"] = await customer.locator("supportbot-widget .status").text_content()
        await wait_live(view)
        await view.get_by_label("Reply to the customer").fill(REPLY)
        await view.get_by_role("button", name="Send", exact=True).click()
        reply = customer.locator("supportbot-widget .msg.agent .body")
        await reply.wait_for(timeout=LIVE_TIMEOUT_MS)
        seen["customer sees reply"] = await reply.text_content()
        seen["reply author label"] = await customer.locator("supportbot-widget .msg.agent .who").text_content()

        # 4. the customer writes markup; it shows as text in alice's transcript and inbox, live (and
        # the answer's retrieved chunks, which alice opened, stay open through the refresh)
        await wait_live(view)
        await view.locator("#transcript li.msg.assistant details summary").click()
        box = customer.get_by_role("textbox", name="Your question")
        await box.fill(XSS)
        await box.press("Enter")
        customer_line = customer.locator("supportbot-widget .status", has_text="A support agent will answer here.")
        await customer_line.wait_for(timeout=LIVE_TIMEOUT_MS)
        xss_in_view = view.locator("#transcript .msg.user .text", has_text=XSS)
        await xss_in_view.wait_for(timeout=LIVE_TIMEOUT_MS)
        seen["transcript shows"] = await xss_in_view.text_content()
        seen["chunks still open"] = await view.locator("#transcript li.msg.assistant details").evaluate("d => d.open")
        xss_in_inbox = row.locator(".muted", has_text=XSS)
        await xss_in_inbox.wait_for(timeout=LIVE_TIMEOUT_MS)
        seen["inbox shows"] = await xss_in_inbox.text_content()
        seen["images in dashboard"] = [await view.locator("img").count(), await inbox.locator("img").count()]

        # 5. alice corrects the assistant's answer: one supporting chunk, a reason
        answer_item = view.locator("#transcript li.msg.assistant").first
        await answer_item.get_by_role("link", name="Correct this answer").click()
        await view.get_by_role("heading", name="Correct an answer").wait_for()
        chunks = view.locator("fieldset input[name=chunk]")
        for index in range(await chunks.count()):
            await chunks.nth(index).uncheck()
        faq_chunk = view.locator("label.chunk", has_text="Do you ship internationally?").first
        await faq_chunk.locator("input").check()
        seen["picked chunk"] = int(await faq_chunk.locator("input").get_attribute("value"))
        await view.get_by_label("Reason").select_option(label="Wrong fact")
        await view.get_by_label("Corrected answer").fill(CORRECTED)
        await view.get_by_role("button", name="Save correction").click()
        await view.locator(".flash", has_text="Correction saved; a second agent will review it.").wait_for()
        await view.goto(base + "/dashboard/corrections/")
        seen["author sees"] = await view.locator("tr[data-correction-id] .muted", has_text="awaiting").text_content()

        # 6. bob signs in and approves it
        bob = await bob_context.new_page()
        pages["bob"] = bob
        bob_watch = PageWatch(bob)
        await sign_in(bob, base, "/dashboard/corrections/", "bob", agents["bob"])
        correction_row = bob.locator("tr[data-correction-id]", has_text=CORRECTED[:60])
        seen["correction id"] = int(await correction_row.get_attribute("data-correction-id"))
        await correction_row.get_by_role("button", name="Approve").click()
        await bob.locator(".flash", has_text=f"Correction {seen['correction id']} approved.").wait_for()

        seen["customer frames"] = [f for f in customer_watch.frames if f["type"] in ("chat.status", "chat.agent_message")]
        seen["dialogs"] = customer_watch.dialogs + inbox_watch.dialogs + view_watch.dialogs + bob_watch.dialogs
        seen["errors"] = customer_watch.errors + inbox_watch.errors + view_watch.errors + bob_watch.errors
        return seen

    seen = asyncio.run(scenario())
    conversation = Conversation.objects.get(pk=seen.pop("conversation"))
    answer = conversation.messages.get(role="assistant")

    # then: alice signed in on the dashboard's login page; the conversation arrived live in her inbox
    assert seen.pop("login page") == "/accounts/login/?next=/dashboard/"
    assert seen.pop("inbox rows before") == 0
    assert (seen.pop("inbox row state"), seen.pop("inbox not reloaded")) == ("Bot answering", True)
    assert seen.pop("answer") == answer.text
    # the customer saw a person join, then the reply, as the agent wrote it
    agent_message = conversation.messages.get(role="agent")
    assert seen.pop("customer frames") == [
        {"type": "chat.status", "status": "agent", "message": agent_services.CUSTOMER_JOINED_MESSAGE},
        {"type": "chat.agent_message", "message_id": agent_message.pk, "text": REPLY,
         "created_at": agent_message.created_at.isoformat()},
    ]
    assert (seen.pop("status after take"), seen.pop("customer status line")) == (
        "Agent answering", "A support agent is in this conversation.")
    assert (seen.pop("customer sees reply"), seen.pop("reply author label")) == (REPLY, "Support agent")
    # the markup showed as text, made no element and ran nothing
    assert (seen.pop("transcript shows"), seen.pop("inbox shows")) == (XSS, XSS)
    assert seen.pop("images in dashboard") == [0, 0]
    assert seen.pop("chunks still open") is True
    assert list(conversation.messages.filter(role__in=["user", "agent"]).values_list("role", "text")) == [
        ("user", QUESTION), ("agent", REPLY), ("user", XSS)]
    # alice's correction, approved by bob, with the chunk she picked and the reason she tagged
    correction = Correction.objects.get(pk=seen.pop("correction id"))
    picked = seen.pop("picked chunk")
    assert seen.pop("author sees") == "awaiting another reviewer"
    assert (correction.message_id, correction.author.username, correction.reviewer.username, correction.status,
            correction.reason, correction.corrected_answer, correction.question, correction.original_answer,
            correction.stale) == (answer.pk, "alice", "bob", "approved", "wrong_fact", CORRECTED, QUESTION, answer.text, False)
    assert [chunk["chunk_id"] for chunk in correction.supporting_chunks] == [picked]
    assert [chunk["chunk_id"] for chunk in correction.shown_chunks] == [entry["chunk_id"] for entry in answer.retrieval[:3]]
    assert (seen.pop("dialogs"), seen.pop("errors")) == ([], [])
    assert seen == {}

    # and the export writes it as a chat record ending with the corrected answer
    output = tmp_path / "train.jsonl"
    call_command("export_training_data", output=str(output))
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [(r["metadata"]["correction_id"], r["metadata"]["message_id"], r["metadata"]["reason"]) for r in records] == [
        (correction.pk, answer.pk, "wrong_fact")]
    # (its marker names the picked chunk's place among the example's sources, which the recipe shuffles)
    assert picked in records[0]["metadata"]["chunk_ids"]
    n = records[0]["metadata"]["chunk_ids"].index(picked) + 1
    assert records[0]["messages"][-1] == {"role": "assistant", "content": CORRECTED.replace("[1]", f"[{n}]")}
    assert f"Question: {QUESTION}" in records[0]["messages"][-2]["content"]
    assert Message.objects.filter(conversation=conversation, role="system").count() == 1  # "alice joined ..."


# --- the live inbox's own behaviour -------------------------------------------------------------------


async def signed_in_inbox(browser, base: str, agents: dict):
    """A new context with alice signed in; returns (context, page on the inbox, its ``PageWatch``)."""
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    watch = PageWatch(page)
    await sign_in(page, base, "/dashboard/", "alice", agents["alice"])
    return context, page, watch


def run_in_browser(chromium_path, steps):
    """``asyncio.run`` of ``await steps(browser)`` with a fresh headless Chromium."""

    async def session():
        from playwright.async_api import async_playwright

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                return await steps(browser)
            finally:
                await browser.close()

    return asyncio.run(session())


def test_a_conversation_started_while_the_inbox_socket_was_down_shows_once_it_reconnects(
        chromium_path, live_server_url, agents):
    base = live_server_url

    async def steps(browser):
        # given alice's inbox whose first agent socket is cut off from the server (it opens, but hears
        # nothing), later ones reach the server
        connections = []

        def route(ws):
            connections.append(ws)
            if len(connections) > 1:
                ws.connect_to_server()

        context = await browser.new_context(viewport={"width": 1200, "height": 800})
        page = await context.new_page()
        watch = PageWatch(page)
        await page.route_web_socket("**/ws/agent/", route)
        await page.add_init_script(
            "window.__refreshes = 0; document.addEventListener('dashboard:refreshed', () => { window.__refreshes += 1; });")
        await sign_in(page, base, "/dashboard/", "alice", agents["alice"])
        await wait_live(page)
        await page.wait_for_function("() => window.__refreshes === 1")  # the catch-up when it opened
        await page.evaluate("() => { window.__sameDocument = true; }")
        # when a customer starts a conversation meanwhile and writes in it (the inbox lists only
        # conversations with a message)
        started = await (await page.request.post(base + "/api/conversations/", data={"collection": "default"})).json()
        await asyncio.to_thread(lambda: Message.objects.create(
            conversation_id=started["id"], role=Message.Role.USER, text="Is my tent on its way?"))
        row = page.locator(f'#inbox tr.conversation[data-conversation-id="{started["id"]}"]')
        await page.wait_for_timeout(1000)
        missed = await row.count()
        # and the socket drops and reconnects
        await connections[0].close(code=1012, reason="restart")
        await row.wait_for(timeout=LIVE_TIMEOUT_MS)
        return {"rows while cut off": missed, "connections": len(connections),
                "same document": await page.evaluate("() => window.__sameDocument === true"),
                "row text": await row.get_by_role("link").text_content(), "errors": watch.errors}

    # then the inbox caught up as soon as it was live again, without a reload
    assert run_in_browser(chromium_path, steps) == {
        "rows while cut off": 0, "connections": 2, "same document": True, "row text": "Is my tent on its way?",
        "errors": []}


def test_signing_out_in_another_tab_turns_the_live_inbox_into_the_login_page(chromium_path, live_server_url, agents):
    base = live_server_url

    async def steps(browser):
        # given alice's live inbox, and a second tab of hers
        context, inbox, watch = await signed_in_inbox(browser, base, agents)
        await wait_live(inbox)
        other = await context.new_page()
        await other.goto(base + "/dashboard/analytics/")
        # when she signs out in the other tab, and then a conversation starts and asks for a human
        await other.get_by_role("button", name="Sign out").click()
        await other.wait_for_url(base + "/accounts/login/")
        started = await (await inbox.request.post(base + "/api/conversations/", data={"collection": "default"})).json()
        # (a new conversation reaches the inbox with its first event: here the customer asks for a human)
        await inbox.request.post(f"{base}/api/conversations/{started['id']}/handoff/",
                                 headers={"X-Conversation-Token": started["token"]})
        # then the inbox page shows the login page (not the login form inside the inbox's list)
        await inbox.wait_for_url(base + "/accounts/login/?next=/dashboard/", timeout=LIVE_TIMEOUT_MS)
        return {"heading": await inbox.get_by_role("heading").first.text_content(),
                "inbox lists": await inbox.locator("#inbox").count(), "errors": watch.errors}

    assert run_in_browser(chromium_path, steps) == {"heading": "Sign in", "inbox lists": 0, "errors": []}


def test_a_burst_of_inbox_events_is_coalesced_into_few_refetches_and_the_last_change_shows(
        chromium_path, live_server_url, agents):
    from channels.layers import get_channel_layer

    from chat.notifications import AGENTS_CHANNEL_GROUP, inbox_event

    base = live_server_url

    async def steps(browser):
        # given alice's live inbox, whose fetches of the inbox list are recorded (browser clock, ms)
        context = await browser.new_context(viewport={"width": 1200, "height": 800})
        page = await context.new_page()
        watch = PageWatch(page)
        await page.add_init_script("""
            window.__inboxFetches = [];
            const original = window.fetch;
            window.fetch = (url, ...rest) => {
              if (String(url).includes('/dashboard/inbox/list/')) window.__inboxFetches.push(performance.now());
              return original(url, ...rest);
            };
            window.__refreshes = 0;
            document.addEventListener('dashboard:refreshed', () => { window.__refreshes += 1; });""")
        await sign_in(page, base, "/dashboard/", "alice", agents["alice"])
        await wait_live(page)
        await page.wait_for_function("() => window.__refreshes === 1")  # the catch-up when it opened
        # when 20 changes are announced over 2 s (as a busy hour's messages do), the last one a new
        # conversation's first message
        started = await (await page.request.post(base + "/api/conversations/", data={"collection": "default"})).json()
        layer = get_channel_layer()
        for i in range(20):
            if i == 19:
                await asyncio.to_thread(lambda: Message.objects.create(
                    conversation_id=started["id"], role=Message.Role.USER, text="Where is my kayak?"))
            await layer.group_send(AGENTS_CHANNEL_GROUP, inbox_event(started["id"], "message"))
            await asyncio.sleep(0.1)
        row = page.locator(f'#inbox tr.conversation[data-conversation-id="{started["id"]}"]')
        await row.wait_for(timeout=LIVE_TIMEOUT_MS)
        await page.wait_for_timeout(2000)  # any fetch still due has started by now
        fetches = await page.evaluate("() => window.__inboxFetches")
        return {"fetches": fetches, "row text": await row.get_by_role("link").text_content(), "errors": watch.errors}

    seen = run_in_browser(chromium_path, steps)
    # then the catch-up and the burst cost at most 4 fetches in all (a fetch per 150 ms quiet gap was 11
    # here), never two within MIN_INTERVAL_MS (1500 ms) of each other, and the last change is shown
    fetches = seen.pop("fetches")
    assert 2 <= len(fetches) <= 4, fetches
    assert min(b - a for a, b in zip(fetches, fetches[1:])) >= 1490, fetches
    assert seen == {"row text": "Where is my kayak?", "errors": []}
