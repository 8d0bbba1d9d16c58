"""Langflow components of langflow-overlay, installed as the ``overlay_components`` package with its extension.json."""
