"""GetTracks node: the training chains (tracks) a question resembles, and the one the chooser would follow."""

from lfx.custom.custom_component.component import Component
from lfx.io import DropdownInput, IntInput, MessageTextInput, Output, SecretStrInput
from lfx.schema.dataframe import DataFrame
from lfx.schema.message import Message

from overlay.langflow_support import fill_options, readable_errors, tracks_for_question


class GetTracksComponent(Component):
    """Retrieve a question's tracks from the track memory stored with the table, and show the chooser's verdict."""

    display_name = "GetTracks"
    description = ("The training chains a question resembles, from the table's track memory: bound to its numbers, "
                   "followed with the calculator, and the chooser's verdict.")
    icon = "signpost"
    name = "OverlayGetTracks"

    inputs = [
        MessageTextInput(
            name="question",
            display_name="Question",
            info="The question to route into a track.",
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
        IntInput(name="k", display_name="Tracks (K)", value=10, info="How many tracks to retrieve."),
        IntInput(
            name="version",
            display_name="Table Version",
            value=0,
            advanced=True,
            info="Version whose track memory is read; 0 = the active one (the decoder always uses the active one).",
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
        Output(display_name="Tracks", name="tracks", method="get_tracks", group_outputs=True),
        Output(display_name="Verdict", name="verdict", method="get_verdict", group_outputs=True),
    ]

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the domains that have a complete table when Domain's refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def get_tracks(self) -> DataFrame:
        """Return the retrieved tracks best first: rank, similarity, binding, answer, the chooser's p and verdict,
        track id and question."""
        with readable_errors(self) as outcome:
            found = tracks_for_question(self.redis_url, self.domain, self.question, self.k, self.version)
        if outcome.failed:
            return DataFrame([])
        self.status = found.status
        return DataFrame(found.rows)

    def get_verdict(self) -> Message:
        """Return the chooser's verdict for a chat window: the followed track's chain with this question's numbers,
        or its refusal, then one line per retrieved track."""
        with readable_errors(self) as outcome:
            found = tracks_for_question(self.redis_url, self.domain, self.question, self.k, self.version)
        if outcome.failed:
            return Message(text="")
        self.status = found.status
        return Message(text=found.chat)
