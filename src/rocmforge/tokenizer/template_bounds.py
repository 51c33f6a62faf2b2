"""Size bounds of the operations a chat template could amplify with, checked before they run.

In: the active :class:`~.template_limits.RenderBudget` and an operation's operands (a binary
operator's, a filter's, a ``str`` method's, a ``str.format`` field's).  Out: nothing when the
operation may run (filters and methods get their arguments back, an iterable made a list so
it can be measured), else :class:`~.template_limits.BudgetExceeded` naming the size limit.

A bound is an upper estimate of the result's length from the operands alone (``width``,
``count``, repeat factor, the text of what will be printed), so ``'x' * 10**10``,
``''|center(10**9)`` or ``'{:>999999999}'.format(1)`` are refused without allocating.
Operations whose output is at most a small multiple of their input need no bound: their
result is charged afterwards (:meth:`~.template_limits.RenderBudget.check_result`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rocmforge.tokenizer.template_limits import RenderBudget, text_size

Args = tuple[Any, ...]
FilterBound = Callable[[RenderBudget, Args, dict[str, Any]], Args]

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_DIGITS = re.compile(r"\d+")


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _arg(args: Args, kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    """A filter's parameter, given by position (``args[index]``) or by name."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _text(budget: RenderBudget, value: Any) -> int:
    return text_size(value, budget.size_limit)


# --- operators ----------------------------------------------------------------------------


def check_binop(budget: RenderBudget, op: str, left: Any, right: Any) -> None:
    """Refuse a binary operator whose result would pass the size or integer limit."""
    what = f"the {op!r} operator"
    if op == "*":
        for seq, count in ((left, right), (right, left)):
            size = _length(seq)
            if size is not None and _is_int(count):
                budget.check_size(size * max(count, 0), what)
                return
        if _is_int(left) and _is_int(right):
            budget.check_int(left.bit_length() + right.bit_length(), what)
    elif op == "+":
        a, b = _length(left), _length(right)
        if a is not None and b is not None:
            budget.check_size(a + b, what)
    elif op == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            exponent = float(right) if right.bit_length() < 1000 else math.inf
            budget.check_int(exponent * math.log2(abs(left)), what)
    elif op == "%" and isinstance(left, (str, bytes)):
        check_percent(budget, left, right, what)


def check_percent(budget: RenderBudget, fmt: str | bytes, values: Any, what: str) -> None:
    """``fmt % values``: the format's length, its widths and precisions, and each conversion
    counted as long as the longest value."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    conversions = 0
    widths = 0
    star = False
    for match in _PERCENT_SPEC.finditer(text):
        if match.group(3) == "%":
            continue
        conversions += 1
        for number in (match.group(1), match.group(2)):
            if number == "*":
                star = True
            elif number:
                widths += int(number)
    if isinstance(values, tuple):
        items: tuple[Any, ...] = values
    elif isinstance(values, Mapping):
        items = tuple(values.values())
    else:
        items = (values,)
    if star:
        widths += sum(abs(item) for item in items if _is_int(item))
    longest = max((_text(budget, item) for item in items), default=0)
    budget.check_size(len(text) + widths + conversions * longest, what)


def check_format_field(budget: RenderBudget, value: Any, spec: str, produced: int) -> None:
    """One ``str.format`` field: every number in its spec counted as width (conservative)."""
    widths = sum(int(number) for number in _DIGITS.findall(spec))
    budget.check_size(produced + _text(budget, value) + widths, "str.format()")


# --- str / bytes / int methods ------------------------------------------------------------


def _join_items(budget: RenderBudget, sep: Any, items: list[Any], what: str) -> None:
    size = sum(_text(budget, item) for item in items)
    budget.check_size(size + _text(budget, sep) * max(len(items) - 1, 0), what)


def check_method_call(
    budget: RenderBudget, owner: Any, name: str, args: Args, kwargs: dict[str, Any]
) -> Args:
    """Bound a ``str``/``bytes`` method (or ``int.to_bytes``) that can build a long result."""
    what = f"{type(owner).__name__}.{name}()"
    if isinstance(owner, (str, bytes)):
        size = len(owner)
        if name in ("center", "ljust", "rjust", "zfill") and args:
            budget.check_size(max(size, _int_or_zero(args[0])), what)
        elif name == "expandtabs":
            tabsize = _int_or_zero(_arg(args, kwargs, 0, "tabsize", 8))
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            budget.check_size(size + tabs * max(tabsize, 0), what)
        elif name == "replace" and len(args) >= 2:
            budget.check_size(_replace_bound(owner, args[0], args[1], args[2:3]), what)
        elif name == "join" and args:
            items = list(args[0])
            _join_items(budget, owner, items, what)
            return (items, *args[1:])
        elif name == "translate" and args:
            budget.check_size(size * max(_longest_value(args[0]), 1), what)
    elif isinstance(owner, int) and name == "to_bytes":
        budget.check_size(_int_or_zero(_arg(args, kwargs, 0, "length", 1)), what)
    return args


def _replace_bound(text: Any, old: Any, new: Any, count: Args) -> int:
    if not isinstance(old, type(text)) or not isinstance(new, type(text)):
        return len(text)  # replace raises TypeError
    hits = len(text) + 1 if not old else text.count(old)
    if count and _is_int(count[0]) and count[0] >= 0:
        hits = min(hits, count[0])
    return len(text) + hits * max(len(new) - len(old), 0)


def _longest_value(table: Any) -> int:
    values: Iterable[Any] = table.values() if isinstance(table, Mapping) else ()
    if isinstance(table, (list, tuple)):
        values = table
    return max((len(v) for v in values if isinstance(v, (str, bytes))), default=1)


# --- filters ------------------------------------------------------------------------------


def _stringified(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    """A filter that prints its value: the value's text must fit."""
    if args:
        budget.check_size(_text(budget, args[0]), "a filter's input")
    return args


def _center(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    width = _int_or_zero(_arg(args, kwargs, 1, "width", 80))
    budget.check_size(max(_text(budget, args[0]), width), "the 'center' filter")
    return args


def _indent(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    text = str(args[0]) if isinstance(args[0], str) else ""
    width = _arg(args, kwargs, 1, "width", 4)
    unit = len(width) if isinstance(width, str) else _int_or_zero(width)
    budget.check_size(unit, "the 'indent' filter")
    lines = text.count("\n") + 1
    budget.check_size(_text(budget, args[0]) + unit * lines, "the 'indent' filter")
    return args


def _wordwrap(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    size = _text(budget, args[0])
    width = max(_int_or_zero(_arg(args, kwargs, 1, "width", 79)), 1)
    wrapstring = _arg(args, kwargs, 3, "wrapstring", None)
    unit = len(wrapstring) if isinstance(wrapstring, str) else 1
    newlines = args[0].count("\n") if isinstance(args[0], str) else 0
    lines = 2 * size // width + newlines + 1
    budget.check_size(size + unit * lines, "the 'wordwrap' filter")
    return args


def _format(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    if args and isinstance(args[0], str):
        check_percent(budget, args[0], kwargs or tuple(args[1:]), "the 'format' filter")
    return args


def _replace(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    if len(args) < 3 or not isinstance(args[0], str):
        return args
    old, new = args[1], args[2]
    if isinstance(old, str) and isinstance(new, str):
        count = _arg(args, kwargs, 3, "count", None)
        bound = _replace_bound(args[0], old, new, (count,) if count else ())
    else:  # the filter prints them first: measure, and assume the worst
        bound = len(args[0]) + (len(args[0]) + 1) * _text(budget, new) + _text(budget, old)
    budget.check_size(bound, "the 'replace' filter")
    return args


def _join(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    items = list(args[0])
    _join_items(budget, _arg(args, kwargs, 1, "d", ""), items, "the 'join' filter")
    return (items, *args[1:])


def _count_arg(index: int, name: str, filter_name: str) -> FilterBound:
    """A filter whose ``name`` parameter is a number of items it will create."""

    def bound(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
        count = _int_or_zero(_arg(args, kwargs, index, name, 0))
        budget.check_size(count, f"the {filter_name!r} filter")
        return args

    return bound


def _sum(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    start = _arg(args, kwargs, 2, "start", 0)
    if _length(start) is None:
        return args
    items = list(args[0])
    size = _length(start) or 0
    size += sum(_length(item) or 0 for item in items)
    budget.check_size(size, "the 'sum' filter")
    return (items, *args[1:])


def _layout_bound(budget: RenderBudget, value: Any, indent: int, separator: int) -> int:
    """About the length of ``value`` printed one node per line, each indented by its depth.

    A container's children are charged their line before they are looked at, so a huge
    container is refused without walking it.
    """
    limit = budget.size_limit
    total = 1 + separator
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= limit:
        item, depth = stack.pop()
        children: list[Any] | None = None
        if isinstance(item, Mapping):
            children = [child for pair in item.items() for child in pair]
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            total += text_size(item, limit)
            continue
        total += len(children) * (1 + separator + indent * (depth + 1))
        if total <= limit:
            stack.extend((child, depth + 1) for child in children)
    return total


def _tojson(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    indent = _arg(args, kwargs, 2, "indent", None)
    unit = len(indent) if isinstance(indent, str) else _int_or_zero(indent)
    separators = _arg(args, kwargs, 3, "separators", None)
    separator = sum(map(len, separators)) if isinstance(separators, (list, tuple)) else 2
    budget.check_size(unit, "the 'tojson' filter")
    budget.check_size(_layout_bound(budget, args[0], unit, separator), "the 'tojson' filter")
    return args


def _pprint(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    budget.check_size(_layout_bound(budget, args[0], 1, 2), "the 'pprint' filter")
    return args


def _urlize(budget: RenderBudget, args: Args, kwargs: dict[str, Any]) -> Args:
    size = _text(budget, args[0])
    extra = sum(
        len(value)
        for value in (_arg(args, kwargs, 3, "target", None), _arg(args, kwargs, 4, "rel", None))
        if isinstance(value, str)
    )
    budget.check_size(3 * size + (size // 2 + 1) * (extra + 40), "the 'urlize' filter")
    return args


FILTER_BOUNDS: dict[str, FilterBound] = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "format": _format,
    "replace": _replace,
    "join": _join,
    "batch": _count_arg(1, "linecount", "batch"),
    "slice": _count_arg(1, "slices", "slice"),
    "sum": _sum,
    "tojson": _tojson,
    "pprint": _pprint,
    "urlize": _urlize,
    **{
        name: _stringified
        for name in (
            "string", "e", "escape", "forceescape", "safe", "trim", "upper", "lower", "title",
            "capitalize", "striptags", "wordcount", "urlencode", "xmlattr", "truncate",
        )
    },
}
"""Per-filter checks run before the filter (the others need none: see the module docstring)."""

NO_CHARGE_FILTERS = frozenset(
    {"first", "last", "default", "d", "attr", "random", "min", "max", "length", "count"}
)
"""Filters that return (part of) their input rather than build something new."""
