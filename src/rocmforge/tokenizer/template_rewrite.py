"""The AST rewrite that puts every loop and every ``~`` of a chat template under the budget.

In: the parsed template (Jinja's ``nodes.Template``), before Jinja compiles it.  Out: the
same tree with each ``for`` loop's iterable wrapped in :class:`CountedIterable` (each item
is one iteration against the budget and a deadline check) and each ``~`` turned into a call
of :func:`budgeted_concat` (what it prints is measured before it is built).  Both are
reached through ``ImportedName`` nodes, which a template cannot rebind.  Also here: the
``range`` global and the ``finalize`` hook (every ``{{ value }}``), the other two things the
compiled template calls directly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from jinja2 import nodes
from jinja2.runtime import markup_join, str_join
from jinja2.utils import pass_eval_context
from jinja2.visitor import NodeTransformer

from rocmforge.tokenizer.template_limits import BudgetExceeded, active_budget, text_size


class CountedIterable:
    """A ``for`` loop's iterable: each item counts one iteration (and checks the deadline).

    ``len()`` passes through, so ``loop.length`` works as before without consuming items.
    """

    __slots__ = ("_inner", "_items", "_budget")

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._inner = iterable
        self._items = iter(iterable)
        self._budget = active_budget()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self._items)
        if self._budget is not None:
            self._budget.tick()
        return item

    def __len__(self) -> int:
        # a generator has no len(): TypeError, which LoopContext expects and handles
        return len(self._inner)  # type: ignore[arg-type]


@pass_eval_context
def budgeted_concat(eval_ctx: Any, *values: Any) -> str:
    """The ``~`` operator: ``str`` of each operand, joined, measured before it is built."""
    budget = active_budget()
    if budget is not None:
        size = sum(text_size(value, budget.size_limit) for value in values)
        budget.charge(size, "the '~' operator")
    return str(markup_join(values) if eval_ctx.autoescape else str_join(values))


def budget_range(*args: int) -> range:
    """``range()``, refused when longer than the iteration budget (no loop could finish it)."""
    rng = range(*args)
    budget = active_budget()
    if budget is None:
        return rng
    try:
        length = len(rng)
    except OverflowError:  # more items than a C ssize_t holds
        length = sys.maxsize
    if length > budget.limits.max_iterations:
        raise BudgetExceeded(
            "iteration",
            f"range() of {length} items is longer than the {budget.limits.max_iterations} "
            "loop iterations a render may run",
        )
    return rng


def finalize(value: Any) -> Any:
    """Every ``{{ value }}``: a container is measured before ``str`` prints it."""
    if not isinstance(value, str):
        budget = active_budget()
        if budget is not None:
            budget.check_size(text_size(value, budget.size_limit), "printing a value")
    return value


_COUNTED = f"{__name__}.CountedIterable"
_CONCAT = f"{__name__}.budgeted_concat"


class BudgetRewrite(NodeTransformer):
    """Wrap each ``for`` iterable in :class:`CountedIterable`; turn ``~`` into a measured call."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        counted = _call(_COUNTED, [node.iter])
        counted.set_lineno(node.lineno)
        node.iter = counted
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _call(_CONCAT, list(node.nodes)).set_lineno(node.lineno)


def _call(importname: str, args: list[Any]) -> nodes.Call:
    return nodes.Call(nodes.ImportedName(importname), args, [], None, None)
