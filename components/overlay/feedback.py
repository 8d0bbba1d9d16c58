"""Chain Feedback node: people's verdict on a decoded chain, recorded in the domain's feedback log and learned."""

from lfx.custom.custom_component.component import Component
from lfx.io import BoolInput, DropdownInput, MessageTextInput, MultilineInput, Output, SecretStrInput
from lfx.schema.data import Data

from overlay.langflow_support import fill_options, readable_errors, record_feedback


class ChainFeedbackComponent(Component):
    """Record a verdict (correct / wrong) on a chain; apply it now or later as a new table version."""

    display_name = "Chain Feedback"
    description = ("Records a verdict on a decoded chain in the domain's feedback log; learning raises correct chains "
                   "and lowers wrong ones in a new version of the table.")
    icon = "thumbs-up"
    name = "OverlayChainFeedback"

    inputs = [
        MessageTextInput(
            name="chain_id",
            display_name="Chain ID",
            info="The Chain ID the chain was decoded with (Chain Decoder, `overlay generate --session`); its saved "
            "chain is the one judged.",
        ),
        MultilineInput(
            name="chain_text",
            display_name="Chain Text",
            info="Or the chain itself, <Q> … <ANSWER> … <EOS> (e.g. the decoder's Raw Chain).",
        ),
        DropdownInput(
            name="verdict",
            display_name="Verdict",
            options=["correct", "wrong"],
            value="",
            info="correct raises the chain's n-grams in the next table version; wrong lowers them.",
        ),
        MessageTextInput(
            name="answer",
            display_name="Right Answer",
            info="With a wrong verdict: the answer the chain should have given, recorded with the verdict (the chain "
            "is lowered; no corrected chain is made up).",
        ),
        BoolInput(
            name="apply_now",
            display_name="Apply Now",
            value=False,
            info="Also learn every pending verdict into a new table version now (else `overlay table learn`).",
        ),
        MessageTextInput(
            name="request",
            display_name="Request",
            info='A JSON object, as a REST call sends it through Chat Input: {"chain_id" or "text", "verdict", '
            '"answer", "apply"}; the fields it names replace the ones above.',
        ),
        DropdownInput(
            name="domain",
            display_name="Domain",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Table domain: pick one with a complete table (refresh to list them) or type one; empty uses "
            "$OVERLAY_DOMAIN.",
        ),
        SecretStrInput(
            name="redis_url",
            display_name="Redis URL",
            value="",
            load_from_db=False,
            required=False,
            advanced=True,
            info="redis://, rediss://, unix:// or redis+cluster:// URL; empty uses $OVERLAY_REDIS_URL, else "
            "embedded Redis.",
        ),
    ]
    outputs = [
        Output(display_name="Feedback", name="feedback", method="record"),
    ]

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the domains that have a complete table when Domain's refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def record(self) -> Data:
        """Record the verdict (and apply the pending ones when asked); says which version they went into."""
        with readable_errors(self) as outcome:
            result, status = record_feedback(self.redis_url, self.domain, self.chain_id, self.chain_text, self.verdict,
                                             self.answer, self.apply_now, self.request)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=result)
