"""Chat templates under a budget: every runaway template ends quickly with a typed error.

Each case would freeze the server, exhaust its memory or raise an untyped error without
the budget; with it, the render ends with a :class:`ChatTemplateError` whose message and
``details["limit"]`` name the limit that was hit.
"""

from __future__ import annotations

import threading
import time

import pytest

from rocmforge.errors import ChatTemplateError, ConfigError
from rocmforge.tokenizer import ChatTemplate, TemplateLimits
from rocmforge.tokenizer.template_sandbox import sandbox_environment

USER = [{"role": "user", "content": "Hi"}]
DEEP = (
    "{% set L = range(1000000) | list %}{% set M = [L, L, L, L, L, L, L, L, L, L] %}"
)
"""Ten references to a million-item list: tiny in memory, 69 MB once printed."""

QUICK = 1.5
"""Seconds a refused render may take (generous for a busy 2-core machine)."""


def _refused(source: str, limit: str, limits: TemplateLimits | None = None) -> ChatTemplateError:
    template = ChatTemplate(source, limits=limits)
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError) as info:
        template.render(USER)
    elapsed = time.perf_counter() - start
    budget = template.limits.timeout_s if limit == "time" else 0.0
    assert elapsed < budget + QUICK, f"took {elapsed:.2f} s"
    assert info.value.details.get("limit") == limit, str(info.value)
    assert f"exceeded its {limit} limit" in str(info.value)
    return info.value


# The cases found against a live server.


def test_nested_range_loops_end_at_the_iteration_budget() -> None:
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    error = _refused(source, "iteration")
    assert "more than 1000000 loop iterations" in str(error)


def test_string_repeat_is_refused_before_it_is_built() -> None:
    error = _refused("{{ 'x' * 10**10 }}", "size")
    assert "10000000000 characters" in str(error)


def test_huge_power_is_refused_before_it_is_computed() -> None:
    _refused("{{ 10 ** (10 ** 10) }}", "number size")


def test_chained_power_is_left_associative_in_jinja_and_small() -> None:
    # Jinja reads 10 ** 10 ** 10 as (10 ** 10) ** 10 = 10 ** 100: nothing to refuse
    start = time.perf_counter()
    assert ChatTemplate("{{ 10 ** 10 ** 10 }}").render(USER) == "1" + "0" * 100
    assert time.perf_counter() - start < QUICK


def test_recursive_macro_ends_with_a_recursion_error() -> None:
    _refused("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion")


def test_branching_recursive_macro_ends_at_the_deadline() -> None:
    source = (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}"
    )
    _refused(source, "time", TemplateLimits(timeout_s=0.2, max_iterations=10**9))
    _refused(source, "iteration", TemplateLimits(max_iterations=1000))


# Loops over anything, not just range().


@pytest.mark.parametrize(
    "source",
    [
        "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "{% for x in range(1000) recursive %}{% if loop.depth < 3 %}{{ loop(range(1000)) }}"
        "{% endif %}{% endfor %}",
        "{% for i in range(1000) %}{% for m in messages * 1000 %}{% endfor %}{% endfor %}",
    ],
)
def test_every_loop_counts(source: str) -> None:
    _refused(source, "iteration", TemplateLimits(max_iterations=100_000))


def test_range_longer_than_the_budget_is_refused_when_called() -> None:
    error = _refused("{{ range(10 ** 9) | list | length }}", "iteration")
    assert "range() of 1000000000 items" in str(error)


# Everything that takes a width or a count, or repeats, is bounded before it runs.


@pytest.mark.parametrize(
    "source",
    [
        "{{ '' | center(10**10) }}",
        "{{ 'a' | indent(10**10) }}",
        "{{ ('a ' * 1000) | wordwrap(1, wrapstring='x' * 100000) }}",
        "{{ '%10000000000s' | format(1) }}",
        "{{ ('x' * 1000) | replace('', 'y' * 10000) }}",
        "{{ [1] | batch(10**9, 0) | list | length }}",
        "{{ [1] | slice(10**9) | list | length }}",
        "{{ (['x' * 1000000] * 10) | join(',') }}",
        "{{ ([range(1000000) | list] * 1000) | sum(start=[]) | length }}",
        "{{ 'x' | tojson(indent=10**9) }}",
        "{{ ('a' * 100) | urlize(target='x' * 1000000) }}",
        "{{ 'x'.center(10**10) }}",
        "{{ 'x'.ljust(10**10) }}",
        "{{ ''.zfill(10**10) }}",
        "{{ 'a\tb'.expandtabs(10**10) }}",
        "{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}",
        "{% set s = 'x' * 1000000 %}{{ s.translate({120: s}) }}",
        "{{ ','.join(['x' * 1000000] * 10) }}",
        "{{ (1).to_bytes(10**10, 'big') }}",
        "{{ '{:>10000000000}'.format(1) }}",
        "{{ '{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}'.format('x' * 1000000) }}",
        "{{ '%*s' % (10**10, 1) }}",
        "{{ '%(a)s%(a)s%(a)s%(a)s%(a)s%(a)s%(a)s%(a)s%(a)s%(a)s' % {'a': 'x' * 1000000} }}",
        "{{ [1] * 10**9 }}",
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
    ],
)
def test_amplifying_operations_are_refused(source: str) -> None:
    _refused(source, "size")


@pytest.mark.parametrize(
    "source",
    [
        DEEP + "{{ M }}",
        DEEP + "{{ M | tojson }}",
        DEEP + "{{ M | string }}",
        DEEP + "{{ M | pprint }}",
        DEEP + "{{ M ~ '' }}",
        DEEP + "{{ '%s' % (M,) }}",
        DEEP + "{{ '{}'.format(M) }}",
        DEEP + "{{ '{!r}'.format(M) }}",
    ],
)
def test_printing_shared_references_is_measured_first(source: str) -> None:
    _refused(source, "size")


def test_integer_growth_is_refused() -> None:
    source = (
        "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
        "{% endfor %}"
    )
    _refused(source, "number size")


def test_output_is_capped_chunk_by_chunk() -> None:
    error = _refused("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "size")
    assert "the rendered prompt" in str(error)


def test_buffers_of_macros_are_measured_when_joined() -> None:
    text = "x" * 1000  # literal text: nothing but the join sees it
    source = (
        "{% macro m() %}{% for i in range(100000) %}" + text + "{% endfor %}{% endmacro %}"
        "{{ m() }}"
    )
    error = _refused(source, "size")
    assert "joining rendered output" in str(error)


def test_memory_held_across_iterations_is_capped() -> None:
    source = (
        "{% set ns = namespace(l=[]) %}{% for i in range(1000000) %}"
        "{% set ns.l = [ns.l, 'x' * 1000000] %}{% endfor %}"
    )
    _refused(source, "allocation")


def test_lipsum_is_not_available() -> None:
    with pytest.raises(ChatTemplateError, match="'lipsum' is undefined"):
        ChatTemplate("{{ lipsum(10**6) }}").render(USER)


# Other failures are typed too.


def test_template_too_deep_to_compile() -> None:
    source = "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"
    with pytest.raises(ChatTemplateError, match="too deeply nested to compile"):
        ChatTemplate(source)


def test_memory_error_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(fmt: str) -> str:
        raise MemoryError

    monkeypatch.setitem(sandbox_environment().globals, "strftime_now", exhausted)
    with pytest.raises(ChatTemplateError, match="memory") as info:
        ChatTemplate("{{ strftime_now('%Y') }}").render(USER)
    assert info.value.details["limit"] == "memory"


# Real use is untouched, and the limits are the caller's to change.


def test_long_input_raises_the_size_limit_with_it() -> None:
    content = "word " * 600_000  # 3 MB, three times the fixed allowance, printed twice
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content | trim }}\n{{ m.content }}{% endfor %}"
    )
    rendered = template.render([{"role": "user", "content": content}])
    assert rendered == content.strip() + "\n" + content


def test_limits_are_configurable() -> None:
    source = "{% for i in range(10) %}.{% endfor %}"
    assert ChatTemplate(source, limits=TemplateLimits(max_iterations=10)).render(USER) == "." * 10
    template = ChatTemplate(source)
    template.limits = TemplateLimits(max_iterations=9)
    with pytest.raises(ChatTemplateError, match="longer than the 9 loop iterations"):
        template.render(USER)
    small = ChatTemplate("{{ 'x' * 100 }}", limits=TemplateLimits(max_output_chars=10))
    # 10 + twice the input's 17 characters ("role", "user", "content", "Hi")
    with pytest.raises(ChatTemplateError, match=r"size limit: .* \(limit 44\)"):
        small.render(USER)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", 0),
        ("max_iterations", 0),
        ("max_output_chars", -1),
        ("max_allocated_chars", 1.5),
    ],
)
def test_invalid_limits(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        TemplateLimits(**{field: value})  # type: ignore[arg-type]
    assert info.value.param == field


def test_each_render_has_its_own_budget() -> None:
    """A runaway render on one thread does not eat into another thread's budget."""
    slow = ChatTemplate(
        "{% for i in range(1000000) %}{% endfor %}", limits=TemplateLimits(timeout_s=0.5)
    )
    loop = ChatTemplate("{% for i in range(400000) %}{% endfor %}ok")
    failures: list[BaseException] = []

    def run_slow() -> None:
        try:
            slow.render(USER)
        except ChatTemplateError as exc:
            failures.append(exc)

    thread = threading.Thread(target=run_slow)
    thread.start()
    for _ in range(3):
        assert loop.render(USER) == "ok"  # 1.2 M iterations in all, 400 k per render
    thread.join()
    assert all(isinstance(exc, ChatTemplateError) for exc in failures)
