"""GetNeighbours node: next-token candidates with weights from the semantic-weight table, for a context text."""

from lfx.custom.custom_component.component import Component
from lfx.io import DropdownInput, IntInput, MessageTextInput, Output, SecretStrInput
from lfx.schema.data import Data
from lfx.schema.dataframe import DataFrame

from overlay.langflow_support import fill_options, neighbours_for_text, readable_errors, table_spec


class GetNeighboursComponent(Component):
    """Look up the table's candidates after a context, and hand the table to the Chain Decoder."""

    display_name = "GetNeighbours"
    description = "Next-token candidates with weights from a Redis semantic-weight table, for a context text."
    icon = "network"
    name = "OverlayGetNeighbours"

    inputs = [
        MessageTextInput(
            name="context",
            display_name="Context",
            info="Text whose last tokens are looked up; empty gives the table's most frequent tokens.",
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
        IntInput(name="k", display_name="Candidates (K)", value=32, info="How many candidates to return."),
        IntInput(
            name="version",
            display_name="Table Version",
            value=0,
            advanced=True,
            info="Version to read for Candidates; 0 = the active one (the decoder always uses the active one).",
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
        Output(display_name="Candidates", name="candidates", method="get_candidates", group_outputs=True),
        Output(display_name="Table", name="table", method="get_table", group_outputs=True),
    ]

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the domains that have a complete table when Domain's refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def get_candidates(self) -> DataFrame:
        """Return the candidates best first: rank, token, token_id, weight, count and the order they came from."""
        with readable_errors(self) as outcome:
            found = neighbours_for_text(self.redis_url, self.domain, self.context, self.k, self.version)
        if outcome.failed:
            return DataFrame([])
        self.status = found.status
        return DataFrame(found.rows)

    def get_table(self) -> Data:
        """Return the table settings the Chain Decoder reads candidates with."""
        with readable_errors(self) as outcome:
            spec, status = table_spec(self.redis_url, self.domain, self.k)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=spec)
