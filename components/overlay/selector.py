"""IT-LM Selector node: the small selector model scores a context's candidates and picks the next token."""

from lfx.custom.custom_component.component import Component
from lfx.io import DataFrameInput, DropdownInput, FloatInput, IntInput, MessageTextInput, Output
from lfx.schema.data import Data

from overlay.langflow_support import choose, fill_options, readable_errors, selector_spec


class ITLMSelectorComponent(Component):
    """Score GetNeighbours' candidates after a context, and hand the selector to the Chain Decoder."""

    display_name = "IT-LM Selector"
    description = "A small selector model reads the question and recent tokens and picks among the table's candidates."
    icon = "list-checks"
    name = "OverlaySelector"

    inputs = [
        MessageTextInput(name="context", display_name="Context", info="Text before the token to choose."),
        DataFrameInput(
            name="candidates",
            display_name="Candidates",
            info="The Candidates output of GetNeighbours for the same context.",
        ),
        DropdownInput(
            name="model_dir",
            display_name="Model Folder",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Selector folder (config.json, model.safetensors, tokenizer.json): pick one under the data "
            "directory (refresh to list them) or type a path; empty uses $OVERLAY_MODEL_DIR.",
        ),
        FloatInput(
            name="temperature",
            display_name="Temperature",
            value=0.0,
            advanced=True,
            info="0 picks the best-scored candidate; above 0 samples.",
        ),
        FloatInput(name="top_p", display_name="Top-p", value=1.0, advanced=True, info="Nucleus sampling mass."),
        IntInput(name="seed", display_name="Seed", value=0, advanced=True, info="Seed for sampling."),
        FloatInput(
            name="mix",
            display_name="Table Weight Mix",
            value=0.0,
            advanced=True,
            info="Adds this multiple of each candidate's table weight to its log-prob before choosing.",
        ),
    ]
    outputs = [
        Output(display_name="Choice", name="choice", method="get_choice", group_outputs=True),
        Output(display_name="Selector", name="selector", method="get_selector", group_outputs=True),
    ]

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the selector folders under the data directory when Model Folder's refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def get_choice(self) -> Data:
        """Return the chosen token with its log-prob, margin and every candidate's score."""
        with readable_errors(self) as outcome:
            choice, status = choose(self.model_dir, self.context, self.candidates, self.temperature, self.top_p,
                                    self.seed, self.mix)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=choice)

    def get_selector(self) -> Data:
        """Load the model once per server process and return the folder and sampling settings the decoder uses."""
        with readable_errors(self) as outcome:
            spec, status = selector_spec(self.model_dir, self.temperature, self.top_p, self.seed, self.mix,
                                         on_load=self.log)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=spec)
