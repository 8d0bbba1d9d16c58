"""Calculator node: the overlay's safe arithmetic tool, usable by agents (tool mode)."""

from lfx.custom.custom_component.component import Component
from lfx.io import MessageTextInput, Output
from lfx.schema.data import Data

from overlay.langflow_support import evaluate_expression, readable_errors


class OverlayCalculatorComponent(Component):
    """Evaluate arithmetic exactly with the overlay's `ast`-based calculator (never `eval`)."""

    display_name = "Calculator"
    description = "Safe arithmetic (+ - * / // % ** and parentheses) with exact results; usable as an agent tool."
    icon = "calculator"
    name = "OverlayCalculator"

    inputs = [
        MessageTextInput(
            name="expression",
            display_name="Expression",
            info="Arithmetic such as 48/2 + 3, or a step such as CALL calc(48/2).",
            tool_mode=True,
            required=True,
        ),
    ]
    outputs = [
        Output(display_name="Result", name="result", method="calculate"),
    ]

    def calculate(self) -> Data:
        """Return the expression and its canonical result."""
        with readable_errors(self) as outcome:
            result, status = evaluate_expression(self.expression)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=result)
