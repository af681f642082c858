"""What a report records about where it was computed."""

from __future__ import annotations

import platform
from typing import Any


def versions() -> dict[str, Any]:
    """The versions a report was computed with, for its JSON."""
    import flax
    import jax
    import numpy as np
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }
