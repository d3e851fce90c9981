"""fastunlearn: make a diffusion model forget a class, a text concept, or specific training images."""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) logs an error on CPU-only machines about an optional 4-bit kernel
# package fastunlearn never uses; keep users' terminals clean.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.CRITICAL)

from .targets import Classes, Concept, DataPoints  # noqa: E402
from .api import erase  # noqa: E402
from .result import Result, load  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .planner import plan  # noqa: E402
from . import datasets, errors, zoo  # noqa: E402

__all__ = ["erase", "evaluate", "load", "plan", "Result", "Classes", "Concept", "DataPoints", "datasets", "zoo", "errors", "__version__"]
