"""Tools for ACTION steps: a safe `ast`-based calculator, a tool registry and `CALL name(args)` parsing.

The calculator never uses `eval`/`exec`: it parses with `ast`, accepts only numeric literals,
the arithmetic operators `+ - * / // % **`, unary `+`/`-` and parentheses, and evaluates with
exact `fractions.Fraction` arithmetic under hard bounds (length, literal size, exponent,
magnitude, AST size/depth and CPU time), so hostile input fails fast with a `ToolError`.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import time
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from importlib.metadata import entry_points
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL_DIGITS = 30
MAX_EXPONENT = 100
MAX_MAGNITUDE = Fraction(10) ** 100
MIN_MAGNITUDE = Fraction(1, 10**100)
MAX_AST_NODES = 200
MAX_AST_DEPTH = 50
MAX_SECONDS = 0.05
SIGNIFICANT_DIGITS = 10
MAX_OUTPUT_CHARS = 200
ENTRY_POINT_GROUP = "langflow_overlay.tools"

_BIN_OPS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
_UNARY_OPS = (ast.USub, ast.UAdd)
# How a person names what the calculator refuses (never Python's AST class names).
_OP_WORDS: dict[type, str] = {ast.BitAnd: "'&'", ast.BitOr: "'|'", ast.BitXor: "'^'", ast.LShift: "'<<'",
                              ast.RShift: "'>>'", ast.MatMult: "'@'", ast.Invert: "'~'", ast.Not: "'not'"}
_NODE_WORDS: dict[type, str] = {
    ast.IfExp: "conditional expressions (… if … else …) are", ast.List: "lists are", ast.Tuple: "tuples are",
    ast.Set: "sets are", ast.Dict: "dictionaries are", ast.Subscript: "indexing with [ ] is", ast.Slice: "slices are",
    ast.ListComp: "comprehensions are", ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are", ast.JoinedStr: "f-strings are", ast.Starred: "'*' unpacking is",
    ast.NamedExpr: "assignments (:=) are", ast.Await: "'await' is", ast.Yield: "'yield' is", ast.YieldFrom: "'yield' is",
}
ALLOWED = "numbers, + - * / // % ** and parentheses"
_THOUSANDS = re.compile(r"(?<=\d),\d{3}(?!\d)")


class ToolError(ValueError):
    """A tool call was rejected or failed; the message says what was wrong and where."""

    def __init__(self, message: str, column: int | None = None) -> None:
        """Build the error; `column` (0-based) is appended to the message when known."""
        self.column = column
        super().__init__(message if column is None else f"{message} at column {column}")


def _fail(message: str, node: ast.AST | None = None) -> ToolError:
    """Make a calculator ToolError located at `node` (if given)."""
    return ToolError(f"calc: {message}", getattr(node, "col_offset", None))


def _describe(node: ast.AST) -> str:
    """Say in words why a disallowed AST node is rejected."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name):
            return f"name {func.id!r} is not allowed (function calls are not supported)"
        return "function calls are not allowed"
    if isinstance(node, ast.Name):
        return f"name {node.id!r} is not allowed"
    if isinstance(node, ast.Attribute):
        return f"attribute access '.{node.attr}' is not allowed"
    if isinstance(node, ast.Lambda):
        return "lambda is not allowed"
    if isinstance(node, ast.Compare):
        return "comparisons are not allowed"
    if isinstance(node, ast.BoolOp):
        return "boolean operators are not allowed"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"operator {_OP_WORDS.get(type(node.op), 'here')} is not allowed (only {ALLOWED})"
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (str, bytes)):
            return "strings are not allowed"
        return f"constant {node.value!r} is not allowed"
    return f"{_NODE_WORDS.get(type(node), 'this kind of expression is')} not allowed (only {ALLOWED})"


def _check_magnitude(value: Fraction, node: ast.AST) -> Fraction:
    """Reject values outside [1e-100, 1e100] in absolute value (zero is fine)."""
    if abs(value) > MAX_MAGNITUDE:
        raise _fail("result too large (limit 1e100)", node)
    if value and abs(value) < MIN_MAGNITUDE:
        raise _fail("result too small (limit 1e-100)", node)
    return value


def _log10(value: Fraction) -> float:
    """log10 of a positive Fraction, exact enough for bound checks even for huge parts."""
    return math.log10(value.numerator) - math.log10(value.denominator)


def _literal(node: ast.Constant, source: str) -> Fraction:
    """Turn a numeric literal into an exact Fraction after checking its size."""
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(_describe(node), node)
    text = source[node.col_offset : node.end_col_offset].replace("_", "")
    if text[:2].lower() in ("0x", "0o", "0b"):
        raise _fail("only decimal numbers are allowed", node)
    mantissa = re.split(r"[eE]", text)[0]
    if sum(ch.isdigit() for ch in mantissa) > MAX_LITERAL_DIGITS:
        raise _fail(f"number literal longer than {MAX_LITERAL_DIGITS} digits", node)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail("number literal out of range", node)
    return _check_magnitude(Fraction(text), node)


def _power(base: Fraction, exp: Fraction, node: ast.AST) -> Fraction:
    """Compute base**exp, refusing (before computing) anything that would exceed the bounds."""
    if abs(exp) > MAX_EXPONENT:
        raise _fail(f"exponent {exp} exceeds the limit of {MAX_EXPONENT}", node)
    if base == 0:
        if exp < 0:
            raise _fail("division by zero (0 raised to a negative power)", node)
        return Fraction(1) if exp == 0 else Fraction(0)
    estimate = float(exp) * _log10(abs(base))
    if estimate > 101:
        raise _fail("result too large (limit 1e100)", node)
    if estimate < -101:
        raise _fail("result too small (limit 1e-100)", node)
    if exp.denominator == 1:
        return _check_magnitude(base ** int(exp), node)
    if base < 0:
        raise _fail("fractional power of a negative number", node)
    return _check_magnitude(Fraction(float(base) ** float(exp)), node)


def _binary(op: ast.operator, left: Fraction, right: Fraction, node: ast.AST) -> Fraction:
    """Apply one binary operator with division-by-zero and magnitude checks."""
    if isinstance(op, ast.Pow):
        return _power(left, right, node)
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
        raise _fail(f"division by zero in '{_BIN_OPS[type(op)]}'", node)
    if isinstance(op, ast.Add):
        result = left + right
    elif isinstance(op, ast.Sub):
        result = left - right
    elif isinstance(op, ast.Mult):
        result = left * right
    elif isinstance(op, ast.Div):
        result = left / right
    elif isinstance(op, ast.FloorDiv):
        result = Fraction(left // right)
    else:
        result = left % right
    return _check_magnitude(result, node)


def _validate(tree: ast.Expression) -> None:
    """Check node types, node count and depth iteratively (no recursion on hostile input)."""
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_AST_NODES:
            raise _fail(f"expression has more than {MAX_AST_NODES} nodes")
        if depth > MAX_AST_DEPTH:
            raise _fail(f"expression nested deeper than {MAX_AST_DEPTH} levels", node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            stack.extend([(node.right, depth + 1), (node.left, depth + 1)])
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY_OPS):
            stack.append((node.operand, depth + 1))
        elif not isinstance(node, ast.Constant):
            raise _fail(_describe(node), node)


def evaluate(expression: str) -> Fraction:
    """Evaluate an arithmetic expression exactly, raising ToolError on anything unsafe or invalid."""
    if not isinstance(expression, str):
        raise _fail(f"expression must be a string, not {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _fail(f"expression is {len(expression)} characters long (limit {MAX_EXPRESSION_CHARS})")
    for column, char in enumerate(expression):
        if char == ",":
            thousands = _THOUSANDS.match(expression, column)
            raise ToolError("calc: commas are not allowed (" + (
                "remove thousands separators first" if thousands else
                "calc takes one expression, not a list of values") + ")", column)
        if not char.isascii() or (not char.isprintable() and not char.isspace()):
            raise ToolError(f"calc: unexpected character {char!r}", column)
    source = " ".join(expression.splitlines()).replace("\t", " ").strip()
    if not source:
        raise _fail("empty expression")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        column = max((exc.offset or 1) - 1, 0)
        detail = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise ToolError(f"calc: invalid syntax{detail}", column) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _fail(f"could not parse expression ({type(exc).__name__})") from None
    _validate(tree)
    deadline = time.thread_time() + MAX_SECONDS  # CPU time: a busy machine does not make a calculation fail

    def walk(node: ast.AST) -> Fraction:
        if time.thread_time() > deadline:
            raise _fail(f"evaluation took longer than {MAX_SECONDS * 1000:.0f} ms", node)
        if isinstance(node, ast.Constant):
            return _literal(node, source)
        if isinstance(node, ast.UnaryOp):
            operand = walk(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        assert isinstance(node, ast.BinOp)
        left = walk(node.left)
        return _binary(node.op, left, walk(node.right), node)

    return walk(tree.body)


def format_number(value: Fraction) -> str:
    """Format canonically: integers exactly, others rounded to 10 significant digits, no trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = SIGNIFICANT_DIGITS
        rounded = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    if -10 <= rounded.adjusted() < 21:
        return format(rounded, "f")
    return format(rounded, "e")


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression safely and return the canonical result string."""
    return format_number(evaluate(expression))


@dataclass
class Tool:
    """A callable tool the router can run for `CALL name(args)`; `func` takes the raw args string."""

    name: str
    func: Callable[[str], str]
    description: str


@dataclass
class ToolResult:
    """Outcome of one tool call: `output` on success, `error` (and ok=False) on failure."""

    tool: str
    args: str
    ok: bool
    output: str
    error: str | None = None


ToolMap = Mapping[str, Tool | Callable[[str], str]]
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_REGISTRY: dict[str, Tool] = {}
_plugins_loaded = False


def register_tool(name: str, func: Callable[[str], str], description: str) -> Tool:
    """Register (or replace) a tool under an identifier-like name and return it."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid tool name {name!r}: use letters, digits and '_'")
    if not callable(func):
        raise TypeError(f"tool {name!r}: func must be callable")
    tool = Tool(name=name, func=func, description=description)
    _REGISTRY[name] = tool
    return tool


def _load_plugins() -> None:
    """Load third-party tools from the entry-point group once; a broken plugin only logs a warning."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if ep.name in _REGISTRY:
                logger.warning("tool plugin %r ignored: a tool with that name is already registered", ep.name)
            elif isinstance(obj, Tool):
                register_tool(ep.name, obj.func, obj.description)
            else:
                doc = (getattr(obj, "__doc__", None) or "").strip()
                register_tool(ep.name, obj, doc.splitlines()[0] if doc else "")
        except Exception as exc:  # a plugin must never break the registry
            logger.warning("tool plugin %r could not be loaded: %s: %s", ep.name, type(exc).__name__, exc)


def get_tool(name: str) -> Tool | None:
    """Return the registered tool called `name`, or None if there is none."""
    _load_plugins()
    return _REGISTRY.get(name)


def available_tools() -> dict[str, Tool]:
    """Return a copy of the registry (built-ins plus loaded plugins), keyed by name."""
    _load_plugins()
    return dict(_REGISTRY)


register_tool("calc", calc, "Safe arithmetic calculator: + - * / // % ** and parentheses, e.g. calc(48/2).")

_CALL_RE = re.compile(r"\s*(?:CALL\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.IGNORECASE)


def _split_call(text: str) -> tuple[str, str]:
    """Parse `CALL name(args)` (the `CALL` keyword is optional) into (name, raw args in the outer parentheses)."""
    match = _CALL_RE.match(text)
    if not match:
        raise ToolError(f"malformed call {text.strip()[:60]!r}: expected 'CALL name(args)'")
    name, depth = match.group(1), 0
    for index in range(match.end() - 1, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                trailing = text[index + 1 :].strip()
                if trailing:
                    raise ToolError(f"{name}: unexpected text {trailing[:30]!r} after ')'", index + 1)
                return name, text[match.end() : index]
    raise ToolError(f"{name}: malformed call, missing ')'", len(text))


def run_tool_call(text: str, tools: ToolMap | None = None) -> ToolResult:
    """Parse and run `CALL name(args)`; never raises — failures come back as ok=False with an error."""
    name, args = "", ""
    try:
        name, args = _split_call(text if isinstance(text, str) else repr(text))
        if tools is None:
            entry: Tool | Callable[[str], str] | None = get_tool(name)
        else:
            entry = tools.get(name)
        if entry is None:
            known = sorted(available_tools() if tools is None else tools)
            raise ToolError(f"unknown tool {name!r} (available: {', '.join(known) or 'none'})")
        func = entry.func if isinstance(entry, Tool) else entry
        output = str(func(args.strip()))
    except ToolError as exc:
        return ToolResult(tool=name, args=args, ok=False, output="", error=str(exc))
    except Exception as exc:  # a tool must never crash the chain
        error = f"tool {name!r} raised {type(exc).__name__}: {exc}"[:MAX_OUTPUT_CHARS]
        return ToolResult(tool=name, args=args, ok=False, output="", error=error)
    if len(output) > MAX_OUTPUT_CHARS:
        output = output[:MAX_OUTPUT_CHARS] + "..."
    return ToolResult(tool=name, args=args, ok=True, output=output)
