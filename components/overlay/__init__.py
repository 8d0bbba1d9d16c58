"""The "Overlay" category of the Langflow sidebar: one node per file, each a thin layer over the overlay library."""
