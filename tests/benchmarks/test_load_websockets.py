"""The load benchmark's customer (``benchmarks/load_websockets.py``, ``ask_timed``): how it reads the
websocket's frames and what it counts. A scripted socket and clock, no server, no database."""

from __future__ import annotations

import asyncio
import json

from benchmarks.load_websockets import Tally, ask_timed


class ScriptedSocket:
    """Answers each ``send`` with the next list of frames of ``replies``; records what was sent."""

    def __init__(self, replies: list[list[dict]]):
        self.replies = replies
        self.sent: list[dict] = []
        self.pending: list[str] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.pending.extend(json.dumps(frame) for frame in self.replies.pop(0))

    async def recv(self) -> str:
        return self.pending.pop(0)


def clock_of(*times: float):
    ticks = iter(times)
    return lambda: next(ticks)


def test_busy_then_rate_limited_then_answered_resends_the_question_and_times_from_the_first_send():
    # given a server that answers busy, then rate-limited, then streams an answer
    question = {"type": "chat.message", "text": "Do you ship to Canada?"}
    socket = ScriptedSocket([
        [{"type": "chat.busy", "retry_after_s": 2.0, "message": "busy"}],
        [{"type": "chat.rate_limited", "retry_after_s": 1.5, "message": "slow down"}],
        [{"type": "chat.token", "text": "Yes"}, {"type": "chat.token", "text": "."},
         {"type": "chat.citations", "citations": []},
         {"type": "chat.done", "abstained": False, "method": "generated", "text": "Yes."}],
    ])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    tally = Tally()
    # when the customer asks (clock: sent at 10.0 s, first token at 13.5 s)
    done = asyncio.run(ask_timed(socket, "Do you ship to Canada?", tally, clock=clock_of(10.0, 13.5), sleep=sleep))
    # then the same question was sent three times, after each reply's delay
    assert socket.sent == [question, question, question]
    assert slept == [2.0, 1.5]
    # and TTFT runs from the first send to the first token, the waits included
    assert done["ttft_ms"] == 3500.0
    assert (tally.asked, tally.completed, tally.busy, tally.rate_limited, tally.errors) == (1, 1, 1, 1, [])
    assert tally.ttft_ms == [3500.0]
    assert tally.methods == {"generated": 1}


def test_an_abstention_counts_as_declined_and_without_tokens_ttft_is_time_to_done():
    socket = ScriptedSocket([[{"type": "chat.done", "abstained": True, "method": "generated", "text": "Sorry"}]])
    tally = Tally()
    done = asyncio.run(ask_timed(socket, "What is the capital of France?", tally, clock=clock_of(1.0, 1.25)))
    assert done["ttft_ms"] == 250.0
    assert tally.methods == {"declined": 1}
    assert (tally.completed, tally.busy, tally.rate_limited, tally.errors) == (1, 0, 0, [])


def test_chat_error_is_an_error_and_nothing_else_is_counted():
    socket = ScriptedSocket([[{"type": "chat.error", "message": "something went wrong", "code": "internal"}]])
    tally = Tally()
    assert asyncio.run(ask_timed(socket, "Hello?", tally, clock=clock_of(0.0))) is None
    assert tally.errors == ["chat.error: something went wrong"]
    assert (tally.asked, tally.completed, tally.busy, tally.rate_limited, tally.ttft_ms) == (1, 0, 0, 0, [])


def test_an_answer_cut_after_its_first_token_says_so_in_the_callers_state():
    # given an answer that streams one token and then nothing more
    class StalledSocket(ScriptedSocket):
        async def recv(self) -> str:
            if self.pending:
                return self.pending.pop(0)
            await asyncio.Event().wait()  # never set: the answer stalls

    socket = StalledSocket([[{"type": "chat.token", "text": "Our"}]])
    tally, state = Tally(), {}

    async def cut_short():
        try:
            async with asyncio.timeout(0.05):
                await ask_timed(socket, "How long is the warranty?", tally, state=state)
        except TimeoutError:
            return "cut"

    # when the caller's deadline cuts it
    assert asyncio.run(cut_short()) == "cut"
    # then the caller knows a token had arrived, and nothing was completed or counted as an error
    assert state == {"first_token": True}
    assert (tally.asked, tally.completed, tally.errors, tally.ttft_ms) == (1, 0, [], [])
