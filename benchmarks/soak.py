"""Soak benchmark: mixed, hostile HTTP traffic against a live ``rocmforge serve`` for N minutes.

It answers one question: after minutes of realistic *and* abusive traffic, does the server
still answer every request the way docs/API.md promises, leak nothing (requests, KV blocks,
memory) and shut down cleanly? It is a robustness test, not a speed test (see
``throughput.py`` for speed).

    python benchmarks/soak.py --minutes 10                       # starts the default model itself
    python benchmarks/soak.py --minutes 5 --gguf model.gguf --concurrency 16 --json soak.json
    python benchmarks/soak.py --minutes 30 --url http://127.0.0.1:8080   # a running server
    python benchmarks/soak.py --smoke                            # a few seconds on a tiny model (CI)

**The server.** With ``--gguf`` (default: the default model, ``smollm2``) the script starts
``python -m rocmforge.cli serve --gguf ... --addr 127.0.0.1:<free port> --device cpu`` itself
(no ``ROCMFORGE_*`` variables from outside, no ``.env``), waits for ``/ready``, and at the end
sends SIGTERM and checks that the process exits 0 within a bound. With ``--url`` it uses a
running server (and cannot read its /proc RSS or check its exit).

**The traffic.** ``--concurrency`` clients send requests back to back until the time is up.
One seeded generator draws every request (``--seed``): the same seed gives the same requests
in the same order; only how many fit into the time depends on the machine. The first draws are
one of each kind, and bad requests go through every variant before repeating one, so even a
short run covers them all (``--smoke`` sends every variant first). The mix:

* ~68 % valid requests: ``/generate``, ``/generate/stream``, ``/v1/completions`` and
  ``/v1/chat/completions`` with and without ``stream``; short and medium prompts (text, token
  ids, several prompts, system and multi-turn chats); ``max_tokens`` mostly 4-48; temperature,
  seeds, ``top_p``/``top_k``/``min_p``, penalties, stop strings, in-vocabulary
  ``stop_token_ids``, ``min_tokens``, ``ignore_eos``, logprobs, ``n`` > 1, ``echo``,
  ``stream_options.include_usage``; and the cheap info routes (``/models``, ``/v1/models``,
  ``/tokenize``, ``/detokenize``).
* ~8 % cancels: a long request with a client-chosen ``X-Request-Id`` is cancelled in flight
  with ``POST /cancel/{id}``; afterwards ``/status/{id}`` must say ``finished`` with
  ``cancelled`` (or a normal finish if the request beat the cancel).
* ~8 % disconnects: a stream closed after 1-3 events, or a non-streaming request aborted by
  a short client timeout; ``/status/{id}`` must then turn ``finished`` (the server freed it).
* ~16 % bad requests: invalid JSON, non-object JSON, unknown fields, wrong types, out-of-range
  values (``top_k`` 2**63, temperature -1, ``top_p``, ``max_tokens``, ``n``, ``seed``,
  ``logprobs``), ``stop_token_ids`` outside the vocabulary (with and without ``min_tokens``),
  lone surrogates (``"\\ud800"`` as a raw JSON escape), NaN, prompts longer than the context,
  ``max_tokens`` over it, token ids outside the vocabulary, bodies over the 1 MiB limit
  (declared and chunked), an unknown model, GET on POST routes, unknown routes, ...

**The monitoring.** Every ``--sample-every`` seconds: ``GET /health`` (its latency, and
``memory.used_bytes``, the process RSS on the CPU), ``/proc/<pid>/status`` VmRSS when the
script started the server, and from ``GET /metrics`` ``rocmforge_requests_running``,
``rocmforge_requests_waiting`` and ``rocmforge_kv_cache_usage_ratio``.

**Reading the table.** Once the traffic stops and the server has settled, one table: the
duration, requests sent by kind, then one row per figure; the ``check`` column says ``ok`` or
``FAIL`` for the figures that decide the exit status:

* served (2xx), refused (429 ``overloaded`` / 503 ``server_draining``: load shedding, not
  errors) -- counts of valid, cancelled and disconnected requests;
* lost: accepted but never finished within ``--request-timeout`` (a hung request, a stream
  that stalls, a cancelled or abandoned request that never turns ``finished``);
* 5xx / 4xx for valid requests, malformed 2xx answers (not the documented shape, or a
  ``finish_reason`` other than stop/length), error events inside valid streams, stream
  endings missing (a stream that ended without ``event: done`` / ``data: [DONE]`` although the
  client neither closed nor cancelled it), transport errors;
* bad requests not answered 4xx (a 2xx, a 5xx or no answer), and error answers without the
  one error shape ``{"error": {type, code, message, param, request_id}}``. Bad requests are
  sent with ``Connection: close``, so a server that drops a connection after mishandling one
  does not have that charged to the next request. One exception is counted but not failed:
  a body over the size limit answered by closing the connection (HTTP allows a server to
  close rather than read such a body; the client may then see a reset before the 413);
* cancels confirmed / beat the cancel / sent, disconnects freed;
* RSS at the start (the first sample after the first 10 % of the run, so model loading and
  first-call allocations are excluded), at the end, and its growth (must stay under 5 %; on
  the CPU, growth beyond the KV pool's size, since the pool's pages become resident as
  traffic first writes them);
* max ``/health`` latency (client side, so it includes the client's own event-loop delays);
* KV usage, running and waiting requests left at the end (all must be 0);
* the server's exit status after SIGTERM (when the script started it).

Below the table, the failures (up to 25, with request ids to grep the server log for) and the
bad-request variants that were answered other than 4xx. Exit status 0 when every check passes,
1 when one fails, 2 when the run could not be set up (the server did not start). ``--json``
writes the same figures, plus the samples, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

WARMUP_FRACTION = 0.10
"""RSS at the start is the first sample after this fraction of the traffic time."""
RSS_GROWTH_LIMIT_PCT = 5.0
START_TIMEOUT_S = 300.0
SERVER_SHUTDOWN_TIMEOUT_S = 5.0
"""Passed as ``--shutdown-timeout``: the traffic has stopped by then, nothing should be in flight."""
STOP_TIMEOUT_S = 30.0
"""Bound on the exit after SIGTERM (shutdown timeout, uvicorn's grace, flushing logs)."""
FREE_TIMEOUT_S = 15.0
"""How long a cancelled or abandoned request may take to show ``finished`` in ``/status``."""
UNSEEN_TIMEOUT_S = 3.0
"""An abandoned request that ``/status`` never knew within this long was never admitted."""
DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_FAILURES_SHOWN = 25

NATIVE, NATIVE_STREAM, COMPLETIONS, CHAT = "/generate", "/generate/stream", "/v1/completions", "/v1/chat/completions"
GENERATION_ROUTES = (NATIVE, NATIVE_STREAM, COMPLETIONS, CHAT)

SHORT_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "List three primary colors:",
    "2 + 2 =",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Translate to French: good morning",
    "The quick brown fox",
    "Write a haiku about autumn.",
    "import numpy as np\n",
    "My favourite food is",
    "Hello, how are you?",
]
PASSAGES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. Within fifty years, "
    "presses were running in more than two hundred European cities, and the price of books fell sharply.",
    "To make a simple tomato sauce, warm olive oil in a wide pan, add two cloves of sliced garlic and cook "
    "until fragrant. Pour in crushed tomatoes, season with salt, and simmer for twenty minutes, stirring "
    "now and then. Finish with torn basil leaves and a spoonful of butter.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, "
    "chlorophyll absorbs mostly blue and red light, water molecules are split, oxygen is released, and "
    "carbon dioxide is fixed into sugars through the Calvin cycle.",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            result.append(a[i]); i += 1\n        else:\n"
    "            result.append(b[j]); j += 1\n    return result + a[i:] + b[j:]\n",
    "The hikers left the trailhead before sunrise. By noon the path had narrowed to a ledge above the river, "
    "the wind had picked up, and clouds were gathering behind the ridge. They argued briefly about turning "
    "back, then decided to push on to the shelter.",
    "Interest rates affect nearly every part of the economy. When a central bank raises its policy rate, "
    "borrowing becomes more expensive, mortgage payments rise, businesses postpone investment, and over "
    "time inflation tends to slow, although the effect arrives with long and variable lags.",
]
INSTRUCTIONS = ["\n\nSummarize this in one sentence:", "\n\nWhat happens next?", "\n\nThe main idea is",
                "\n\nQuestion: what is this about?\nAnswer:", ""]
SYSTEM_PROMPTS = ["You are a concise assistant.", "You are a helpful assistant. Answer briefly.",
                  "Reply in one short sentence."]
STOPS: list[str | list[str]] = ["\n", ".", ["\n\n", "."], [" the", "!"], "Paris", ["?", ",", ":"]]

# (table label, category, weight). Categories: valid, cancel, disconnect, bad.
KINDS: list[tuple[str, str, int]] = [
    ("generate", "valid", 12),
    ("generate stream", "valid", 12),
    ("completions", "valid", 10),
    ("completions stream", "valid", 10),
    ("chat", "valid", 10),
    ("chat stream", "valid", 10),
    ("info routes", "valid", 4),
    ("cancel", "cancel", 8),
    ("disconnect: stream closed", "disconnect", 4),
    ("disconnect: client timeout", "disconnect", 4),
    ("bad request", "bad", 16),
]
VALID_ROUTES = {
    "generate": (NATIVE, False), "generate stream": (NATIVE_STREAM, True),
    "completions": (COMPLETIONS, False), "completions stream": (COMPLETIONS, True),
    "chat": (CHAT, False), "chat stream": (CHAT, True),
}


# --- what the server is ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerInfo:
    model_id: str
    max_model_len: int
    vocab_size: int
    has_chat_template: bool


@dataclass(slots=True)
class Plan:
    """One request, every random choice already made (so a seed fixes the traffic)."""

    index: int
    kind: str
    category: str
    request_id: str
    method: str = "POST"
    path: str = NATIVE
    body: Any = None
    """A JSON-able body (valid requests), or None."""
    content: bytes | None = None
    """The raw body (bad requests), sent as is with ``Content-Type: application/json``."""
    chunked: bool = False
    stream: bool = False
    api: str = "native"
    expected_choices: int = 1
    cancel_after_s: float = 0.0
    close_after_events: int = 0
    client_timeout_s: float = 0.0
    variant: str = ""


# --- drawing the traffic -----------------------------------------------------------------


class Planner:
    """Draws plans from one seeded generator: first one of each kind (in a seeded order), then
    weighted draws, where a bad request is the next variant not sent yet while there is one.
    With ``front_load`` (the smoke run) every variant comes first, before the weighted draws."""

    def __init__(self, seed: int, info: ServerInfo, run_id: str, max_requests: int | None,
                 max_body_bytes: int, front_load: bool = False) -> None:
        self.rng = random.Random(seed)
        self.info = info
        self.run_id = run_id
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.count = 0
        self.kinds = [(k, c, w) for k, c, w in KINDS if info.has_chat_template or not k.startswith("chat")]
        self.variants = [v for v in BAD_VARIANTS if info.has_chat_template or v[1] != (CHAT,)]
        unsent = [name for name, _, _ in self.variants]
        self.rng.shuffle(unsent)
        first: list[tuple[str, str, str]] = [(k, c, "") for k, c, _ in self.kinds]
        self.rng.shuffle(first)
        if front_load:
            first += [("bad request", "bad", name) for name in unsent]
            unsent = []
        self.first = first[::-1]  # popped from the end
        self.unsent_variants = unsent[::-1]

    def next_plan(self) -> Plan | None:
        if self.max_requests is not None and self.count >= self.max_requests:
            return None
        rng = self.rng
        if self.first:
            kind, category, variant = self.first.pop()
        else:
            kind, category, _ = rng.choices(self.kinds, weights=[w for _, _, w in self.kinds])[0]
            variant = ""
        if category == "bad" and not variant and self.unsent_variants:
            variant = self.unsent_variants.pop()
        plan = Plan(self.count, kind, category, f"soak-{self.run_id}-{self.count}")
        self.count += 1
        if category == "valid":
            self._valid(plan)
        elif category in ("cancel", "disconnect"):
            self._long(plan)
        else:
            self._bad(plan, variant)
        return plan

    # valid requests

    def _max_tokens(self) -> int:
        return self.rng.randint(4, 48) if self.rng.random() < 0.9 else self.rng.randint(49, 80)

    def _text(self) -> str:
        rng = self.rng
        if rng.random() < 0.6:
            return rng.choice(SHORT_PROMPTS)
        return rng.choice(PASSAGES) + rng.choice(INSTRUCTIONS)

    def _token_ids(self) -> list[int]:
        return [self.rng.randrange(self.info.vocab_size) for _ in range(self.rng.randint(2, 24))]

    def _sampling(self) -> dict[str, Any]:
        rng, r = self.rng, self.rng.random
        fields: dict[str, Any] = {"temperature": rng.choice([0.0, 0.0, 0.3, 0.7, 1.0])}
        if r() < 0.5:
            fields["seed"] = rng.randrange(2**31)
        if r() < 0.25:
            fields["top_p"] = rng.choice([0.5, 0.9, 0.95])
        if r() < 0.25:
            fields["top_k"] = rng.choice([1, 5, 40])
        if r() < 0.1:
            fields["min_p"] = 0.05
        if r() < 0.1:
            fields["repetition_penalty"] = rng.choice([1.1, 1.3])
        if r() < 0.1:
            fields["presence_penalty"] = rng.choice([-0.5, 0.5])
        if r() < 0.1:
            fields["frequency_penalty"] = rng.choice([-0.5, 0.5])
        if r() < 0.3:
            fields["stop"] = rng.choice(STOPS)
        if r() < 0.1:
            fields["stop_token_ids"] = [rng.randrange(self.info.vocab_size) for _ in range(rng.randint(1, 3))]
        if r() < 0.1:
            fields["min_tokens"] = rng.randint(1, 3)
        if r() < 0.1:
            fields["ignore_eos"] = True
        return fields

    def _messages(self) -> list[dict[str, Any]]:
        rng = self.rng
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if rng.random() < 0.15:
            messages += [{"role": "user", "content": rng.choice(SHORT_PROMPTS)},
                         {"role": "assistant", "content": "Sure."}]
        content: Any = self._text()
        if rng.random() < 0.1:
            content = [{"type": "text", "text": content}, {"type": "text", "text": " Please be brief."}]
        messages.append({"role": "user", "content": content})
        return messages

    def _valid(self, plan: Plan) -> None:
        rng, r = self.rng, self.rng.random
        if plan.kind == "info routes":
            choice = rng.randrange(4)
            if choice == 0:
                plan.method, plan.path = "GET", "/models"
            elif choice == 1:
                plan.method, plan.path = "GET", "/v1/models"
            elif choice == 2:
                plan.path = "/tokenize"
                plan.body = ({"messages": self._messages()} if self.info.has_chat_template and r() < 0.3
                             else {"prompt": self._text(), "add_special_tokens": r() < 0.5})
            else:
                plan.path, plan.body = "/detokenize", {"tokens": self._token_ids()}
            return
        plan.path, plan.stream = VALID_ROUTES[plan.kind]
        body: dict[str, Any] = {}
        if plan.path in (NATIVE, NATIVE_STREAM):
            body["prompt"] = self._token_ids() if r() < 0.15 else self._text()
            body["max_tokens"] = self._max_tokens()
            if r() < 0.2:
                body["logprobs"] = rng.randint(0, 5)
            if r() < 0.1:
                body["add_special_tokens"] = False
        else:
            plan.api = "openai"
            n = 1 if r() < 0.8 else rng.randint(2, 3)
            prompts = 1
            if plan.path == COMPLETIONS:
                x = r()
                if x < 0.15:
                    body["prompt"] = self._token_ids()
                elif x < 0.25:
                    body["prompt"], prompts, n = [self._text(), self._text()], 2, min(n, 2)
                else:
                    body["prompt"] = self._text()
                body["max_tokens"] = self._max_tokens()
                if r() < 0.2:
                    body["logprobs"] = rng.randint(0, 5)
                elif r() < 0.1:
                    body["echo"] = True
            else:
                body["messages"] = self._messages()
                body["max_completion_tokens" if r() < 0.2 else "max_tokens"] = self._max_tokens()
                if r() < 0.2:
                    body["logprobs"] = True
                    if r() < 0.7:
                        body["top_logprobs"] = rng.randint(0, 5)
                if r() < 0.1:
                    body["response_format"] = {"type": "text"}
            if n > 1:
                body["n"] = n
            if plan.stream:
                body["stream"] = True
                if r() < 0.5:
                    body["stream_options"] = {"include_usage": True}
            elif r() < 0.1:
                body["stream"] = False
            if r() < 0.5:
                body["model"] = self.info.model_id
            if r() < 0.05:
                body["user"] = "soak"
            plan.expected_choices = prompts * n
        body.update(self._sampling())
        plan.body = body

    # cancels and disconnects: long requests (ignore_eos) that are still running when it happens

    def _long(self, plan: Plan) -> None:
        rng = self.rng
        if plan.kind == "cancel":
            plan.path, plan.stream = rng.choice(list(VALID_ROUTES.values()) if self.info.has_chat_template
                                                else [v for k, v in VALID_ROUTES.items() if "chat" not in k])
            plan.cancel_after_s = rng.uniform(0.0, 0.6)
        elif plan.kind == "disconnect: stream closed":
            plan.path, plan.stream = rng.choice(self._routes(NATIVE_STREAM)), True
            plan.close_after_events = rng.randint(1, 3)
        else:
            plan.path = rng.choice(self._routes(NATIVE))
            plan.client_timeout_s = rng.uniform(0.2, 1.0)
        body: dict[str, Any] = {"max_tokens": rng.randint(100, 300), "ignore_eos": True,
                                "temperature": rng.choice([0.0, 0.8])}
        if plan.path == CHAT:
            body["messages"] = self._messages()
        else:
            body["prompt"] = self._text()
        if plan.path in (COMPLETIONS, CHAT):
            plan.api = "openai"
            body["stream"] = plan.stream
        plan.body = body

    def _routes(self, native: str) -> list[str]:
        return [native, COMPLETIONS, CHAT] if self.info.has_chat_template else [native, COMPLETIONS]

    def _bad(self, plan: Plan, variant: str) -> None:
        rng = self.rng
        if variant:
            name, routes, build = next(v for v in self.variants if v[0] == variant)
        else:
            name, routes, build = rng.choice(self.variants)
        plan.variant = name
        route = rng.choice(routes)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} if route == CHAT \
            else {"prompt": "Hi there", "max_tokens": 4}
        if route in (COMPLETIONS, CHAT) and rng.random() < 0.5:
            body["stream"] = True
        plan.path = route
        built = build(BadContext(rng, self.info, route, body, self.max_body_bytes))
        plan.method = built.get("method", "POST")
        plan.path = built.get("path", route)
        plan.chunked = built.get("chunked", False)
        if plan.method == "GET":
            plan.content = None
        elif "content" in built:
            plan.content = built["content"]
        else:
            plan.content = json.dumps(built.get("body", body)).encode()


# --- the bad requests --------------------------------------------------------------------


@dataclass(slots=True)
class BadContext:
    rng: random.Random
    info: ServerInfo
    route: str
    body: dict[str, Any]
    max_body_bytes: int

    def with_prompt(self, value: Any) -> dict[str, Any]:
        body = dict(self.body)
        if self.route == CHAT:
            body["messages"] = [{"role": "user", "content": value}]
        else:
            body["prompt"] = value
        return body

    def with_fields(self, **fields: Any) -> dict[str, Any]:
        return {**self.body, **fields}


def _invalid_json(c: BadContext) -> dict[str, Any]:
    text = json.dumps(c.body)
    return {"content": c.rng.choice([text[: -c.rng.randint(1, 5)].encode(), b"{not json}", b"", b"{'prompt': 'Hi'}"])}


def _not_an_object(c: BadContext) -> dict[str, Any]:
    return {"content": c.rng.choice([b"[1, 2, 3]", b'"Hi there"', b"null", b"42", b"true"])}


def _unknown_field(c: BadContext) -> dict[str, Any]:
    return {"body": c.with_fields(**{c.rng.choice(["max_token", "temprature", "stream_option", "topk"]): 8})}


def _wrong_type(c: BadContext) -> dict[str, Any]:
    field_value = c.rng.choice([("max_tokens", "16"), ("temperature", "0.5"), ("seed", 1.5), ("ignore_eos", "yes"),
                                ("stop", 5), ("top_k", True)])
    if c.route in (COMPLETIONS, CHAT) and c.rng.random() < 0.3:
        field_value = ("stream", "yes")
    return {"body": c.with_fields(**dict([field_value]))}


def _bad_prompt_type(c: BadContext) -> dict[str, Any]:
    return {"body": c.with_prompt(c.rng.choice([5, None, {"text": "Hi"}, [1.5, 2.5], [[1, 2]]]))}


def _stop_ids_outside_vocab(c: BadContext) -> dict[str, Any]:
    return {"body": c.with_fields(stop_token_ids=[c.info.vocab_size + c.rng.randrange(10**6)])}


def _stop_ids_outside_vocab_min_tokens(c: BadContext) -> dict[str, Any]:
    return {"body": c.with_fields(stop_token_ids=[c.info.vocab_size + c.rng.randrange(10**6)],
                                  min_tokens=c.rng.randint(1, 3))}


def _lone_surrogate(c: BadContext) -> dict[str, Any]:
    # json.dumps writes a lone surrogate as the raw escape \ud800 (ensure_ascii), as a
    # careless client would; the server must answer 400, not fail to encode it.
    surrogate = c.rng.choice(["\ud800", "\udfff", "Hi \udc80 there"])
    return {"content": json.dumps(c.with_prompt(surrogate)).encode()}


def _prompt_over_context(c: BadContext) -> dict[str, Any]:
    n = c.info.max_model_len
    if c.route != CHAT and c.rng.random() < 0.5:
        return {"body": c.with_prompt([min(100, c.info.vocab_size - 1)] * (n + c.rng.randint(1, 64)))}
    return {"body": c.with_prompt("hello " * (n + 64))}


def _oversized(c: BadContext) -> dict[str, Any]:
    # An unknown field as padding: whatever the server's body limit, the answer must be 4xx.
    body = c.with_fields(padding="x" * (c.max_body_bytes + c.rng.randint(1, 4096)))
    return {"content": json.dumps(body).encode(), "chunked": c.rng.random() < 0.4}


OVERSIZED = "body over the size limit"


def _get_on_post_route(c: BadContext) -> dict[str, Any]:
    return {"method": "GET", "path": c.rng.choice([NATIVE, NATIVE_STREAM, COMPLETIONS, CHAT, "/tokenize",
                                                   "/detokenize", "/cancel/soak-nothing"])}


BAD_VARIANTS: list[tuple[str, tuple[str, ...], Any]] = [
    ("invalid JSON", GENERATION_ROUTES, _invalid_json),
    ("JSON not an object", GENERATION_ROUTES, _not_an_object),
    ("unknown field", GENERATION_ROUTES, _unknown_field),
    ("wrong type", GENERATION_ROUTES, _wrong_type),
    ("prompt of the wrong type", GENERATION_ROUTES, _bad_prompt_type),
    ("top_k 2**63", GENERATION_ROUTES, lambda c: {"body": c.with_fields(top_k=2**63)}),
    ("temperature -1", GENERATION_ROUTES, lambda c: {"body": c.with_fields(temperature=-1)}),
    ("temperature NaN", GENERATION_ROUTES, lambda c: {"body": c.with_fields(temperature=float("nan"))}),
    ("top_p out of range", GENERATION_ROUTES, lambda c: {"body": c.with_fields(top_p=c.rng.choice([0, 1.5, -1]))}),
    ("max_tokens < 1", GENERATION_ROUTES, lambda c: {"body": c.with_fields(max_tokens=c.rng.choice([0, -3]))}),
    ("max_tokens over the context", GENERATION_ROUTES,
     lambda c: {"body": c.with_fields(max_tokens=c.info.max_model_len + c.rng.randint(1, 10**5))}),
    ("seed < 0", GENERATION_ROUTES, lambda c: {"body": c.with_fields(seed=-1)}),
    ("min_tokens > max_tokens", GENERATION_ROUTES, lambda c: {"body": c.with_fields(min_tokens=10)}),
    ("too many stop strings", GENERATION_ROUTES, lambda c: {"body": c.with_fields(stop=[f"s{i}" for i in range(17)])}),
    ("stop_token_ids outside the vocabulary", GENERATION_ROUTES, _stop_ids_outside_vocab),
    ("stop_token_ids outside the vocabulary, min_tokens >= 1", GENERATION_ROUTES, _stop_ids_outside_vocab_min_tokens),
    ("lone surrogate", GENERATION_ROUTES, _lone_surrogate),
    ("prompt longer than the context", GENERATION_ROUTES, _prompt_over_context),
    ("empty prompt", (NATIVE, NATIVE_STREAM, COMPLETIONS), lambda c: {"body": c.with_prompt("")}),
    ("empty messages", (CHAT,), lambda c: {"body": c.with_fields(messages=[])}),
    ("unknown role", (CHAT,), lambda c: {"body": c.with_fields(messages=[{"role": "wizard", "content": "Hi"}])}),
    ("prompt token id outside the vocabulary", (NATIVE, NATIVE_STREAM, COMPLETIONS),
     lambda c: {"body": c.with_prompt([1, c.info.vocab_size + c.rng.randrange(1000)])}),
    ("logprobs out of range", (NATIVE, NATIVE_STREAM, COMPLETIONS),
     lambda c: {"body": c.with_fields(logprobs=21 if c.route != COMPLETIONS else 6)}),
    ("top_logprobs out of range", (CHAT,), lambda c: {"body": c.with_fields(logprobs=True, top_logprobs=21)}),
    # n = 0, or more generations than max_choices_per_request (64) allows one request.
    ("n out of range", (COMPLETIONS, CHAT), lambda c: {"body": c.with_fields(n=c.rng.choice([0, 65]))}),
    ("echo with logprobs", (COMPLETIONS,), lambda c: {"body": c.with_fields(echo=True, logprobs=1)}),
    ("unknown model", (COMPLETIONS, CHAT), lambda c: {"body": c.with_fields(model="gpt-4o")}),
    (OVERSIZED, GENERATION_ROUTES, _oversized),
    ("GET on a POST route", GENERATION_ROUTES, _get_on_post_route),
    ("unknown route", GENERATION_ROUTES, lambda c: {"path": c.rng.choice(["/v1/embeddings", "/generate/batch"])}),
]


# --- the results -------------------------------------------------------------------------


@dataclass
class Stats:
    figures: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    outcomes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    bad_by_variant: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, figure: str, plan: Plan, detail: str) -> None:
        self.figures[figure] += 1
        self.failures.append({"figure": figure, "kind": plan.kind, "variant": plan.variant or None,
                              "path": f"{plan.method} {plan.path}", "request_id": plan.request_id,
                              "detail": detail[:300]})

    def outcome(self, plan: Plan, outcome: str) -> None:
        self.outcomes[plan.kind][outcome] += 1


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _short(response: httpx.Response) -> str:
    try:
        text = response.text
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        text = ""
    return f"HTTP {response.status_code}: {text[:200]}"


def _refused(response: httpx.Response) -> bool:
    code = _error_code(response)
    return (response.status_code, code) in ((429, "overloaded"), (503, "server_draining"))


def _status_class(response: httpx.Response) -> str:
    if 200 <= response.status_code < 300:
        return "2xx"
    if _refused(response):
        return "refused"
    return f"{response.status_code // 100}xx"


# --- running one request -----------------------------------------------------------------


@dataclass(slots=True)
class StreamResult:
    events: int = 0
    final: str | None = None
    """``done`` / ``[DONE]`` (the documented ending), ``error`` (an error event), or None."""
    error: str | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)
    malformed: str | None = None
    broken: str | None = None
    """Why reading stopped early on the server's side (connection closed mid-stream)."""


async def _sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


async def read_stream(response: httpx.Response, api: str, close_after: int = 0) -> StreamResult:
    """Read SSE events until the documented last event, or ``close_after`` events."""
    result = StreamResult()
    try:
        async for event, data in _sse_events(response):
            result.events += 1
            if data == "[DONE]" and api == "openai":
                result.final = "[DONE]"
                break
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                result.malformed = f"event data is not a JSON object: {data[:100]!r}"
                continue
            if api == "native":
                if event == "done":
                    result.final = "done"
                    result.finish_reasons[0] = obj.get("finish_reason")
                    break
                if event == "error":
                    result.final, result.error = "error", data[:200]
                    break
            else:
                if "error" in obj:
                    result.final, result.error = "error", data[:200]
                    break
                for choice in obj.get("choices") or []:
                    if choice.get("finish_reason") is not None:
                        result.finish_reasons[choice.get("index", -1)] = choice["finish_reason"]
            if close_after and result.events >= close_after:
                break
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        result.broken = f"{type(exc).__name__}: {exc}"
    return result


class Runner:
    def __init__(self, client: httpx.AsyncClient, stats: Stats, request_timeout: float) -> None:
        self.client = client
        self.stats = stats
        self.request_timeout = request_timeout
        self.timeout = httpx.Timeout(request_timeout, connect=10.0)

    def _headers(self, plan: Plan) -> dict[str, str]:
        return {"X-Request-Id": plan.request_id}

    async def execute(self, plan: Plan) -> None:
        self.stats.sent[plan.kind] += 1
        if plan.category == "valid":
            await self._valid(plan)
        elif plan.category == "cancel":
            await self._cancel(plan)
        elif plan.category == "disconnect":
            await self._disconnect(plan)
        else:
            await self._bad(plan)

    # valid

    def _answered(self, plan: Plan, response: httpx.Response) -> bool:
        """Count a valid request's answer; True when it is a 2xx to check further."""
        status = _status_class(response)
        self.stats.outcome(plan, status)
        if status == "2xx":
            self.stats.figures["served"] += 1
            return True
        if status == "refused":
            self.stats.figures["refused"] += 1
            if plan.category in ("cancel", "disconnect"):
                self.stats.figures[f"{plan.category}s_refused"] += 1
        elif status == "5xx":
            self.stats.fail("valid_5xx", plan, _short(response))
        else:
            self.stats.fail("valid_4xx" if status == "4xx" else "valid_other_status", plan, _short(response))
        return False

    def _no_answer(self, plan: Plan, exc: Exception) -> None:
        self.stats.outcome(plan, "no answer")
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            self.stats.fail("lost", plan, f"no answer within {self.request_timeout:.0f} s ({type(exc).__name__})")
        else:
            self.stats.fail("transport_errors", plan, f"{type(exc).__name__}: {exc}")

    def _check_stream(self, plan: Plan, result: StreamResult, *, expect_normal: bool) -> bool:
        """A stream the client read to its end; True when it ended as documented."""
        if result.final is None:
            why = result.broken or "the stream ended without its last event"
            self.stats.fail("stream_endings_missing", plan, f"{why} after {result.events} events")
            return False
        if result.final == "error":
            self.stats.fail("stream_error_events", plan, result.error or "")
            return False
        if result.malformed:
            self.stats.fail("malformed", plan, result.malformed)
            return False
        if expect_normal:
            reasons = result.finish_reasons
            if len(reasons) != plan.expected_choices or any(r not in ("stop", "length") for r in reasons.values()):
                self.stats.fail("malformed", plan, f"finish reasons {reasons}, expected {plan.expected_choices} "
                                                   "choices ending with stop or length")
                return False
        return True

    def _check_body(self, plan: Plan, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.stats.fail("malformed", plan, f"not a JSON object: {response.text[:100]!r}")
            return
        if plan.path == NATIVE:
            reasons = [body.get("finish_reason")]
        elif plan.path in (COMPLETIONS, CHAT):
            choices = body.get("choices")
            reasons = [c.get("finish_reason") if isinstance(c, dict) else None for c in choices] \
                if isinstance(choices, list) else []
            if len(reasons) != plan.expected_choices:
                self.stats.fail("malformed", plan, f"{len(reasons)} choices, expected {plan.expected_choices}")
                return
        else:
            return
        if any(r not in ("stop", "length") for r in reasons):
            self.stats.fail("malformed", plan, f"finish reasons {reasons}: {response.text[:150]}")

    async def _valid(self, plan: Plan) -> None:
        try:
            if plan.stream:
                async with self.client.stream(plan.method, plan.path, json=plan.body, headers=self._headers(plan),
                                              timeout=self.timeout) as response:
                    if not await self._stream_opened(plan, response):
                        return
                    result = await read_stream(response, plan.api)
                self._check_stream(plan, result, expect_normal=True)
            else:
                response = await self.client.request(plan.method, plan.path, json=plan.body,
                                                     headers=self._headers(plan), timeout=self.timeout)
                if self._answered(plan, response):
                    self._check_body(plan, response)
        except httpx.TransportError as exc:
            self._no_answer(plan, exc)

    # cancel

    async def _status(self, request_id: str) -> tuple[int, dict[str, Any]]:
        response = await self.client.get(f"/status/{request_id}", timeout=10.0)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {}

    async def _wait_finished(self, request_id: str) -> tuple[str, dict[str, Any]]:
        """Poll ``/status`` until the request is finished: ("finished", body), ("unseen", {})
        when the server never knew it, ("running", last body) when it never finished."""
        start = time.monotonic()
        seen = False
        body: dict[str, Any] = {}
        while True:
            code, got = await self._status(request_id)
            if code == 200:
                seen, body = True, got
                if got.get("state") == "finished":
                    return "finished", got
            elapsed = time.monotonic() - start
            if not seen and elapsed > UNSEEN_TIMEOUT_S:
                return "unseen", {}
            if elapsed > FREE_TIMEOUT_S:
                return "running", body
            await asyncio.sleep(0.05)

    async def _wait_known(self, request_id: str, task: asyncio.Task[Any]) -> bool:
        """Poll ``/status`` until the server knows the request (True) or its answer came (False)."""
        deadline = time.monotonic() + self.request_timeout
        while not task.done() and time.monotonic() < deadline:
            code, _ = await self._status(request_id)
            if code == 200:
                return True
            await asyncio.sleep(0.02)
        return False

    async def _send_cancel(self, plan: Plan, delay: float) -> dict[str, Any]:
        """POST /cancel after ``delay``; its JSON answer, or ``{"failed": ...}``."""
        await asyncio.sleep(delay)
        response = await self.client.post(f"/cancel/{plan.request_id}", timeout=10.0)
        if response.status_code != 200:
            return {"failed": f"POST /cancel answered {_short(response)}"}
        try:
            return response.json()
        except ValueError:
            return {"failed": f"POST /cancel answered no JSON: {_short(response)}"}

    async def _stream_opened(self, plan: Plan, response: httpx.Response) -> bool:
        """Record a stream's answer; False (its error body read) when it did not open with 200."""
        if response.status_code != 200:
            await response.aread()
            self._answered(plan, response)
            return False
        self._answered(plan, response)
        return True

    async def _cancel(self, plan: Plan) -> None:
        self.stats.figures["cancels_sent"] += 1
        headers = self._headers(plan)
        cancel_reply: dict[str, Any] | None = None
        try:
            if plan.stream:
                async with self.client.stream(plan.method, plan.path, json=plan.body, headers=headers,
                                              timeout=self.timeout) as response:
                    if not await self._stream_opened(plan, response):
                        return
                    canceller = asyncio.create_task(self._send_cancel(plan, plan.cancel_after_s))
                    try:
                        result = await read_stream(response, plan.api)
                    finally:
                        cancel_reply = await canceller
                if not self._check_stream(plan, result, expect_normal=False):
                    return
            else:
                task = asyncio.create_task(self.client.request(plan.method, plan.path, json=plan.body,
                                                               headers=headers, timeout=self.timeout))
                try:
                    if await self._wait_known(plan.request_id, task):
                        cancel_reply = await self._send_cancel(plan, plan.cancel_after_s)
                    response = await task
                finally:
                    if not task.done():
                        task.cancel()
                if not self._answered(plan, response):
                    return
        except httpx.TransportError as exc:
            self._no_answer(plan, exc)
            return
        state, status = await self._wait_finished(plan.request_id)
        reason = status.get("finish_reason")
        if cancel_reply is not None and "failed" in cancel_reply:
            self.stats.fail("cancels_unconfirmed", plan, cancel_reply["failed"])
        elif state != "finished":
            self.stats.fail("lost", plan, f"/status is {state} {status} {FREE_TIMEOUT_S:.0f} s after the cancel")
        elif reason == "cancelled":
            self.stats.figures["cancels_confirmed"] += 1
        elif reason in ("stop", "length") and not (cancel_reply or {}).get("cancelled"):
            self.stats.figures["cancels_beaten"] += 1
        else:
            self.stats.fail("cancels_unconfirmed", plan, f"cancel answered {cancel_reply}, /status {status}")

    # disconnect

    async def _disconnect(self, plan: Plan) -> None:
        self.stats.figures["disconnects_sent"] += 1
        headers = self._headers(plan)
        finished_first = False
        try:
            if plan.stream:
                async with self.client.stream(plan.method, plan.path, json=plan.body, headers=headers,
                                              timeout=self.timeout) as response:
                    if not await self._stream_opened(plan, response):
                        return
                    result = await read_stream(response, plan.api, close_after=plan.close_after_events)
                    # Leaving the block closes the connection: the server must cancel the request.
                if result.final is not None or result.events < plan.close_after_events:
                    finished_first = True  # the whole stream came (or it broke) before the client left
                    if not self._check_stream(plan, result, expect_normal=True):
                        return
            else:
                timeout = httpx.Timeout(plan.client_timeout_s, connect=10.0)
                try:
                    response = await self.client.request(plan.method, plan.path, json=plan.body, headers=headers,
                                                         timeout=timeout)
                except httpx.ReadTimeout:
                    self.stats.outcome(plan, "no answer")
                else:
                    finished_first = True
                    if not self._answered(plan, response):
                        return
                    self._check_body(plan, response)
        except httpx.TransportError as exc:
            self._no_answer(plan, exc)
            return
        if finished_first:
            self.stats.figures["disconnects_finished_first"] += 1
        state, status = await self._wait_finished(plan.request_id)
        if state == "running":
            self.stats.fail("lost", plan, f"still {status.get('state')} {FREE_TIMEOUT_S:.0f} s after the client left")
        elif state == "unseen":
            self.stats.figures["disconnects_unseen"] += 1
        else:
            self.stats.figures["disconnects_freed"] += 1

    # bad

    async def _bad(self, plan: Plan) -> None:
        self.stats.figures["bad_sent"] += 1
        # Connection: close -- a server that mishandles a bad request and then drops the
        # connection must not have that charged to the next, unrelated request on it.
        headers = {**self._headers(plan), "Content-Type": "application/json", "Connection": "close"}
        content: Any = plan.content
        if plan.chunked and content is not None:
            raw = content

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(raw), 64 * 1024):
                    yield raw[i : i + 64 * 1024]

            content = chunks()
        try:
            response = await self.client.request(plan.method, plan.path, content=content, headers=headers,
                                                 timeout=self.timeout)
        except httpx.TransportError as exc:
            if plan.variant == OVERSIZED and not isinstance(exc, httpx.TimeoutException):
                # HTTP lets a server close the connection on a body it will not read (RFC 9110,
                # 413); the client may then see a reset instead of the 413. Counted, not failed.
                self.stats.outcome(plan, "connection closed")
                self.stats.bad_by_variant[plan.variant]["connection closed"] += 1
                self.stats.figures["oversized_closed"] += 1
                return
            self.stats.outcome(plan, "no answer")
            self.stats.bad_by_variant[plan.variant]["no answer"] += 1
            self.stats.fail("bad_not_4xx", plan, f"no answer: {type(exc).__name__}: {exc}")
            return
        self.stats.outcome(plan, _status_class(response))
        self.stats.bad_by_variant[plan.variant][str(response.status_code)] += 1
        if not 400 <= response.status_code < 500:
            detail = _short(response)
            if response.is_success:  # accepted: how it ended is at the end (a stream's error event)
                detail = f"HTTP {response.status_code} (accepted), ends with: {response.text[-200:]!r}"
            self.stats.fail("bad_not_4xx", plan, detail)
            return
        self.stats.figures["bad_4xx"] += 1
        problem = _error_shape_problem(response)
        if problem:
            self.stats.fail("error_shape", plan, f"{problem}: {_short(response)}")


def _error_shape_problem(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return "not {\"error\": {...}}"
    error = body["error"]
    if set(error) != {"type", "code", "message", "param", "request_id"}:
        return f"error fields {sorted(error)}"
    if error["request_id"] != response.headers.get("x-request-id"):
        return "error.request_id is not the X-Request-Id header"
    return None


# --- monitoring --------------------------------------------------------------------------


def vm_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def take_sample(client: httpx.AsyncClient, t0: float, pid: int | None) -> dict[str, Any]:
    sample: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 3)}
    start = time.perf_counter()
    health = await client.get("/health", timeout=30.0)
    sample["health_latency_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    sample["health_status"] = health.status_code
    memory = health.json().get("memory") or {}
    sample["memory_kind"] = memory.get("kind")
    sample["health_used_bytes"] = memory.get("used_bytes")
    sample["kv_cache_bytes"] = (memory.get("plan") or {}).get("kv_cache_bytes")
    if pid is not None:
        sample["vm_rss_bytes"] = vm_rss(pid)
    metrics = await client.get("/metrics", timeout=30.0)
    wanted = {"rocmforge_requests_running": "running", "rocmforge_requests_waiting": "waiting",
              "rocmforge_kv_cache_usage_ratio": "kv_usage"}
    for family in text_string_to_metric_families(metrics.text):
        for s in family.samples:
            if s.name in wanted and not s.labels:
                sample[wanted[s.name]] = s.value
    sample["rss_bytes"] = sample.get("vm_rss_bytes") or (
        sample["health_used_bytes"] if sample["memory_kind"] == "process_rss" or pid is None else None)
    return sample


class Monitor:
    def __init__(self, client: httpx.AsyncClient, t0: float, pid: int | None, every_s: float) -> None:
        self.client, self.t0, self.pid, self.every_s = client, t0, pid, every_s
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def sample(self) -> dict[str, Any] | None:
        try:
            sample = await take_sample(self.client, self.t0, self.pid)
        except (httpx.HTTPError, ValueError, KeyError, AttributeError) as exc:
            self.errors.append(f"{time.monotonic() - self.t0:.1f} s: {type(exc).__name__}: {exc}")
            return None
        if sample["health_status"] != 200:
            self.errors.append(f"{sample['t_s']} s: /health answered {sample['health_status']}")
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(self.stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass


# --- the server --------------------------------------------------------------------------


@dataclass(slots=True)
class StartedServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(gguf: Path, workdir: Path, device: str, extra: list[str]) -> StartedServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "rocmforge.cli", "serve", "--gguf", str(gguf), "--addr", f"127.0.0.1:{port}",
            "--device", device, "--shutdown-timeout", str(SERVER_SHUTDOWN_TIMEOUT_S), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCMFORGE_")}
    env.update(ROCMFORGE_LOG_LEVEL="warn", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        # cwd: a directory without a .env file, so only the flags above configure the server.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = StartedServer(url, process, log_path)
    print(f"[soak] started {shlex.join(args)} (pid {process.pid}, log {log_path})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def stop_server(server: StartedServer) -> tuple[int | None, float]:
    """SIGTERM and wait; the exit status (None when it had to be killed) and the seconds it took."""
    process = server.process
    start = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
            return None, time.monotonic() - start
    return process.returncode, time.monotonic() - start


def fetch_info(url: str, headers: dict[str, str]) -> ServerInfo:
    [model] = httpx.get(f"{url}/models", headers=headers, timeout=30.0).json()["models"]
    return ServerInfo(model["id"], int(model["max_model_len"]), int(model["vocab_size"]),
                      bool(model["has_chat_template"]))


# --- the run -----------------------------------------------------------------------------


@dataclass(slots=True)
class RunConfig:
    url: str
    pid: int | None
    duration_s: float
    concurrency: int
    seed: int
    sample_every_s: float
    request_timeout_s: float
    settle_timeout_s: float
    max_requests: int | None
    max_body_bytes: int
    headers: dict[str, str]
    progress_every_s: float
    front_load: bool = False


async def run_traffic(config: RunConfig, info: ServerInfo) -> dict[str, Any]:
    stats = Stats()
    run_id = os.urandom(4).hex()  # request ids only: unique across runs, not part of the traffic
    planner = Planner(config.seed, info, run_id, config.max_requests, config.max_body_bytes, config.front_load)
    limits = httpx.Limits(max_connections=config.concurrency * 3 + 8, max_keepalive_connections=config.concurrency * 2)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=config.url, headers=config.headers, limits=limits) as client:
        runner = Runner(client, stats, config.request_timeout_s)
        monitor = Monitor(client, t0, config.pid, config.sample_every_s)
        monitor_task = asyncio.create_task(monitor.run())
        deadline = t0 + config.duration_s
        plan_timeout = config.request_timeout_s + FREE_TIMEOUT_S + 30.0

        async def client_loop() -> None:
            while time.monotonic() < deadline:
                plan = planner.next_plan()
                if plan is None:
                    return
                try:
                    await asyncio.wait_for(runner.execute(plan), plan_timeout)
                except asyncio.TimeoutError:
                    stats.fail("lost", plan, f"the request did not end within {plan_timeout:.0f} s")
                except Exception as exc:  # a harness bug must show in the table, not kill the run
                    stats.fail("harness_errors", plan, f"{type(exc).__name__}: {exc}")

        async def progress() -> None:
            while True:
                await asyncio.sleep(config.progress_every_s)
                rss = next((s["rss_bytes"] for s in reversed(monitor.samples) if s.get("rss_bytes")), None)
                print(f"[soak] {time.monotonic() - t0:6.0f} s: {planner.count} sent, {len(stats.failures)} failures"
                      + (f", RSS {rss / 2**30:.3f} GiB" if rss else ""), file=sys.stderr, flush=True)

        progress_task = asyncio.create_task(progress())
        await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
        traffic_s = time.monotonic() - t0
        progress_task.cancel()

        # Settle: the server must become idle (nothing running or waiting, no KV block in use).
        settle_start = time.monotonic()
        await asyncio.sleep(min(1.0, config.settle_timeout_s))
        final: dict[str, Any] | None = None
        while True:
            final = await monitor.sample()
            idle = final is not None and all(final.get(k) == 0 for k in ("running", "waiting", "kv_usage"))
            if idle or time.monotonic() - settle_start > config.settle_timeout_s:
                break
            await asyncio.sleep(0.25)
        monitor.stop.set()
        await monitor_task
    return {"stats": stats, "monitor": monitor, "final": final, "traffic_s": traffic_s,
            "settle_s": time.monotonic() - settle_start, "run_id": run_id, "requests": planner.count}


def summarize(config: RunConfig, info: ServerInfo, result: dict[str, Any], server_exit: dict[str, Any] | None,
              total_s: float, log_tracebacks: int | None) -> dict[str, Any]:
    stats: Stats = result["stats"]
    monitor: Monitor = result["monitor"]
    final = result["final"] or {}
    f = stats.figures
    warm = WARMUP_FRACTION * result["traffic_s"]
    rss = [s for s in monitor.samples if s.get("rss_bytes")]
    start_sample = next((s for s in rss if s["t_s"] >= warm), rss[0] if rss else None)
    rss_start = start_sample["rss_bytes"] if start_sample else None
    rss_end = final.get("rss_bytes")
    # A CPU server maps its KV pool lazily: a page becomes resident when traffic first
    # writes a block there, so RSS may grow by up to the pool's size without leaking.
    lazy_kv = (final.get("kv_cache_bytes") or 0) if final.get("memory_kind") == "process_rss" else 0
    growth = None
    if rss_start and rss_end:
        delta = rss_end - rss_start
        growth = (max(0, delta - lazy_kv) if lazy_kv else delta) / rss_start * 100
    latencies = [s["health_latency_ms"] for s in monitor.samples]
    figures = {
        "traffic_s": round(result["traffic_s"], 2),
        "total_s": round(total_s, 2),
        "requests_sent": result["requests"],
        "sent_by_kind": dict(stats.sent),
        "served": f["served"],
        "refused": f["refused"],
        "lost": f["lost"],
        "valid_5xx": f["valid_5xx"],
        "valid_4xx": f["valid_4xx"] + f["valid_other_status"],
        "malformed": f["malformed"],
        "stream_error_events": f["stream_error_events"],
        "stream_endings_missing": f["stream_endings_missing"],
        "transport_errors": f["transport_errors"],
        "bad_sent": f["bad_sent"],
        "bad_4xx": f["bad_4xx"],
        "bad_not_4xx": f["bad_not_4xx"],
        "oversized_closed": f["oversized_closed"],
        "error_shape": f["error_shape"],
        "cancels_sent": f["cancels_sent"],
        "cancels_confirmed": f["cancels_confirmed"],
        "cancels_beaten": f["cancels_beaten"],
        "cancels_unconfirmed": f["cancels_unconfirmed"],
        "cancels_refused": f["cancels_refused"],
        "disconnects_sent": f["disconnects_sent"],
        "disconnects_freed": f["disconnects_freed"],
        "disconnects_finished_first": f["disconnects_finished_first"],
        "disconnects_unseen": f["disconnects_unseen"],
        "disconnects_refused": f["disconnects_refused"],
        "harness_errors": f["harness_errors"],
        "rss_start_bytes": rss_start,
        "rss_start_t_s": start_sample["t_s"] if start_sample else None,
        "rss_end_bytes": rss_end,
        "rss_growth_pct": round(growth, 3) if growth is not None else None,
        "rss_growth_allowance_bytes": lazy_kv,
        "rss_source": ("/proc VmRSS" if config.pid else f"/health memory ({final.get('memory_kind')})"),
        "health_latency_max_ms": max(latencies) if latencies else None,
        "samples": len(monitor.samples),
        "sample_errors": len(monitor.errors),
        "end_kv_usage": final.get("kv_usage"),
        "end_running": final.get("running"),
        "end_waiting": final.get("waiting"),
        "max_running": max((s.get("running") or 0 for s in monitor.samples), default=None),
        "max_waiting": max((s.get("waiting") or 0 for s in monitor.samples), default=None),
        "server_exit_status": server_exit["status"] if server_exit else None,
        "server_exit_s": round(server_exit["seconds"], 2) if server_exit else None,
        "server_log_tracebacks": log_tracebacks,
    }
    leftovers_ok = all(final.get(k) == 0 for k in ("running", "waiting", "kv_usage"))
    checks = {
        "lost": f["lost"] == 0,
        "5xx for valid requests": f["valid_5xx"] == 0,
        "4xx for valid requests": figures["valid_4xx"] == 0,
        "malformed 2xx answers": f["malformed"] == 0,
        "error events in valid streams": f["stream_error_events"] == 0,
        "stream endings missing": f["stream_endings_missing"] == 0,
        "transport errors": f["transport_errors"] == 0,
        "bad requests not answered 4xx": f["bad_not_4xx"] == 0,
        "error answers without the error shape": f["error_shape"] == 0,
        "cancels unconfirmed": f["cancels_unconfirmed"] == 0,
        "leftovers at the end": leftovers_ok,
        "RSS growth": growth is not None and growth < RSS_GROWTH_LIMIT_PCT,
        "monitoring samples": not monitor.errors,
        "harness errors": f["harness_errors"] == 0,
    }
    if server_exit is not None:
        checks["server exit"] = server_exit["status"] == 0
    return {
        "model": info.model_id,
        "url": config.url,
        "server_started_here": config.pid is not None,
        "concurrency": config.concurrency,
        "seed": config.seed,
        "duration_s": config.duration_s,
        "figures": figures,
        "checks": checks,
        "passed": all(checks.values()),
        "failed_checks": [name for name, ok in checks.items() if not ok],
        "outcomes_by_kind": {k: dict(v) for k, v in stats.outcomes.items()},
        "bad_by_variant": {k: dict(v) for k, v in sorted(stats.bad_by_variant.items())},
        "failures": stats.failures,
        "monitor_errors": monitor.errors,
        "samples": monitor.samples,
    }


def _gib(value: float | None) -> str:
    return f"{value / 2**30:.3f} GiB" if value else "n/a"


def print_table(report: dict[str, Any]) -> None:
    f, checks = report["figures"], report["checks"]

    def check(name: str) -> str:
        return "" if name not in checks else ("ok" if checks[name] else "FAIL")

    growth = f["rss_growth_pct"]
    rows: list[tuple[str, str, str]] = [
        ("duration (traffic / total)", f"{f['traffic_s']:.1f} s / {f['total_s']:.1f} s", ""),
        ("requests sent", str(f["requests_sent"]), ""),
    ]
    for kind, _, _ in KINDS:
        if kind in f["sent_by_kind"]:
            outcomes = report["outcomes_by_kind"].get(kind, {})
            detail = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
            rows.append((f"  {kind}", f"{f['sent_by_kind'][kind]}  ({detail})", ""))
    latency = f["health_latency_max_ms"]
    rows += [
        ("served (2xx)", str(f["served"]), ""),
        ("refused (429 overloaded / 503 draining)", str(f["refused"]), ""),
        ("lost (accepted, never finished)", str(f["lost"]), check("lost")),
        ("5xx for valid requests", str(f["valid_5xx"]), check("5xx for valid requests")),
        ("4xx for valid requests", str(f["valid_4xx"]), check("4xx for valid requests")),
        ("malformed 2xx answers", str(f["malformed"]), check("malformed 2xx answers")),
        ("error events in valid streams", str(f["stream_error_events"]), check("error events in valid streams")),
        ("stream endings missing", str(f["stream_endings_missing"]), check("stream endings missing")),
        ("transport errors", str(f["transport_errors"]), check("transport errors")),
        ("bad requests not answered 4xx", f"{f['bad_not_4xx']} of {f['bad_sent']}",
         check("bad requests not answered 4xx")),
        ("oversized bodies answered by closing", str(f["oversized_closed"]), ""),
        ("error answers without the error shape", str(f["error_shape"]), check("error answers without the error shape")),
        ("cancels confirmed / beat the cancel / sent",
         f"{f['cancels_confirmed']} / {f['cancels_beaten']} / {f['cancels_sent']}"
         + (f" ({f['cancels_refused']} refused)" if f["cancels_refused"] else ""), check("cancels unconfirmed")),
        ("disconnects freed / sent",
         f"{f['disconnects_freed']} / {f['disconnects_sent']} ({f['disconnects_finished_first']} finished first"
         + (f", {f['disconnects_refused']} refused" if f["disconnects_refused"] else "") + ")", ""),
        (f"RSS start (after {WARMUP_FRACTION:.0%}) / end / growth"
         + (" beyond the lazily mapped KV pool" if f["rss_growth_allowance_bytes"] else ""),
         f"{_gib(f['rss_start_bytes'])} / {_gib(f['rss_end_bytes'])} / "
         + (f"{growth:+.2f} %" if growth is not None else "n/a"), check("RSS growth")),
        ("max /health latency", f"{latency:.1f} ms" if latency is not None else "n/a", ""),
        ("monitoring samples (failed)", f"{f['samples']} ({f['sample_errors']})", check("monitoring samples")),
        ("KV usage / running / waiting at the end",
         " / ".join("n/a" if f[k] is None else f"{f[k]:g}" for k in ("end_kv_usage", "end_running", "end_waiting")),
         check("leftovers at the end")),
    ]
    if f["harness_errors"]:
        rows.append(("harness errors (bugs in this script)", str(f["harness_errors"]), check("harness errors")))
    if f["server_exit_s"] is not None:
        status = f["server_exit_status"]
        rows.append(("server exit after SIGTERM", f"{'killed' if status is None else status} after "
                     f"{f['server_exit_s']:.1f} s", check("server exit")))
    if f["server_log_tracebacks"] is not None:
        rows.append(("tracebacks in the server log", str(f["server_log_tracebacks"]), ""))
    rows.append(("result", "PASS" if report["passed"] else "FAIL: " + ", ".join(report["failed_checks"]), ""))
    width = [max(len(r[i]) for r in rows + [("figure", "value", "check")]) for i in range(3)]
    print(f"soak: {report['model']} at {report['url']}"
          f"{' (server started here)' if report['server_started_here'] else ''}, "
          f"{report['concurrency']} clients, seed {report['seed']}")
    header = f"{'figure':<{width[0]}}  {'value':<{width[1]}}  check"
    print(header)
    print("-" * len(header))
    for name, value, verdict in rows:
        print(f"{name:<{width[0]}}  {value:<{width[1]}}  {verdict}".rstrip())
    failures = report["failures"]
    if failures:
        print(f"\nfailures ({len(failures)}; first {min(len(failures), MAX_FAILURES_SHOWN)}):")
        for item in failures[:MAX_FAILURES_SHOWN]:
            what = item["kind"] + (f" [{item['variant']}]" if item["variant"] else "")
            print(f"  {item['figure']}: {what}, {item['path']}, id {item['request_id']}: {item['detail']}")
    wrong = {v: c for v, c in report["bad_by_variant"].items()
             if any(not k.startswith("4") and k != "connection closed" for k in c)}
    if wrong:
        print("\nbad-request variants answered other than 4xx (status: count):")
        for variant, counts in wrong.items():
            print(f"  {variant}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    for error in report["monitor_errors"][:5]:
        print(f"monitoring: {error}")


# --- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the traffic runs (default 5)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8080")
    where.add_argument("--gguf", default=None,
                       help="start a server on this GGUF path or known model name (default: the default model)")
    parser.add_argument("--device", default="cpu", help="--device of the server started here (default cpu)")
    parser.add_argument("--serve-args", default="", help="extra flags for the server started here (one string)")
    parser.add_argument("--api-key", default=None, help="Bearer key of the server")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests too")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between server samples")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds an accepted request may take before it counts as lost")
    parser.add_argument("--settle-timeout", type=float, default=15.0,
                        help="seconds the server gets to become idle after the traffic")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="the server's body limit (oversized bodies are one byte to 4 KiB over it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds on a tiny random-weight model started here (CI: the script still runs)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.minutes <= 0:
        parser.error("--concurrency must be >= 1 and --minutes > 0")
    if args.smoke and args.url:
        parser.error("--smoke starts its own server: no --url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="rocmforge-soak-"))
    server: StartedServer | None = None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    duration_s, concurrency, sample_every = args.minutes * 60.0, args.concurrency, args.sample_every
    request_timeout, settle_timeout, max_requests = args.request_timeout, args.settle_timeout, args.max_requests
    progress_every = max(10.0, duration_s / 10)
    keep_workdir = False
    t_start = time.monotonic()
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            if args.smoke:
                from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

                gguf = workdir / "tiny-soak.gguf"
                spec = SyntheticSpec(tie_embeddings=False, max_context=4096)
                write_gguf(gguf, spec, random_hf_weights(spec, seed=7), seed=7)
                duration_s, concurrency, sample_every = 6.0, 4, 0.5
                request_timeout, settle_timeout = 20.0, 5.0
                max_requests = max_requests or 400
                progress_every = 3600.0
            else:
                from rocmforge.errors import RocmForgeError
                from rocmforge.hub import resolve_model
                from rocmforge.settings import default_models_dir

                try:
                    gguf = resolve_model(args.gguf, default_models_dir())
                except RocmForgeError as exc:
                    print(f"soak: {exc}", file=sys.stderr)
                    return 2
            try:
                server = start_server(gguf, workdir, args.device, shlex.split(args.serve_args))
            except RuntimeError as exc:
                print(f"soak: {exc}", file=sys.stderr)
                keep_workdir = True
                return 2
            url = server.url
        try:
            info = fetch_info(url, headers)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            print(f"soak: GET {url}/models failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        config = RunConfig(url=url, pid=server.process.pid if server else None, duration_s=duration_s,
                           concurrency=concurrency, seed=args.seed, sample_every_s=sample_every,
                           request_timeout_s=request_timeout, settle_timeout_s=settle_timeout,
                           max_requests=max_requests, max_body_bytes=args.max_body_bytes, headers=headers,
                           progress_every_s=progress_every, front_load=args.smoke)
        print(f"[soak] {info.model_id} (context {info.max_model_len}, vocabulary {info.vocab_size}) at {url}: "
              f"{duration_s:.0f} s, {concurrency} clients, seed {args.seed}", file=sys.stderr, flush=True)
        result = asyncio.run(run_traffic(config, info))
        server_exit = None
        tracebacks = None
        if server is not None:
            status, seconds = stop_server(server)
            server_exit = {"status": status, "seconds": seconds}
            tracebacks = server.log_path.read_text(errors="replace").count("Traceback (most recent call last)")
            server = None
        report = summarize(config, info, result, server_exit, time.monotonic() - t_start, tracebacks)
        report["command"] = command
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_table(report)
        if not report["passed"] and not args.url:
            keep_workdir = True
            for path in workdir.glob("*.gguf"):  # the smoke run's model: only the log is worth keeping
                path.unlink()
            print(f"\nserver log kept in {workdir / 'serve.log'}")
        return 0 if report["passed"] else 1
    finally:
        if server is not None:  # interrupted: never leave the server behind
            stop_server(server)
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
