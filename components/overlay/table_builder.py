"""Table Builder node: turns a JSONL dataset into a new version of a domain's semantic-weight table."""

from lfx.custom.custom_component.component import Component
from lfx.io import DropdownInput, FileInput, IntInput, MessageTextInput, Output, SecretStrInput
from lfx.schema.data import Data
from lfx.utils.file_path_security import component_file_access_scopes, enforce_local_file_access

from overlay.langflow_support import NodeError, build_table_node, fill_options, readable_errors


class TableBuilderComponent(Component):
    """Build a table from a dataset file: chains, a trained tokenizer, then n-gram weights in Redis."""

    display_name = "Table Builder"
    description = "Builds a domain's semantic-weight table in Redis from a JSONL dataset (GSM8K-style or generic)."
    icon = "database"
    name = "OverlayTableBuilder"

    inputs = [
        FileInput(name="file", display_name="Dataset File", file_types=["jsonl"], info="Upload a JSONL dataset."),
        MessageTextInput(
            name="path",
            display_name="Dataset Path",
            info="Or the path of a JSONL file on the machine running the flow.",
        ),
        DropdownInput(
            name="fmt",
            display_name="Format",
            options=["gsm8k", "jsonl"],
            value="gsm8k",
            info="gsm8k: question/answer records; jsonl: question/steps/answer fields.",
        ),
        DropdownInput(
            name="domain",
            display_name="Domain",
            options=[],
            value="",
            combobox=True,
            refresh_button=True,
            info="Domain to build: a new name, or an existing one (refresh to list them) for a new version; empty "
            "uses $OVERLAY_DOMAIN.",
        ),
        IntInput(name="max_order", display_name="Max Order", value=3, advanced=True, info="Longest context length N."),
        IntInput(
            name="vocab_size",
            display_name="Vocabulary Size",
            value=2000,
            advanced=True,
            info="Size of the tokenizer trained on the chains.",
        ),
        IntInput(
            name="limit", display_name="Limit", value=0, advanced=True, info="Use only the first N records; 0 = all."
        ),
        SecretStrInput(
            name="redis_url",
            display_name="Redis URL",
            value="",
            load_from_db=False,
            required=False,
            advanced=True,
            info="Where to build; empty uses $OVERLAY_REDIS_URL, else embedded Redis.",
        ),
    ]
    outputs = [
        Output(display_name="Build", name="build", method="build_table"),
    ]

    def update_build_config(self, build_config: dict, field_value: object, field_name: str | None = None) -> dict:
        """List the domains that have a complete table when Domain's refresh button is pressed."""
        return fill_options(build_config, field_value, field_name)

    def build_table(self) -> Data:
        """Build a new table version and return its counts; readers switch only once it is complete."""
        with readable_errors(self) as outcome:
            given = [value for value in ((self.path or "").strip(), self.file or "") if value]
            if len(given) != 1:
                raise NodeError("give exactly one of Dataset File or Dataset Path")
            path = enforce_local_file_access(self.resolve_path(given[0]), scope_ids=component_file_access_scopes(self))
            result, status = build_table_node(self.redis_url, path, self.fmt, self.domain, self.max_order,
                                              self.vocab_size, self.limit)
        if outcome.failed:
            return Data()
        self.status = status
        return Data(data=result)
