"""Track Probe node: do held-out variants of trained chains make the selector re-enter the chain's track?"""

from lfx.custom.custom_component.component import Component
from lfx.io import DropdownInput, IntInput, MessageTextInput, Output, SecretStrInput, StrInput
from lfx.schema.data import Data
from lfx.schema.message import Message
from lfx.utils.file_path_security import component_file_access_scopes, enforce_local_file_access

from overlay.langflow_support import fill_options, quiet_progress, readable_errors
from overlay.probe import probe_node


class TrackProbeComponent(Component):
    """Probe a selector (and a control) on a track library: entry rate, followed length, layer similarity, figures."""

    display_name = "Track Probe"
    description = ("Feeds held-out variants of a chain library to the decoder and measures whether the selector "
                   "re-enters the trained chain (model vs. control), with hidden-state and attention figures.")
    icon = "route"
    name = "OverlayTrackProbe"

    inputs = [
        MessageTextInput(
            name="library",
            display_name="Library Path",
            required=True,
            info="YAML/JSONL track library (templates with slots), or a GSM8K JSONL file turned into one.",
        ),
        DropdownInput(
            name="model_dir",
            display_name="Model Folder",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Selector trained on the library's training chains (refresh to list the data directory's models); "
            "empty uses $OVERLAY_MODEL_DIR.",
        ),
        DropdownInput(
            name="control_dir",
            display_name="Control Folder",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Selector trained without the library (same table); empty probes the model alone.",
        ),
        DropdownInput(
            name="domain",
            display_name="Domain",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Table domain (refresh to list the complete tables); empty uses $OVERLAY_DOMAIN, else the table the "
            "model was trained with.",
        ),
        StrInput(
            name="prefix_steps",
            display_name="Prefix Steps (j)",
            value="0,1",
            info="Steps of the variant's chain fed after the question, comma-separated (the first one is summarised).",
        ),
        IntInput(
            name="next_steps",
            display_name="Steps To Follow (m)",
            value=2,
            info="Steps the continuation must reproduce (numbers and slot words may differ) to count as entered.",
        ),
        StrInput(
            name="out_dir",
            display_name="Report Folder",
            advanced=True,
            info="Where probe.json, probe.md and the figures go; empty: a new folder under the overlay data directory.",
        ),
        StrInput(
            name="split",
            display_name="Variant Split",
            advanced=True,
            info="variants.json written with the model's training chains (`overlay probe prepare`); empty: regenerate "
                 "the variants from the seed below.",
        ),
        IntInput(name="variants", display_name="Variants per Track", value=6, advanced=True, info="5-10 recommended."),
        IntInput(name="heldout", display_name="Held-out Variants", value=2, advanced=True,
                 info="Per track; must match how the model's training chains were made."),
        IntInput(name="seed", display_name="Variant Seed", value=0, advanced=True,
                 info="Seed of the variant generator; must match the one used for training."),
        IntInput(name="limit", display_name="Track Limit", value=0, advanced=True, info="Probe the first N tracks; 0 = all."),
        SecretStrInput(
            name="redis_url",
            display_name="Redis URL",
            value="",
            load_from_db=False,
            required=False,
            advanced=True,
            info="Where the table lives; empty uses $OVERLAY_REDIS_URL, else embedded Redis.",
        ),
    ]
    outputs = [
        Output(display_name="Summary", name="summary", method="get_summary", group_outputs=True),
        Output(display_name="Report", name="report", method="get_report", group_outputs=True),
    ]

    _result = None

    def _pre_run_setup(self) -> None:
        """Forget the previous run's result."""
        self._result = None

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the complete tables or the data directory's models when a refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def probed(self) -> tuple:
        """Run the probe once per run; both outputs read the same result (empty when a failure stopped the node)."""
        if self._result is None:
            with readable_errors(self) as outcome:
                quiet_progress()
                scopes = component_file_access_scopes(self)
                library, split, out_dir = ((v or "").strip() for v in (self.library, self.split, self.out_dir))
                if library:
                    library = str(enforce_local_file_access(self.resolve_path(library), scope_ids=scopes))
                if split:
                    split = str(enforce_local_file_access(self.resolve_path(split), scope_ids=scopes))
                if out_dir:
                    out_dir = str(enforce_local_file_access(out_dir, scope_ids=scopes))
                self._result = probe_node(library, self.model_dir, self.control_dir, self.domain, out_dir,
                                          self.prefix_steps, self.next_steps, self.redis_url, self.variants,
                                          self.heldout, self.seed, self.limit, split=split)
            if outcome.failed:
                self._result = ({}, "", outcome.message)
        self.status = self._result[2]
        return self._result

    def get_summary(self) -> Data:
        """Return entry rate, followed steps, where continuations diverged and layer similarities per model."""
        return Data(data=self.probed()[0])

    def get_report(self) -> Message:
        """Return the probe's Markdown report (the figures are in the report folder)."""
        return Message(text=self.probed()[1])
