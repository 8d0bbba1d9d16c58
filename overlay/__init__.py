"""langflow-overlay: token-level reasoning overlays (Redis semantic-weight table + small selector LM)."""

__version__ = "0.1.0"

import os as _os

# The decode-time scorers multiply tiny matrices one token at a time: BLAS threads only add contention there.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
