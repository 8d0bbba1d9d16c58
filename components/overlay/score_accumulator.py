"""Score Accumulator node: keeps a chain's running score and stop rules, per chain id, in Redis."""

from lfx.custom.custom_component.component import Component
from lfx.io import FloatInput, HandleInput, IntInput, MessageTextInput, Output, SecretStrInput
from lfx.schema.data import Data

from overlay.langflow_support import accumulate, accumulator_spec, readable_errors


class ScoreAccumulatorComponent(Component):
    """Add the Selector's choices to a chain's running score, and hand the stop rules to the Chain Decoder."""

    display_name = "Accumulator"
    description = "Running log-score, perplexity, tag counts and stop reason of a chain, kept per chain id in Redis."
    icon = "sigma"
    name = "OverlayScoreAccumulator"

    inputs = [
        HandleInput(
            name="choice",
            display_name="Choice",
            input_types=["Data", "JSON"],
            required=False,
            info="The Choice output of the IT-LM Selector; without it the node reports the chain's totals.",
        ),
        MessageTextInput(
            name="chain_id",
            display_name="Chain ID",
            info="Keeps the running score across runs under this id; empty scores this run only.",
        ),
        IntInput(name="max_tokens", display_name="Max Tokens", value=256, info="Stop a chain after this many tokens."),
        FloatInput(
            name="min_mean_logprob",
            display_name="Min Mean Log-prob",
            value=0.0,
            advanced=True,
            info="Stop when the mean log-prob per chosen token falls below this (a negative number); 0 = off.",
        ),
        IntInput(
            name="state_ttl",
            display_name="State TTL (s)",
            value=3600,
            advanced=True,
            info="How long a chain's state is kept in Redis after its last use.",
        ),
        SecretStrInput(
            name="redis_url",
            display_name="Redis URL",
            value="",
            load_from_db=False,
            required=False,
            advanced=True,
            info="Where chain state is kept; empty uses $OVERLAY_REDIS_URL, else embedded Redis.",
        ),
    ]
    outputs = [
        Output(display_name="Totals", name="totals", method="get_totals", group_outputs=True),
        Output(display_name="Accumulator", name="accumulator", method="get_accumulator", group_outputs=True),
    ]

    def get_totals(self) -> Data:
        """Return the chain's token count, log-score, mean log-prob, perplexity, tag counts and stop reason."""
        with readable_errors(self) as outcome:
            totals, status = accumulate(self.choice, self.chain_id, self.redis_url, self.max_tokens,
                                        self.min_mean_logprob, self.state_ttl)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=totals)

    def get_accumulator(self) -> Data:
        """Return the stop rules and state TTL the Chain Decoder uses."""
        with readable_errors(self) as outcome:
            spec, status = accumulator_spec(self.max_tokens, self.min_mean_logprob, self.state_ttl)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=spec)
