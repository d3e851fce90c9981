"""One module per method; each registers itself in ``REGISTRY`` under the name ``erase(method=...)`` takes."""
from .base import REGISTRY, Batch, Method, get_method, register  # noqa: F401
from . import siss  # noqa: F401
from . import sfd  # noqa: F401
from . import esd  # noqa: F401
from . import erasediff  # noqa: F401

__all__ = ["REGISTRY", "Batch", "Method", "get_method", "register"]
