"""Tests for overlay.tools: the safe calculator, the registry and CALL parsing."""

from __future__ import annotations

import logging
import operator
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import tools
from overlay.tools import (
    Tool,
    ToolError,
    ToolResult,
    available_tools,
    calc,
    evaluate,
    get_tool,
    register_tool,
    run_tool_call,
)

FAST = settings(max_examples=150, deadline=None)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("48/2", "24"),
        ("48+24", "72"),
        ("10/4", "2.5"),
        ("1/3", "0.3333333333"),
        ("2/3", "0.6666666667"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("-7 % 3", "2"),
        ("7 % -3", "-2"),
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        ("4**0.5", "2"),
        ("-2**2", "-4"),
        ("(-2)**2", "4"),
        ("+5 - -3", "8"),
        ("0.1 + 0.2", "0.3"),
        ("1.50 * 4", "6"),
        ("(3 + 4) * (5 - 2) / 7", "3"),
        ("  12 *\t3  ", "36"),
        ("10**100", "1" + "0" * 100),
        ("1e-10/3", "3.333333333e-11"),
        ("1e30/7", "1.428571429e+29"),
        ("1234567891 / 1000", "1234567.891"),
        ("123456789012 / 1000", "123456789"),
        ("2.00000000001", "2"),
    ],
)
def test_calc_table(expression: str, expected: str) -> None:
    assert calc(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("9**9**9**9", "exponent"),
        ("__import__('os')", "name '__import__' is not allowed"),
        ("1/0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1" * 10_000, "characters long"),
        ("1+" * 5_000 + "1", "characters long"),
        ("calc(", "invalid syntax"),
        ("2**1000", "exponent 1000 exceeds"),
        ("10**99 * 1000", "too large"),
        ("0.1**99 / 1000", "too small"),
        ("(" * 500, "characters long"),
        ("(" * 150, "invalid syntax"),
        ("-" * 120 + "1", "nested deeper"),
        ("x + 1", "name 'x' is not allowed"),
        ("(1).real", "attribute access '.real'"),
        ("abs(-1)", "name 'abs' is not allowed"),
        ("(lambda: 1)()", "function calls"),
        ("lambda: 1", "lambda is not allowed"),
        ("'a' * 3", "strings are not allowed"),
        ("1 < 2", "comparisons are not allowed"),
        ("1 and 2", "boolean operators"),
        ("True + 1", "constant True"),
        ("1j", "constant 1j"),
        ("3 & 1", "operator '&' is not allowed"),
        ("~1", "operator '~' is not allowed"),
        ("1,000", "commas are not allowed"),
        ("0x10", "only decimal numbers"),
        ("1" * 31, "longer than 30 digits"),
        ("1e999", "out of range"),
        ("1e200", "too large"),
        ("(-8)**(1/3)", "fractional power of a negative"),
        ("", "empty expression"),
        ("3 × 4", "unexpected character"),
        ("[1, 2]", "commas"),
        ("[1]", "lists are not allowed"),
    ],
)
def test_calc_rejects_quickly_with_clear_error(expression: str, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ToolError, match="calc: ") as info:
        calc(expression)
    assert time.perf_counter() - started < 0.5
    assert message in str(info.value)
    result = run_tool_call(f"CALL calc({expression})")
    assert result.ok is False and result.error


def test_error_names_the_column() -> None:
    with pytest.raises(ToolError) as info:
        calc("1 + __import__('os')")
    assert str(info.value) == "calc: name '__import__' is not allowed (function calls are not supported) at column 4"
    assert info.value.column == 4


def _binop(parts: tuple) -> tuple[str, Fraction | None, int]:
    """Combine two generated sub-expressions, computing the expected value with Python ints/Fractions."""
    (left_text, left, left_depth), op, (right_text, right, right_depth) = parts
    text, depth = f"({left_text} {op} {right_text})", 1 + max(left_depth, right_depth)
    if left is None or right is None or (op in ("/", "//", "%") and right == 0):
        return text, None, depth
    ints = left.denominator == 1 and right.denominator == 1
    functions = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}
    if op == "/":
        value = left / right
    elif ints:
        value = Fraction(functions[op](int(left), int(right)))
    else:
        value = Fraction(functions[op](left, right))
    return text, value, depth


def _power(parts: tuple) -> tuple[str, Fraction | None, int]:
    """Raise a generated sub-expression to a small integer power."""
    (base_text, base, base_depth), exponent = parts
    text, depth = f"({base_text} ** ({exponent}))", 1 + max(base_depth, 2)
    if base is None or (base == 0 and exponent < 0):
        return text, None, depth
    if base.denominator == 1 and exponent >= 0:
        return text, Fraction(int(base) ** exponent), depth
    return text, base**exponent, depth


def _negate(part: tuple) -> tuple[str, Fraction | None, int]:
    """Negate a generated sub-expression."""
    text, value, depth = part
    return f"(-{text})", None if value is None else -value, depth + 1


def _within_bounds(value: Fraction | None) -> bool:
    """Mirror the calculator's magnitude bounds."""
    return value is not None and (value == 0 or tools.MIN_MAGNITUDE <= abs(value) <= tools.MAX_MAGNITUDE)


def _checked(node: tuple) -> tuple[str, Fraction | None, int]:
    """Mark a node as an expected failure when its value leaves the calculator's bounds."""
    text, value, depth = node
    return text, value if _within_bounds(value) else None, depth


expressions = st.recursive(
    st.integers(0, 60).map(lambda n: (str(n), Fraction(n), 1)),
    lambda children: st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%"]), children).map(_binop).map(_checked),
        st.tuples(children, st.integers(-3, 3)).map(_power).map(_checked),
        children.map(_negate),
    ),
    max_leaves=8,
)


@FAST
@given(expressions)
def test_random_integer_expressions_match_python_arithmetic(node: tuple) -> None:
    text, expected, depth = node
    if expected is None or depth > tools.MAX_AST_DEPTH or len(text) > tools.MAX_EXPRESSION_CHARS:
        with pytest.raises(ToolError):
            evaluate(text)
        return
    assert evaluate(text) == expected
    if expected.denominator == 1:
        assert calc(text) == str(expected.numerator)


@FAST
@given(st.one_of(st.text(max_size=250), st.text(alphabet="0123456789+-*/%().eE_ ,jx\n", max_size=80)))
def test_random_text_only_ever_raises_tool_error(text: str) -> None:
    try:
        assert isinstance(calc(text), str)
    except ToolError:
        pass
    result = run_tool_call(f"CALL calc({text})")
    assert isinstance(result, ToolResult)
    assert isinstance(run_tool_call(text), ToolResult)


@pytest.mark.parametrize(
    ("text", "tool", "args", "output"),
    [
        ("CALL calc(48/2)", "calc", "48/2", "24"),
        ("  CALL   calc ( (1 + 2) * 3 )  ", "calc", " (1 + 2) * 3 ", "9"),
        ("call calc(7)", "calc", "7", "7"),
        ("calc(2**3)", "calc", "2**3", "8"),
    ],
)
def test_run_tool_call_ok(text: str, tool: str, args: str, output: str) -> None:
    assert run_tool_call(text) == ToolResult(tool=tool, args=args, ok=True, output=output, error=None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("calc(", "missing ')'"),
        ("CALL", "expected 'CALL name(args)'"),
        ("", "expected 'CALL name(args)'"),
        ("CALL calc(1+1) and more", "unexpected text"),
        ("CALL nosuchtool(1)", "unknown tool 'nosuchtool'"),
        ("CALL calc(1/0)", "division by zero"),
    ],
)
def test_run_tool_call_malformed(text: str, message: str) -> None:
    result = run_tool_call(text)
    assert result.ok is False and result.output == ""
    assert result.error is not None and message in result.error


def test_raising_tool_is_contained() -> None:
    def boom(args: str) -> str:
        raise RuntimeError(f"boom on {args}")

    result = run_tool_call("CALL boom(1)", tools={"boom": boom})
    assert result.ok is False
    assert result.error == "tool 'boom' raised RuntimeError: boom on 1"


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "_REGISTRY", dict(tools._REGISTRY))
    assert get_tool("calc") is not None and get_tool("calc").func is calc
    tool = register_tool("echo", lambda args: args.upper(), "Echo the arguments in upper case.")
    assert isinstance(tool, Tool) and get_tool("echo") is tool
    assert {"calc", "echo"} <= set(available_tools())
    assert run_tool_call("CALL echo(hi)").output == "HI"
    assert get_tool("missing") is None
    with pytest.raises(ValueError, match="invalid tool name"):
        register_tool("bad name", str, "")


def test_entry_point_plugins(tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "ovl_test_plugin.py").write_text(
        "def shout(args: str) -> str:\n    '''Shout the arguments.'''\n    return args.upper() + '!'\n"
    )
    dist = tmp_path / "ovl_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ovl-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[langflow_overlay.tools]\nshout = ovl_test_plugin:shout\nbroken = ovl_no_such_module:thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tools, "_REGISTRY", dict(tools._REGISTRY))
    monkeypatch.setattr(tools, "_plugins_loaded", False)
    with caplog.at_level(logging.WARNING, logger="overlay.tools"):
        names = set(available_tools())
    assert {"calc", "shout"} <= names and "broken" not in names
    assert get_tool("shout").description == "Shout the arguments."
    assert run_tool_call("CALL shout(hey)").output == "HEY!"
    assert any("broken" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(("call", "error"), [
    ("CALL calc(1,2)", "calc: commas are not allowed (calc takes one expression, not a list of values) at column 1"),
    ("CALL calc(1,000 / 4)", "calc: commas are not allowed (remove thousands separators first) at column 1"),
    ("CALL calc(1 +)", "calc: invalid syntax at column 0"),
    ("CALL calc(1 if 2 else 3)", "calc: conditional expressions (… if … else …) are not allowed (only numbers, "
                                 "+ - * / // % ** and parentheses) at column 0"),
    ("CALL calc([1])", "calc: lists are not allowed (only numbers, + - * / // % ** and parentheses) at column 0"),
])
def test_calculator_errors_are_plain_words(call: str, error: str) -> None:
    """No Python AST class names, no repeated '(invalid syntax)', and a comma blames thousands separators only
    where it looks like one."""
    assert run_tool_call(call).error == error
    with pytest.raises(ToolError, match=r"^calc: invalid syntax: '\(' was never closed at column 0$"):
        calc("(1")
