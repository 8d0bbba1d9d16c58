"""Calculator node: the safe calculator as a Langflow tool."""

from __future__ import annotations

import asyncio

import pytest

from overlay.langflow_support import NodeError
from overlay_components.overlay.calculator import OverlayCalculatorComponent


@pytest.mark.parametrize(
    ("expression", "result"),
    [("48/2 + 3", "27"), ("2**10", "1024"), ("1/3", "0.3333333333"), ("CALL calc(48/2)", "24"), ("calc(7*6)", "42")],
)
def test_evaluates_exactly(expression, result):
    component = OverlayCalculatorComponent(expression=expression)
    assert component.calculate().data == {"expression": expression, "result": result}
    assert component.status == f"{expression} = {result}"


@pytest.mark.parametrize(
    ("expression", "message"),
    [("", "the expression is empty"), ("1/0", "division by zero"), ("__import__('os')", "not allowed"),
     ("9**9**9", "exceeds the limit"), ("CALL nope(1)", "unknown tool 'nope'")],
)
def test_bad_expressions_give_readable_errors(expression, message):
    with pytest.raises(NodeError) as info:
        OverlayCalculatorComponent(expression=expression).calculate()
    assert message in str(info.value)


def test_is_usable_as_an_agent_tool():
    component = OverlayCalculatorComponent()
    assert component.to_frontend_node()["data"]["node"]["template"]["expression"]["tool_mode"] is True
    (tool,) = asyncio.run(component.to_toolkit())
    assert tool.name == "calculate" and "expression" in tool.args_schema.model_json_schema()["properties"]
    assert tool.invoke({"expression": "48/2 + 3"}) == {"expression": "48/2 + 3", "result": "27"}
    assert "division by zero" in tool.invoke({"expression": "1/0"})
