"""Steady chat traffic from the real ``openai`` client: a fixed number of client threads, each
sending its next request as soon as the last one returned (a closed loop).

Chat completions when the model has a chat template (SmolLM2), plain completions otherwise
(the reference model has none). The client never retries (``max_retries=0``): a request the
server failed or dropped is counted as a failure, not hidden by a second try.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Suggest a name for a small coffee shop.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "What is the difference between weather and climate?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish and German.",
)
CODE_PROMPTS = ("import os\nimport sys\n", "def main():\n    ", "for i in range(10):\n", "class A:")


@dataclass(frozen=True)
class Completion:
    start_s: float  # seconds since the load's clock started
    end_s: float
    ok: bool
    output_tokens: int
    error: str = ""


class ChatLoad:
    """``clients`` threads sending requests to ``api`` (``http://host:port``) until ``close``
    (none: only ``request`` calls)."""

    def __init__(
        self, api: str, model: str, chat: bool, clients: int, max_tokens: int, start: float
    ):
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=300)
        self.model = model
        self.chat = chat
        self.max_tokens = max_tokens
        self.start = start
        self.completions: list[Completion] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"chat-{i}", daemon=True)
            for i in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def request(self, n: int) -> int:
        """Sends request ``n`` (from this thread); its output tokens."""
        if self.chat:
            question = QUESTIONS[n % len(QUESTIONS)]
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": question}],
                max_tokens=self.max_tokens,
                temperature=0.7,
                seed=n,
            )
        else:
            response = self.client.completions.create(
                model=self.model,
                prompt=CODE_PROMPTS[n % len(CODE_PROMPTS)],
                max_tokens=self.max_tokens,
                temperature=0.7,
                seed=n,
            )
        if not response.choices:
            raise RuntimeError("a response without choices")
        return response.usage.completion_tokens

    def _loop(self, client: int) -> None:
        n = client
        while not self._stop.is_set():
            began = time.monotonic() - self.start
            try:
                tokens, error = self.request(n), ""
            except Exception as e:  # every failure counts; the load goes on
                tokens, error = 0, f"{type(e).__name__}: {e}"[:300]
            ended = time.monotonic() - self.start
            self.completions.append(Completion(began, ended, not error, tokens, error))
            n += len(self._threads)

    def close(self, timeout_s: float = 330) -> list[Completion]:
        """Stops sending; waits for the requests in flight (they count) and returns them all."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        return sorted(self.completions, key=lambda c: c.start_s)
