"""GetNeighbours node: next-token candidates with weights from the semantic-weight table, for a context text."""

from lfx.custom.custom_component.component import Component
from lfx.io import IntInput, MessageTextInput, Output, SecretStrInput, StrInput
from lfx.schema.data import Data
from lfx.schema.dataframe import DataFrame

from overlay.langflow_support import neighbours_for_text, readable_errors, table_spec


class GetNeighboursComponent(Component):
    """Look up the table's candidates after a context, and hand the table to the Overlay Decoder."""

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
        StrInput(name="domain", display_name="Domain", info="Table domain; empty uses $OVERLAY_DOMAIN."),
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

    def get_candidates(self) -> DataFrame:
        """Return the candidates best first: rank, token, token_id, weight, count and the order they came from."""
        with readable_errors():
            found = neighbours_for_text(self.redis_url, self.domain, self.context, self.k, self.version)
        self.status = found.status
        return DataFrame(found.rows)

    def get_table(self) -> Data:
        """Return the table settings the Overlay Decoder reads candidates with."""
        with readable_errors():
            spec, status = table_spec(self.redis_url, self.domain, self.k)
        self.status = status
        return Data(data=spec)
