"""Turning request bodies into token ids (and ids back into text), off the event loop.

In: prompt text, chat messages or token ids from the routes, and the server's state. Out:
token ids (or text). Tokenizing a long prompt, rendering a chat template and decoding long id
lists are CPU work of many milliseconds: they run on the server's worker threads
(``ServerState.workers``, one per core, carrying the request's log context), and the
tokenizer releases the GIL while it works, so ``/health`` and every other request keep being
served while clients send big prompts.

Before any of that work: a text whose UTF-8 length exceeds ``max_model_len`` times the longest
token's bytes cannot fit the context whatever it tokenizes to (each token covers at most that
many bytes), so it is refused at once with ``context_length_exceeded``. And one HTTP request
may start at most ``max_choices_per_request`` engine requests (prompts x ``n``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rocmforge.errors import ChatTemplateError, ContextLengthExceededError, InvalidRequestError
from rocmforge.server.protocol import ChatMessage
from rocmforge.server.state import ServerState
from rocmforge.server.tool_calls import history

LENGTH_SLACK_BYTES = 64
"""Added to the bound: special tokens and a SentencePiece space prefix add bytes of their own."""

T = TypeVar("T")


async def off_loop(state: ServerState, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a worker thread, in the caller's context (its log fields)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(state.workers, call)


def check_fanout(state: ServerState, num_prompts: int, n: int) -> None:
    """Raise (400, naming ``n``, or ``prompt`` for a list of too many prompts) when prompts x
    ``n`` exceeds ``max_choices_per_request``."""
    cap = state.config.max_choices_per_request
    if num_prompts * n > cap:
        what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
        raise InvalidRequestError(
            f"{what} would start {num_prompts * n} generations; at most {cap} per request "
            "(max_choices_per_request)", param="n" if n > 1 else "prompt",
        )


def check_text_length(state: ServerState, text: str, param: str = "prompt") -> None:
    """Refuse, without tokenizing, a text too long for the context whatever its tokens."""
    limit = state.engine.max_model_len * state.tokenizer.max_token_bytes + LENGTH_SLACK_BYTES
    if len(text) * 4 > limit and len(text.encode("utf-8")) > limit:  # 4: UTF-8's widest character
        raise ContextLengthExceededError(
            f"the {param} is {len(text.encode('utf-8'))} bytes long: more than {state.engine.max_model_len} "
            f"tokens of at most {state.tokenizer.max_token_bytes} bytes each, the context window",
            param=param,
        )


async def encode_text(state: ServerState, text: str, *, add_special: bool, param: str = "prompt") -> list[int]:
    """A raw prompt's ids (control-token text in it is parsed: the client writes the
    template itself), tokenized on a worker thread."""
    check_text_length(state, text, param)
    return await off_loop(state, state.tokenizer.encode, text, add_special)


async def encode_texts(state: ServerState, texts: Sequence[str], *, add_special: bool) -> list[list[int]]:
    for text in texts:
        check_text_length(state, text)
    return [await off_loop(state, state.tokenizer.encode, text, add_special) for text in texts]


async def encode_chat(state: ServerState, messages: Sequence[ChatMessage],
                      tools: list[dict[str, Any]] | None = None,
                      template_variables: dict[str, Any] | None = None) -> list[int]:
    """A conversation's ids through the model's chat template, on a worker thread. Control
    tokens come from the template only, unless ``special_tokens_in_content`` is on.
    ``tools`` go to the template as its ``tools`` variable when it renders them; otherwise
    they are described in the system message (the server's tool format's ``tools_prompt``),
    and a template that knows no ``tool_calls`` gets the tool-call history written out in the
    same format (:func:`~rocmforge.server.tool_calls.history`). ``template_variables`` are
    the request's own (``chat_template_kwargs``)."""
    tokenizer = state.tokenizer
    template = tokenizer.chat_template
    if template is None:
        raise ChatTemplateError("this model has no chat template; use /v1/completions")
    for message in messages:
        check_text_length(state, message.text(), "messages")
        for call in message.tool_calls or ():
            check_text_length(state, call.function.arguments, "messages")
    plain = [m.template_message() for m in messages]
    if "tool_calls" not in template.source:
        plain = history(plain, state.tool_format)
    extra: dict[str, Any] = dict(template_variables or {})
    if tools and "tools" in template.source:
        extra["tools"] = tools
    elif tools:
        plain = _with_tools_prompt(plain, state.tool_format.tools_prompt(tools))
    # The template's variables travel in a partial: none of them can collide with off_loop's
    # own parameters (protocol.RESERVED_TEMPLATE_VARIABLES keeps encode_chat's).
    render = functools.partial(tokenizer.encode_chat, plain, add_generation_prompt=True,
                               special_tokens_in_content=state.config.special_tokens_in_content, **extra)
    return (await off_loop(state, render)).ids


def _with_tools_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """``messages`` with ``prompt`` at the end of the system message (one is added first)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content'] or ''}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


async def decode(state: ServerState, ids: Sequence[int]) -> str:
    """Text of ``ids`` (checked against the vocabulary by the tokenizer), on a worker thread."""
    return await off_loop(state, state.tokenizer.decode, list(ids))
