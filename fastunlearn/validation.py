"""Input checks ``erase()`` runs before any work, beyond the ones next to each type (``config.RunConfig`` for
the run settings, ``targets.py``, each method's ``Options``, ``inputs`` for the model and the data).

Every check raises one of fastunlearn's errors (``fastunlearn.errors``) whose message starts with the
argument's name and says what was expected, so a typo costs milliseconds, not a failed run an hour in.
"""
from __future__ import annotations

import torch

from .errors import bad_value
from .targets import Classes, Concept


def check_target_fits(forget, den) -> None:
    """The target matches the model: a text concept needs a text-conditional model, class ids a
    class-conditional one (the range of ids and labels is checked in ``erase``)."""
    if isinstance(forget, Concept) and den.kind != "text":
        raise bad_value("forget", "fu.Concept only for a text-conditional model (UNet2DConditionModel or a "
                        "pipeline)", type(den.model).__name__)
    if isinstance(forget, Classes) and forget.override is not None:
        if isinstance(forget.override, bool) or forget.override < 0:
            raise bad_value("Classes.override", "a non-negative class id", forget.override)


def model_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model (names, shapes, dtypes and the first values of every tensor): a
    resumed run must start from the same base weights, which a LoRA checkpoint does not contain."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        head = t.detach().reshape(-1)[:256].to("cpu", copy=True).contiguous()
        h.update(head.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
