"""The Jinja environment chat templates run in: HF's sandbox, plus a budget on every operation.

In: template source (compiled by :func:`sandbox_environment`'s environment).  Out: compiled
templates whose every potentially unbounded operation checks the active
:class:`~.template_limits.RenderBudget` first.  Jinja is pure Python, so the hooks below
cover what a template can do:

* every ``for`` loop's iterable is wrapped (an AST rewrite before compilation,
  :mod:`.template_rewrite`) so each iteration counts against the iteration budget and
  checks the deadline; recursive loops and macro calls are counted in
  :meth:`BudgetedSandbox.call`;
* ``range()`` longer than the iteration budget is refused; ``lipsum`` is removed;
* all seven binary operators are intercepted: ``*``, ``+`` and ``%`` on strings and lists
  are refused before they run when the result would pass the size limit, ``*`` and ``**``
  on integers when it would pass :data:`~.template_limits.MAX_INT_BITS`;
* ``~``, ``{{ value }}`` of a container, ``str.format`` and ``%`` measure what they are
  about to print (:func:`~.template_limits.text_size`) before printing it;
* every filter is wrapped (:mod:`.template_bounds` holds the per-filter and per-``str``-method
  bounds for the ones that take a width or a count); the buffers of macros, loops and
  blocks are measured when they are joined (:meth:`BudgetedSandbox.concat`); attribute and
  item lookups and calls check the deadline.

Anything these hooks let through is bounded by the size limit, so one un-hooked C call
(a sort, a ``str.join``) costs at most milliseconds past the deadline.  Outside a render
(constant folding at compile time) no budget is active and the hooks check nothing, and
the wrapped filters are marked context filters so Jinja never folds them.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from string import Formatter
from types import BuiltinMethodType, MethodType
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import _PassArg, pass_context
from markupsafe import EscapeFormatter, Markup

from rocmforge.tokenizer.template_bounds import (
    FILTER_BOUNDS,
    NO_CHARGE_FILTERS,
    check_binop,
    check_format_field,
    check_method_call,
)
from rocmforge.tokenizer.template_limits import active_budget, text_size
from rocmforge.tokenizer.template_rewrite import (
    BudgetRewrite,
    CountedIterable,
    budget_range,
    finalize,
)

_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "**": operator.pow,
    "%": operator.mod,
}


class TemplateRaised(jinja2.TemplateError):
    """What ``raise_exception(message)`` inside a template raises."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's ``tojson``: plain ``json.dumps`` (Jinja's built-in one HTML-escapes)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant spans): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


# --- str.format ---------------------------------------------------------------------------


class _BudgetFormatterMixin(Formatter):
    """Measures each field of a ``str.format`` call before formatting it."""

    _produced = 0

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        self._produced = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        budget = active_budget()
        if budget is not None and conversion is not None:
            budget.check_size(text_size(value, budget.size_limit), "str.format()")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = active_budget()
        if budget is not None:
            check_format_field(budget, value, format_spec, self._produced)
        result = super().format_field(value, format_spec)
        self._produced += len(result)
        return result


class _BudgetFormatter(_BudgetFormatterMixin, SandboxedFormatter):
    pass


class _BudgetEscapeFormatter(_BudgetFormatterMixin, SandboxedFormatter, EscapeFormatter):
    pass


# --- the environment ---------------------------------------------------------------------


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """HF's immutable sandbox with budget hooks; an unsafe attribute access is an error."""

    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = budget_range
        self.globals.pop("lipsum", None)  # lipsum(10**9) builds text without any loop
        self.finalize = finalize

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        rewritten = BudgetRewrite().visit(tree)
        if not isinstance(rewritten, nodes.Template):
            raise TypeError("the budget rewrite must return the template node")
        return rewritten

    def wrap_filters(self) -> None:
        """Replace every filter with a budgeted one; call after the filters are all added."""
        self.filters = {name: _budgeted_filter(name, func) for name, func in self.filters.items()}

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def concat(self, parts: Iterable[str]) -> str:
        """Join a buffer (a macro's, a loop's, a block's): measured and charged first."""
        if not isinstance(parts, list):
            parts = list(parts)
        budget = active_budget()
        if budget is not None:
            budget.charge(sum(map(len, parts)), "joining rendered output")
            budget.check_time()
        return "".join(parts)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not self.is_safe_callable(obj):
            raise SecurityError(f"{obj!r} is not safely callable")
        budget = active_budget()
        if budget is None:
            return context.call(obj, *args, **kwargs)
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, Macro):
            budget.tick()
        elif isinstance(obj, LoopContext) and args:  # a recursive loop's loop(children)
            args = (CountedIterable(args[0]), *args[1:])
        elif isinstance(obj, (BuiltinMethodType, MethodType)):
            args = check_method_call(budget, owner, obj.__name__, args, kwargs)
        budget.check_time()
        result = context.call(obj, *args, **kwargs)
        if isinstance(owner, (str, bytes, list, tuple)):
            budget.check_result(result, f"{type(owner).__name__}.{getattr(obj, '__name__', '?')}()")
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = active_budget()
        if budget is None:
            return _BINOPS[operator](left, right)
        check_binop(budget, operator, left, right)
        result = _BINOPS[operator](left, right)
        budget.check_result(result, f"the {operator!r} operator")
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = active_budget()
        result = super().getitem(obj, argument)
        if budget is not None:
            if isinstance(argument, slice):
                budget.check_result(result, "slicing")
            budget.check_time()
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's ``str.format`` sandboxing, with a formatter that measures each field."""
        if not isinstance(value, (MethodType, BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type: type[str] = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: Formatter
        if isinstance(f_self, Markup):
            formatter = _BudgetEscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _BudgetFormatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            result = str_type(formatter.vformat(f_self, args, kwargs))
            budget = active_budget()
            if budget is not None:
                budget.check_result(result, "str.format()")
            return result

        return functools.update_wrapper(wrapper, value)


def _check_time() -> None:
    budget = active_budget()
    if budget is not None:
        budget.check_time()


def _budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the budget: its bound checked before, its result charged after.

    The wrapper takes the context (so Jinja never folds it at compile time) and passes on
    whatever ``func`` itself asks for (context, eval context or environment).
    """
    pass_arg = _PassArg.from_obj(func)
    bound = FILTER_BOUNDS.get(name)
    charge = name not in NO_CHARGE_FILTERS
    what = f"the {name!r} filter"

    @pass_context
    def budgeted(context: Any, *args: Any, **kwargs: Any) -> Any:
        budget = active_budget()
        if budget is not None:
            budget.check_time()
            if bound is not None:
                args = bound(budget, args, kwargs)
        result = func(*_pass_args(pass_arg, context), *args, **kwargs)
        if budget is not None and charge:
            budget.check_result(result, what)
        return result

    budgeted.__name__ = getattr(func, "__name__", name)
    budgeted.__doc__ = func.__doc__
    return budgeted


def _pass_args(pass_arg: _PassArg | None, context: Any) -> tuple[Any, ...]:
    if pass_arg is _PassArg.context:
        return (context,)
    if pass_arg is _PassArg.eval_context:
        return (context.eval_ctx,)
    if pass_arg is _PassArg.environment:
        return (context.environment,)
    return ()


@functools.cache
def sandbox_environment() -> BudgetedSandbox:
    """The one environment every chat template compiles in (its state is all per render)."""
    env = BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.wrap_filters()
    return env

