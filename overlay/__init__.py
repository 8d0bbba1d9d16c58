"""langflow-overlay: token-level reasoning overlays (Redis semantic-weight table + small selector LM)."""

__version__ = "0.1.0"
