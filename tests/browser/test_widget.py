"""The chat widget in real headless Chromium (Debian's ``chromium``, driven by Playwright) against
the real app: daphne serving ``config.asgi`` over the test database, the real embedding model, the
real GGUF model, the demo knowledge base ingested for real.

The fixtures (Chromium, the demo knowledge base, the live server, ``browse``) are in ``conftest.py``.

Each test drives the browser with Playwright's async API inside ``asyncio.run`` and checks the
database after it returns: the sync API would keep an event loop on the test's thread, where Django
refuses database calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import urlparse

import pytest

from chat.models import Conversation
from knowledge.models import Chunk
from tests.browser.pages import LAST_ANSWER_DONE, SHADOW, XSS, ask, open_widget, stored_conversation

# ``django_db`` makes pytest-django create the test database (the live server's); each test runs in a
# transaction of its own that is rolled back, while the module's knowledge base is committed.
pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


# --- tests -----------------------------------------------------------------------------------------


def test_demo_page_loads_the_widget_in_a_shadow_root_the_page_css_cannot_reach(browse):
    async def scenario(page, watch):
        # given the demo page, whose own CSS styles every button hot pink with a dashed red border
        launcher = page.get_by_role("button", name="Open Tidewater Help chat")
        seen = {
            "launcher visible": await launcher.is_visible(),
            "in shadow root": await page.evaluate(f"() => {SHADOW}.querySelector('.launcher') !== null"),
            "launcher colour": await launcher.evaluate("b => getComputedStyle(b).backgroundColor"),
            "launcher border": await launcher.evaluate("b => getComputedStyle(b).borderStyle"),
            "page button colour": await page.get_by_role("button", name="Shop the autumn collection").evaluate(
                "b => getComputedStyle(b).backgroundColor"),
        }
        # when it is opened
        panel = await open_widget(page)
        seen["panel visible"] = await panel.is_visible()
        seen["focus when open"] = await page.evaluate(f"() => {SHADOW}.activeElement.getAttribute('aria-label')")
        # and closed with Escape
        await page.keyboard.press("Escape")
        seen["panel hidden"] = await panel.is_hidden()
        seen["focus when closed"] = await page.evaluate(f"() => {SHADOW}.activeElement.className")
        seen["widget scripts"] = [re.sub(r"\.[0-9a-f]{12}\.js$", ".<hash>.js", urlparse(url).path)
                                  for url in watch.requests if "/static/widget/" in url]
        seen["errors"] = watch.errors
        return seen

    # then the launcher keeps its own look, the panel opens with the question box focused, and
    # Escape closes it with the focus back on the launcher; the script came from collectstatic's
    # manifest under its content-hashed name, as in production
    assert browse(scenario) == {
        "launcher visible": True,
        "in shadow root": True,
        "launcher colour": "rgb(15, 92, 110)",
        "launcher border": "none",
        "page button colour": "rgb(255, 105, 180)",
        "panel visible": True,
        "focus when open": "Your question",
        "panel hidden": True,
        "focus when closed": "launcher",
        "widget scripts": ["/static/widget/widget.<hash>.js"],
        "errors": [],
    }


def test_a_question_streams_an_answer_whose_citation_opens_its_passage(browse):
    async def scenario(page, watch):
        # given the open widget, recording every text the answer bubble shows while it streams
        await open_widget(page)
        await page.evaluate(f"""() => {{
          window.__shown = [];
          new MutationObserver(() => {{
            const streaming = {SHADOW}.querySelector('.msg.assistant[aria-busy] .body');
            if (streaming) window.__shown.push(streaming.textContent);
          }}).observe({SHADOW}.querySelector('.messages'), {{subtree: true, childList: true, characterData: true}});
        }}""")
        # when the customer asks about shipping
        await ask(page, "How long does shipping take?")
        bubble = page.locator("supportbot-widget .msg.assistant").last
        result = {"shown": await page.evaluate("() => window.__shown"),
                  "bubble": await bubble.locator(".body").text_content(), "frames": list(watch.frames)}
        citations = watch.frames[-1]["type"] == "chat.done" and watch.frames[-2].get("citations")
        if not citations:
            return result
        # and opens the first citation from the answer's source list
        first = citations[0]
        source_button = bubble.get_by_role("button", name=f"Source {first['n']}: {first['source_title']}").last
        result["source button"] = await source_button.text_content()
        await source_button.click()
        region = page.get_by_role("region", name=first["source_title"])
        await region.locator("mark").wait_for()
        result["passage title"] = await region.get_by_role("heading").text_content()
        result["highlighted"] = await region.locator("mark").text_content()
        result["passage text"] = await region.locator(".passage-body").text_content()
        # and goes back to the chat
        await region.get_by_role("button", name="Back to chat").click()
        result["passage hidden after back"] = await region.is_hidden()
        result["errors"] = watch.errors
        result["requests"] = list(watch.requests)
        result["stored"] = await stored_conversation(page)
        return result

    result = browse(scenario)

    # then the answer arrived as chat.token frames (checked sentences, or the quoted source sentence that
    # answers: the FAQ holds one), and the bubble showed each as it came
    frames = result["frames"]
    assert [frame["type"] for frame in frames][-2:] == ["chat.citations", "chat.done"]
    tokens = [frame["text"] for frame in frames if frame["type"] == "chat.token"]
    answer = frames[-1]["text"]
    assert len(tokens) >= 1 and "".join(tokens).strip() == answer
    assert "3 to 5 business days" in answer
    shown = [text for text in result["shown"] if text]
    assert len(set(shown)) >= 1 and all(answer.startswith(text.strip()) for text in shown)
    assert result["bubble"] == answer

    # and its first citation opened the cited chunk, highlighted, under its source's title
    citations = frames[-2]["citations"]
    assert citations, f"the answer cited nothing: {answer!r}"
    first = citations[0]
    chunk = Chunk.objects.select_related("source").get(pk=first["chunk_id"])
    assert result["source button"] == f"[{first['n']}] {chunk.source.title}"
    assert result["passage title"] == chunk.source.title
    assert result["highlighted"] == chunk.text
    assert chunk.text in result["passage text"]
    assert result["passage hidden after back"] is True
    assert result["errors"] == []
    # and the conversation's token appeared in no URL (HTTP API or websocket), while the socket that
    # streamed the answer was the conversation's (the server refuses it without the token)
    stored = result["stored"]
    assert [url for url in result["requests"] if stored["token"] in url or "token=" in url] == []
    assert any(url.endswith(f"/ws/chat/{stored['id']}/") for url in result["requests"])


def test_a_message_with_markup_renders_as_text(browse):
    async def scenario(page, watch):
        # when the customer sends HTML that would run script if it were parsed
        await open_widget(page)
        await ask(page, XSS)
        message = page.locator("supportbot-widget .msg.user .body").last
        return {
            "text": await message.text_content(),
            "visible": await message.is_visible(),
            "images in widget": await page.evaluate(f"() => {SHADOW}.querySelectorAll('img').length"),
            "images in page": await page.evaluate("() => document.querySelectorAll('img').length"),
            "dialogs": watch.dialogs,
            "requests for x": [url for url in watch.requests if url.rstrip("/").endswith("/x")],
            "errors": watch.errors,
        }

    # then it shows as the literal text, and nothing was made or run from it
    assert browse(scenario) == {
        "text": XSS, "visible": True, "images in widget": 0, "images in page": 0, "dialogs": [],
        "requests for x": [], "errors": [],
    }


def test_talk_to_a_human_marks_the_conversation_as_needing_a_human(browse):
    async def scenario(page, watch):
        # given a conversation with one answered question
        await open_widget(page)
        await ask(page, "Do you ship internationally?")
        # when the customer asks for a person
        await page.get_by_role("button", name="Talk to a human").first.click()
        await page.locator("supportbot-widget .note", has_text="We've asked a person to join.").wait_for()
        return {
            "conversation": (await stored_conversation(page))["id"],
            "button disabled": await page.get_by_role("button", name="Human requested").is_disabled(),
        }

    result = browse(scenario)

    # then the widget says so, and the conversation waits for an agent in the database
    assert result["button disabled"] is True
    assert Conversation.objects.get(pk=result["conversation"]).status == "needs_human"


def test_saying_yes_to_the_offer_of_a_person_hands_the_conversation_over(browse):
    async def scenario(page, watch):
        # given a question the store's pages do not answer: declined, with the offer of a person
        await open_widget(page)
        await ask(page, "What is the capital of France?")
        declined = await page.locator("supportbot-widget .msg.assistant").last.inner_text()
        # when the customer types yes
        box = page.get_by_role("textbox", name="Your question")
        await box.fill("Yes please")
        await box.press("Enter")
        await page.locator("supportbot-widget .note", has_text="We've asked a person to join.").wait_for()
        return {
            "declined": declined,
            "conversation": (await stored_conversation(page))["id"],
            "button disabled": await page.get_by_role("button", name="Human requested").is_disabled(),
            "assistant messages": await page.locator("supportbot-widget .msg.assistant").count(),
            "errors": watch.errors,
        }

    result = browse(scenario)

    # then the widget says a person was asked (no second decline), as the button would have
    assert "connect you with a person" in result["declined"]
    assert (result["button disabled"], result["assistant messages"], result["errors"]) == (True, 1, [])
    assert Conversation.objects.get(pk=result["conversation"]).status == "needs_human"


def test_the_conversation_survives_a_page_reload(browse):
    async def scenario(page, watch):
        # given an answered question
        await open_widget(page)
        await ask(page, "Do you ship internationally?")
        before = await page.locator("supportbot-widget .msg").all_text_contents()
        saved = await stored_conversation(page)
        # when the page is reloaded
        await page.reload()
        await open_widget(page)
        await page.locator("supportbot-widget .msg.assistant").first.wait_for()
        after = await page.locator("supportbot-widget .msg").all_text_contents()
        restored = await stored_conversation(page)
        # and another question is asked on the reconnected socket
        await ask(page, "How do I track my order?")
        count = await page.locator("supportbot-widget .msg").count()
        return before, saved, after, restored, count

    before, saved, after, restored, count = browse(scenario)

    # then the same conversation and its transcript came back, and the socket answers again
    assert restored == saved
    assert after == before and len(before) == 2
    assert count == 4
    assert Conversation.objects.get(pk=saved["id"]).messages.filter(role="user").count() == 2


# --- the widget's own behaviour, against a scripted websocket ----------------------------------------
# Playwright answers the widget's websocket itself (``page.route_web_socket``), so these tests can
# script what the real pipeline does only under load (chat.busy) or on network failures; HTTP still
# goes to the live server.


def test_busy_shows_retrying_and_sends_the_question_again_after_retry_after_s(browse):
    async def scenario(page, watch):
        received: list[tuple[float, dict]] = []

        def serve(ws):
            def on_message(message):
                frame = json.loads(message)
                received.append((time.monotonic(), frame))
                if len(received) == 1:  # the engine's queue is full the first time
                    ws.send(json.dumps({"type": "chat.busy", "retry_after_s": 1.5, "message": "busy"}))
                    return
                for piece in ["Ships in ", "3 to 5 days."]:
                    ws.send(json.dumps({"type": "chat.token", "text": piece}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 1, "abstained": False, "timings": {},
                                    "text": "Ships in 3 to 5 days."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        box = page.get_by_role("textbox", name="Your question")
        await box.fill("How long does shipping take?")
        await box.press("Enter")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="busy").wait_for()
        busy_text = await status.text_content()
        send_disabled_while_busy = await page.get_by_role("button", name="Send").is_disabled()
        await page.wait_for_function(LAST_ANSWER_DONE, timeout=30_000)
        return {
            "busy status": busy_text,
            "send disabled while busy": send_disabled_while_busy,
            "frames sent": [frame for _, frame in received],
            "retry after s": round(received[1][0] - received[0][0], 1) if len(received) > 1 else None,
            "answers": await page.locator("supportbot-widget .msg.assistant .body").all_text_contents(),
            "questions": await page.locator("supportbot-widget .msg.user .body").all_text_contents(),
            "status hidden after answer": await status.is_hidden(),
        }

    result = browse(scenario)

    # then the customer saw "busy, retrying", the same question went again after about 1.5 s, and the
    # answer shows once under the question shown once
    assert result["busy status"] == "The assistant is busy, retrying in 2 s…"
    assert result["send disabled while busy"] is True
    question = {"type": "chat.message", "text": "How long does shipping take?"}
    assert result["frames sent"] == [question, question]
    assert 1.4 <= result["retry after s"] <= 3.0
    assert result["answers"] == ["Ships in 3 to 5 days."]
    assert result["questions"] == ["How long does shipping take?"]
    assert result["status hidden after answer"] is True


def test_rate_limited_shows_the_delay_and_sends_the_question_again_after_it(browse):
    async def scenario(page, watch):
        received: list[tuple[float, dict]] = []

        def serve(ws):
            def on_message(message):
                frame = json.loads(message)
                received.append((time.monotonic(), frame))
                if len(received) == 1:  # past the conversation's questions-per-minute limit
                    ws.send(json.dumps({"type": "chat.rate_limited", "retry_after_s": 1.2, "message": "slow down"}))
                    return
                ws.send(json.dumps({"type": "chat.token", "text": "Ships in 3 to 5 days."}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 1, "abstained": False, "timings": {},
                                    "text": "Ships in 3 to 5 days."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        box = page.get_by_role("textbox", name="Your question")
        await box.fill("How long does shipping take?")
        await box.press("Enter")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="quickly").wait_for()
        limited_text = await status.text_content()
        await page.wait_for_function(LAST_ANSWER_DONE, timeout=30_000)
        return {
            "status": limited_text,
            "frames sent": [frame for _, frame in received],
            "answers": await page.locator("supportbot-widget .msg.assistant .body").all_text_contents(),
            "questions": await page.locator("supportbot-widget .msg.user .body").all_text_contents(),
            "errors": watch.errors,
        }

    result = browse(scenario)

    # then the customer saw the delay, and the same question went once more, answered once
    question = {"type": "chat.message", "text": "How long does shipping take?"}
    assert result == {
        "status": "You're sending questions quickly; yours goes in 2 s…",
        "frames sent": [question, question],
        "answers": ["Ships in 3 to 5 days."],
        "questions": ["How long does shipping take?"],
        "errors": [],
    }


def test_a_dropped_socket_reconnects_and_the_next_question_goes_through(browse):
    async def scenario(page, watch):
        connections = []

        def serve(ws):
            connections.append(ws)

            def on_message(message):
                ws.send(json.dumps({"type": "chat.token", "text": "Back online."}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 2, "abstained": False, "timings": {},
                                    "text": "Back online."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        await ask(page, "first question")
        # when the server drops the connection
        await connections[0].close(code=1012, reason="restart")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="reconnecting").wait_for()
        # then the widget reconnects by itself and the next question is answered on the new socket
        await page.wait_for_function(f"() => {SHADOW}.querySelector('.status').hidden", timeout=30_000)
        await ask(page, "second question")
        return len(connections), await page.locator("supportbot-widget .msg.assistant .body").all_text_contents()

    connections, answers = browse(scenario)

    assert connections == 2
    # the transcript reloaded from the server on reconnect (the scripted socket stored nothing), then
    # the second answer streamed in
    assert answers == ["Back online."]


# --- customer feedback: thumbs on answers, the conversation's rating ----------------------------------


def test_unavailable_puts_the_question_back_and_reconnects_after_the_servers_delay(browse):
    async def scenario(page, watch):
        connections = []

        def serve(ws):
            connections.append(ws)

            def on_message(message):
                if len(connections) == 1:  # Redis is down: what chat.consumers sends, then its close
                    ws.send(json.dumps({"type": "chat.unavailable", "retry_after_s": 1,
                                        "message": "The chat is briefly unavailable; reconnecting in a moment."}))
                    asyncio.ensure_future(ws.close(code=4503))
                    return
                ws.send(json.dumps({"type": "chat.done", "message_id": 2, "abstained": False, "timings": {},
                                    "text": "Back online."}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        box = page.get_by_role("textbox", name="Your question")
        await box.fill("How long does shipping take?")
        await box.press("Enter")
        status = page.locator("supportbot-widget .status")
        await status.filter(has_text="unavailable").wait_for()
        seen = {"status": await status.text_content(), "input": await box.input_value(),
                "notes": await page.locator("supportbot-widget .note.error").all_text_contents()}
        # the widget reconnects by itself after the delay; the question is sent again by the customer
        await page.wait_for_function(f"() => {SHADOW}.querySelector('.status').hidden", timeout=30_000)
        await box.press("Enter")
        await page.wait_for_function(LAST_ANSWER_DONE, timeout=30_000)
        seen["connections"] = len(connections)
        seen["answers"] = await page.locator("supportbot-widget .msg.assistant .body").all_text_contents()
        seen["errors"] = watch.errors
        return seen

    # then the customer is told, the unanswered question is back in the box, and once reconnected it
    # is answered
    assert browse(scenario) == {
        "status": "The chat is briefly unavailable, reconnecting in 1 s…",
        "input": "How long does shipping take?",
        "notes": ["The chat is briefly unavailable; reconnecting in a moment."],
        "connections": 2,
        "answers": ["Back online."],
        "errors": [],
    }


def test_thumbs_down_with_a_comment_is_stored_for_that_answer_using_the_keyboard_only(browse):
    from chat.models import AnswerFeedback

    comment = f"Wrong country list {XSS}"

    async def scenario(page, watch):
        # given an answered question
        await open_widget(page)
        await ask(page, "Do you ship internationally?")
        answer = page.locator("supportbot-widget .msg.assistant").last
        # when the customer tabs to "Not helpful" and presses Enter, types a comment and presses Enter
        down = answer.get_by_role("button", name="Not helpful")
        await down.focus()
        await page.keyboard.press("Enter")
        box = answer.get_by_role("textbox", name="Tell us more (optional)")
        await box.wait_for()
        focused_after_thumb = await page.evaluate(f"() => {SHADOW}.activeElement.getAttribute('aria-label')")
        await page.keyboard.type(comment)
        await page.keyboard.press("Enter")
        await answer.locator(".feedback-status", has_text="Thanks for your feedback.").wait_for()
        return {
            "message id": next(f["message_id"] for f in watch.frames if f["type"] == "chat.done"),
            "conversation": (await stored_conversation(page))["id"],
            "focused after thumb": focused_after_thumb,
            "pressed": {name: await answer.get_by_role("button", name=name, exact=True).get_attribute("aria-pressed")
                        for name in ("Helpful", "Not helpful")},
            "comment boxes left": await answer.locator("textarea").count(),
            "focused after sending": await page.evaluate(f"() => {SHADOW}.activeElement.getAttribute('aria-label')"),
            "feedback posts": [url for url in watch.requests if url.endswith("/feedback/")],
            "images": await page.evaluate(f"() => {SHADOW}.querySelectorAll('img').length"),
            "dialogs": watch.dialogs,
            "errors": watch.errors,
        }

    result = browse(scenario)

    # then the thumb was sent at once and the comment with it afterwards; the box is gone and the
    # focus back on the pressed thumb
    message_id, conversation = result.pop("message id"), result.pop("conversation")
    url = f"/api/conversations/{conversation}/messages/{message_id}/feedback/"
    assert [u.split("127.0.0.1", 1)[1].split("/", 1)[1] for u in result.pop("feedback posts")] == [url[1:], url[1:]]
    assert result == {
        "focused after thumb": "Tell us more (optional)",
        "pressed": {"Helpful": "false", "Not helpful": "true"},
        "comment boxes left": 0,
        "focused after sending": "Not helpful",
        "images": 0,
        "dialogs": [],
        "errors": [],
    }
    # and the database holds exactly that feedback on that answer
    assert list(AnswerFeedback.objects.values_list("message_id", "message__conversation_id", "value", "comment")) == [
        (message_id, Conversation.objects.get(pk=conversation).pk, "down", comment)]


def test_a_resolved_conversation_offers_the_rating_which_is_sent_with_the_keyboard(browse):
    from chat.models import ConversationRating

    async def scenario(page, watch):
        # given a scripted socket: one answer, then an agent resolves the conversation
        def serve(ws):
            def on_message(message):
                ws.send(json.dumps({"type": "chat.token", "text": "Ships in 3 days."}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": None, "abstained": False, "timings": {},
                                    "text": "Ships in 3 days."}))
                ws.send(json.dumps({"type": "chat.status", "status": "resolved", "message": "resolved"}))

            ws.on_message(on_message)

        await page.route_web_socket("**/ws/chat/**", serve)
        await open_widget(page)
        rate_hidden_before = await page.get_by_role("button", name="Rate this conversation").is_hidden()
        await ask(page, "How long does shipping take?")
        # when the rating card appears by itself, and the customer picks 4 with the arrow keys, Enter,
        # then Tab to the comment, types it, and sends
        card = page.get_by_role("form", name="Rate this conversation")
        await card.wait_for()
        focused = await page.evaluate(f"() => {SHADOW}.activeElement.getAttribute('aria-label')")
        for _ in range(3):
            await page.keyboard.press("ArrowRight")
        await page.keyboard.press("Enter")
        pressed = [await card.get_by_role("button", name=f"{n} out of 5").get_attribute("aria-pressed") for n in range(1, 6)]
        for _ in range(2):  # star 5, then the comment
            await page.keyboard.press("Tab")
        await page.keyboard.type("Quick and friendly")
        await card.get_by_role("button", name="Send rating").click()
        await page.locator("supportbot-widget .note", has_text="Thanks for rating this conversation 4 out of 5.").wait_for()
        return {
            "conversation": (await stored_conversation(page))["id"],
            "rate button hidden before": rate_hidden_before,
            "rate button visible after": await page.get_by_role("button", name="Rate this conversation").is_visible(),
            "focused when offered": focused,
            "pressed": pressed,
            "cards left": await page.locator("supportbot-widget .rating-card").count(),
            "errors": watch.errors,
        }

    result = browse(scenario)

    # then the rating was offered with the focus on the first star, sent, and the card cleared away
    conversation = result.pop("conversation")
    assert result == {
        "rate button hidden before": True,
        "rate button visible after": True,
        "focused when offered": "1 out of 5",
        "pressed": ["false", "false", "false", "true", "false"],
        "cards left": 0,
        "errors": [],
    }
    assert list(ConversationRating.objects.values_list("conversation_id", "rating", "comment")) == [
        (Conversation.objects.get(pk=conversation).pk, 4, "Quick and friendly")]


def test_the_longest_question_and_comment_come_from_the_server_not_a_copy_in_the_widget(browse):
    async def scenario(page, watch):
        received: list[dict] = []

        def serve(ws):
            def on_message(message):
                received.append(json.loads(message))
                ws.send(json.dumps({"type": "chat.token", "text": "Yes."}))
                ws.send(json.dumps({"type": "chat.citations", "citations": []}))
                ws.send(json.dumps({"type": "chat.done", "message_id": 1, "abstained": False, "timings": {},
                                    "text": "Yes."}))

            ws.on_message(on_message)

        async def smaller_limits(route):
            # the server's answer to "start a conversation", as if WIDGET_MESSAGE_MAX_CHARS were 30 and
            # FEEDBACK_COMMENT_MAX_CHARS 40
            response = await route.fetch()
            await route.fulfill(response=response, json={**(await response.json()), "message_max_chars": 30,
                                                         "feedback_comment_max_chars": 40})

        async def feedback_stored(route):
            # the scripted answer (message 1) is not in the database: the server's answer, as if it were
            await route.fulfill(json={"message_id": 1, "value": "up", "comment": ""})

        await page.route_web_socket("**/ws/chat/**", serve)
        await page.route("**/api/conversations/", smaller_limits)
        await page.route("**/feedback/", feedback_stored)
        # given a conversation started by a first question
        await open_widget(page)
        await ask(page, "Do you ship to Canada?")
        # when the customer sends a question of 31 characters
        await page.evaluate(f"() => {{ {SHADOW}.querySelector('textarea#supportbot-input').value = 'x'.repeat(31); }}")
        await page.get_by_role("textbox", name="Your question").press("Enter")
        await page.locator("supportbot-widget .note", has_text="Please keep messages under 30 characters.").wait_for()
        # and when the customer finds the answer helpful, which opens the comment box
        answer = page.locator("supportbot-widget .msg.assistant").last
        await answer.get_by_role("button", name="Helpful", exact=True).click()
        comment_box = answer.get_by_role("textbox", name="Tell us more (optional)")
        await comment_box.wait_for()
        return {
            "frames sent": received,
            "input maxlength": await page.evaluate(f"() => {SHADOW}.querySelector('textarea#supportbot-input').maxLength"),
            "comment maxlength": await comment_box.evaluate("box => box.maxLength"),
            "questions": await page.locator("supportbot-widget .msg.user .body").all_text_contents(),
            "errors": watch.errors,
        }

    # then the widget refused it with the server's number, before sending anything, and the comment
    # box holds at most the server's number of characters
    assert browse(scenario) == {
        "frames sent": [{"type": "chat.message", "text": "Do you ship to Canada?"}], "input maxlength": 30,
        "comment maxlength": 40, "questions": ["Do you ship to Canada?"], "errors": [],
    }
