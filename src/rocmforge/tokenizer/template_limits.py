"""The limits a chat-template render runs under, and the per-render budget that enforces them.

In: a :class:`TemplateLimits` (one per :class:`~rocmforge.tokenizer.ChatTemplate`) and, per
render, the number of characters of input the template was given.  Out: a
:class:`RenderBudget`, made active for the duration of one render by :func:`budget_scope`;
the sandbox hooks (:mod:`.template_sandbox`) find it with :func:`active_budget` and call its
checks, which raise :class:`BudgetExceeded` naming the limit that was hit.

The budget lives in a :class:`contextvars.ContextVar`, not in the (shared, cached) Jinja
environment, so concurrent renders on different threads each see their own.  Outside a
render (Jinja folding constants while it compiles a template) there is no budget and the
hooks check nothing; what they could see then comes from the template source alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Set
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

from jinja2.utils import Namespace

from rocmforge.config.fields import Rule, apply_rules, integer, number

MAX_INT_BITS = 1 << 16
"""Largest integer (in bits, ~19,700 digits) an arithmetic operator may produce.  Python
cannot print more than 4,300 digits anyway; the cap keeps ``10 ** 10 ** 10`` from running."""


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """What one render may spend.  The defaults are orders of magnitude above real templates.

    Measured (``tests/tokenizer/real_templates.py``): the templates of SmolLM2, Llama 3,
    Mistral, Qwen 2.5 and Qwen 3 render a six-turn tool-calling conversation in under 0.3 ms
    with at most 14 loop iterations; with 1 MB of content per message (5 MB in all) they
    take 20-30 ms, output their input plus under 1 KB, and their operations create at most
    3.2 characters per input character.
    """

    timeout_s: float = 2.0
    """Wall-clock seconds a render may take (70x a real template's time on a 5 MB
    conversation, so a busy machine never hits it, while a runaway template holds a server
    thread for about 2 s at most)."""
    max_iterations: int = 1_000_000
    """Loop iterations plus macro calls (a real template: a few per message; a million take
    Jinja about a second).  ``range()`` longer than this is refused when it is called."""
    max_output_chars: int = 1 << 20
    """Characters the render may produce beyond its input: the output, and any one string
    or list the template builds, may have at most this many plus twice the characters of
    the messages and variables it was given (so a long prompt is never refused, even by a
    template that prints it twice, while ``'x' * 10**10`` is refused before it is built)."""
    max_allocated_chars: int = 64 << 20
    """Characters (or list items) all the template's string and list operations may create
    together, plus 16 per input character: a bound on the memory a template can hold
    (a real template copies its input a few times)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "timeout_s": number(0.0, low_open=True),
        "max_iterations": integer(1),
        "max_output_chars": integer(1),
        "max_allocated_chars": integer(1),
    }

    def __post_init__(self) -> None:
        apply_rules(self)


class BudgetExceeded(Exception):
    """A render went over one of its limits; ``limit`` names it (``"time"``, ``"iteration"``,
    ``"size"``, ``"allocation"``, ``"number size"``)."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(f"chat template exceeded its {limit} limit: {detail}")
        self.limit = limit


class RenderBudget:
    """The mutable state of one render: its deadline and what it has used so far."""

    __slots__ = ("limits", "deadline", "size_limit", "alloc_limit", "iterations", "allocated")

    def __init__(self, limits: TemplateLimits, input_chars: int) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.size_limit = limits.max_output_chars + 2 * input_chars
        """The most characters (or items) the output or any one value may have."""
        self.alloc_limit = limits.max_allocated_chars + 16 * input_chars
        self.iterations = 0
        self.allocated = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded("time", f"rendering took longer than {self.limits.timeout_s:g} s")

    def tick(self) -> None:
        """One loop iteration or macro call."""
        self.iterations += 1
        if self.iterations > self.limits.max_iterations:
            limit = self.limits.max_iterations
            raise BudgetExceeded("iteration", f"more than {limit} loop iterations and macro calls")
        self.check_time()

    def check_size(self, size: int, what: str) -> None:
        """Refuse ``what`` when it would have ``size`` characters (or items)."""
        if size > self.size_limit:
            raise BudgetExceeded(
                "size", f"{what} would have {size} characters or items (limit {self.size_limit})"
            )

    def check_int(self, bits: float, what: str) -> None:
        if bits > MAX_INT_BITS:
            raise BudgetExceeded(
                "number size", f"{what} would have about {bits:.0f} bits (limit {MAX_INT_BITS})"
            )

    def charge(self, size: int, what: str) -> None:
        """Count ``size`` newly created characters (or items) against the allocation budget."""
        self.check_size(size, what)
        self.allocated += size
        if self.allocated > self.alloc_limit:
            raise BudgetExceeded(
                "allocation",
                f"its operations created more than {self.alloc_limit} characters in total",
            )

    def check_result(self, value: Any, what: str) -> None:
        """Charge a value an operation just produced (strings, bytes, lists, tuples)."""
        if isinstance(value, (str, bytes, list, tuple)):
            self.charge(len(value), what)
        elif isinstance(value, int):
            self.check_int(value.bit_length(), what)
        self.check_time()


_ACTIVE: ContextVar[RenderBudget | None] = ContextVar("rocmforge_template_budget", default=None)


def active_budget() -> RenderBudget | None:
    """The budget of the render running in this thread (or task), if any."""
    return _ACTIVE.get()


@contextmanager
def budget_scope(limits: TemplateLimits, input_chars: int) -> Iterator[RenderBudget]:
    """Make a fresh budget active for the ``with`` block (one render)."""
    budget = RenderBudget(limits, input_chars)
    token = _ACTIVE.set(budget)
    try:
        yield budget
    finally:
        _ACTIVE.reset(token)


def text_size(value: Any, limit: int) -> int:
    """About ``len(str(value))``, exact for strings; stops counting once past ``limit``.

    Containers are walked (shared references counted each time they occur, as ``str``
    prints them), so a list holding itself or ten copies of a big list is measured, not
    printed.  Each node counts at least one, so the walk ends after ``limit`` nodes.
    """
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, (list, tuple, Set, type({}.items()), type({}.keys()))):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += 64
    return total
