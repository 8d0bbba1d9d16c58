"""Tag Router node: splits a chain into THOUGHT / ACTION / CHECK branches, running tools and verifying checks."""

from lfx.custom.custom_component.component import Component
from lfx.io import BoolInput, IntInput, MessageTextInput, Output
from lfx.schema.data import Data
from lfx.schema.message import Message

from overlay.langflow_support import readable_errors, route, router_spec


class TagRouterComponent(Component):
    """Route a chain's steps by tag; branches with no step of their tag are stopped."""

    display_name = "Tag Router"
    description = "Splits a chain into THOUGHT, ACTION (tool results) and CHECK (verdicts) branches."
    icon = "split"
    name = "OverlayTagRouter"

    inputs = [
        MessageTextInput(
            name="chain",
            display_name="Chain",
            info="A chain or a single step, e.g. '<ACTION> CALL calc(48/2)'.",
        ),
        BoolInput(
            name="run_tools",
            display_name="Run Tools",
            value=True,
            advanced=True,
            info="Call the tool named in each ACTION step and show its result (the decoder always does).",
        ),
        BoolInput(
            name="verify_checks",
            display_name="Verify Checks",
            value=True,
            advanced=True,
            info="Verify each CHECK claim numerically and show the verdict (the decoder always does).",
        ),
        IntInput(
            name="max_step_repeats",
            display_name="Max Step Repeats",
            value=3,
            advanced=True,
            info="The decoder stops a chain when the same step (tag and text) occurs this many times.",
        ),
    ]
    outputs = [
        Output(display_name="THOUGHT", name="thought", method="get_thought", group_outputs=True),
        Output(display_name="ACTION", name="action", method="get_action", group_outputs=True),
        Output(display_name="CHECK", name="check", method="get_check", group_outputs=True),
        Output(display_name="Router", name="router", method="get_router", group_outputs=True),
    ]

    def routed(self, tag: str) -> Message:
        """Text of the steps tagged ``tag``; the branch is stopped when there are none."""
        with readable_errors(self) as outcome:
            result = route(self.chain, self.run_tools, self.verify_checks)
        if outcome.failed:
            return Message(text="")
        self.status = result.status
        text = result.texts[tag]
        if not text and self.get_vertex() is not None:
            self.stop(tag.lower())
        return Message(text=text)

    def get_thought(self) -> Message:
        """Return the THOUGHT steps, one per line."""
        return self.routed("THOUGHT")

    def get_action(self) -> Message:
        """Return the ACTION steps with their tool results, one per line."""
        return self.routed("ACTION")

    def get_check(self) -> Message:
        """Return the CHECK claims with their verdicts, one per line."""
        return self.routed("CHECK")

    def get_router(self) -> Data:
        """Return the tools and repeat rule the Chain Decoder routes with."""
        with readable_errors(self) as outcome:
            spec, status = router_spec(self.max_step_repeats)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=spec)
