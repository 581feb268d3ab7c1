"""The console of a command-line run (the CLI and the processes `compare` spawns)."""
from __future__ import annotations

import os


def quiet_console() -> None:
    """Defaults of a command-line run: no tokenizer threads or telemetry, and no known-harmless warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    # Known-harmless warnings of the pinned stack (docs/reliability.md): keep the console readable.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
