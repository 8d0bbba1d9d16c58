"""Chain Decoder node: runs the token loop over a table, a selector, an accumulator and the tag router."""

from lfx.custom.custom_component.component import Component
from lfx.io import HandleInput, IntInput, MessageTextInput, Output
from lfx.schema.message import Message

from overlay.langflow_support import Decoded, decode_question, readable_errors


class OverlayDecoderComponent(Component):
    """Answer a question with a chain emitted token by token from the table's candidates, with its trace."""

    display_name = "Chain Decoder"
    description = ("Question → reasoning chain: the selector picks each token among the table's candidates; "
                   "tools and checks run as steps end.")
    icon = "brain-circuit"
    name = "OverlayDecoder"

    inputs = [
        MessageTextInput(name="question", display_name="Question", required=True, info="The question to reason about."),
        HandleInput(
            name="table",
            display_name="Table",
            input_types=["Data", "JSON"],
            required=True,
            info="The Table output of GetNeighbours.",
        ),
        HandleInput(
            name="selector",
            display_name="Selector",
            input_types=["Data", "JSON"],
            required=True,
            info="The Selector output of the IT-LM Selector.",
        ),
        HandleInput(
            name="accumulator",
            display_name="Accumulator",
            input_types=["Data", "JSON"],
            required=False,
            info="The Accumulator output of the Accumulator node (stop rules); default: stop after 256 tokens.",
        ),
        HandleInput(
            name="router",
            display_name="Router",
            input_types=["Data", "JSON"],
            required=False,
            info="The Router output of the Tag Router; default: tools on, CHECK verification on.",
        ),
        MessageTextInput(
            name="chain_id",
            display_name="Chain ID",
            advanced=True,
            info="Keep the chain's state in Redis under this id (the accumulator's TTL), so a chain cut by the token "
            "limit continues on the next run with the same id; empty keeps nothing.",
        ),
        IntInput(
            name="max_question_chars",
            display_name="Max Question Length",
            value=2000,
            advanced=True,
            info="Longer questions are refused with a message.",
        ),
        IntInput(
            name="samples",
            display_name="Samples",
            value=1,
            advanced=True,
            info="Decode this many chains (the first as the Selector sets, the others sampled) and answer by majority "
            "among those whose checks all pass; 1: one chain, no vote. At most 64; not with a Chain ID.",
        ),
    ]
    outputs = [
        Output(display_name="Chain", name="chain", method="get_chain", group_outputs=True),
        Output(display_name="Trace", name="trace", method="get_trace", group_outputs=True),
        Output(display_name="Raw Chain", name="raw_chain", method="get_raw_chain", group_outputs=True),
    ]

    _decoded = None

    def _pre_run_setup(self) -> None:
        """Forget the previous run's result."""
        self._decoded = None

    def decoded(self) -> Decoded:
        """Decode once per run; every output reads the same result (empty when a failure stopped the node)."""
        if self._decoded is None:
            with readable_errors(self) as outcome:
                self._decoded = decode_question(self.question, self.table, self.selector, self.accumulator,
                                                self.router, self.chain_id, self.max_question_chars, self.samples)
            if outcome.failed:
                self._decoded = Decoded("", "", "", outcome.message)
        self.status = self._decoded.status
        return self._decoded

    def get_chain(self) -> Message:
        """Return the chain for a chat window: the answer, then one line per step with its tag, results and verdicts
        (with Samples above 1, the vote and its chains first), and the track it followed or that none was."""
        return Message(text=self.decoded().chat)

    def get_trace(self) -> Message:
        """Return the answer, stop reason, verdicts, tool calls and per-token trace as JSON."""
        return Message(text=self.decoded().trace_json)

    def get_raw_chain(self) -> Message:
        """Return the chain as the decoder wrote it: <Q> … <THOUGHT> / <ACTION> / <RESULT> / <CHECK> … <ANSWER>."""
        return Message(text=self.decoded().chain)
