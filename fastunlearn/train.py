"""Old home of the training loop and the optimizer factory, now in ``fastunlearn.trainer``. Kept so that code
importing ``fastunlearn.train`` (the planner, some tests) keeps working; new code imports the trainer."""
from .config import OPTIMIZERS  # noqa: F401
from .trainer import loop as train, make_optimizer  # noqa: F401
