"""The interface every method implements, and the small registry behind ``erase(method=...)``.

A method is a class that declares what it accepts (``targets``), whether it needs retain data, its
defaults and its options (named after the papers), builds its trainable state in ``setup`` and writes
the gradients of one optimizer step into ``p.grad`` in ``step``. The training loop
(``fastunlearn.trainer``) owns the optimizer, progress, checkpoints and numerical guards.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional

import torch

from ..errors import bad_type, bad_value
from ..roles import Roles
from ..run import Batch  # noqa: F401  (methods take their batches from the run)

REGISTRY: Dict[str, type] = {}


# ------------------------------------------------------------------------------------------ options
def option(default, help: str, check: Optional[Callable] = None):
    """A method option, a field of the method's ``Options``: its default, one line of help (``fastunlearn erase
    --help`` lists it) and the check of a value, ``check(name, value)``, which raises an error naming the option."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check))


@dataclass(frozen=True)
class Options:
    """A method's options as one typed object (as peft's configs): every field carries its default, help and
    check; ``validate`` holds the rules between fields. ``Method.resolve_options`` builds it from
    ``erase(**method_options)``, before any work."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                check(f.name, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Rules between options (none unless a method has some)."""

    @classmethod
    def help(cls) -> Dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str):
    if not isinstance(name, str) or name not in REGISTRY:
        raise bad_value("method", " | ".join(sorted(REGISTRY)), name)
    return REGISTRY[name]


class Method:
    name: ClassVar[str] = ""
    targets: ClassVar[tuple] = ()          # target kinds accepted: "datapoints", "classes", "concept"
    needs_retain: ClassVar[bool] = False
    needs_forget_data: ClassVar[bool] = False  # images of what to forget are required
    defaults: ClassVar[dict] = {}           # steps, batch_size, lr, optimizer betas/weight decay
    Options: ClassVar[type] = Options       # the method's options: defaults, help and checks in one class
    options: ClassVar[dict] = {}            # {option: default}, derived from Options
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.options = {f.name: f.default for f in dataclasses.fields(cls.Options)}

    def __init__(self, run, **options):
        self.run = run
        self.opts = self.resolve_options(options)

    @classmethod
    def resolve_options(cls, options: dict) -> dict:
        """``options`` checked (unknown names, each value, the rules between them) with the defaults filled in."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise bad_value(f"{unknown[0]}", f"an option of method {cls.name!r}: "
                            + (", ".join(sorted(cls.options)) or "(none)"), options[unknown[0]])
        return dataclasses.asdict(cls.Options(**options))

    def setup(self) -> None:
        """Choose the trainable parameters and declare the roles (``self.roles = Roles(self.run, ...)``)."""

    _roles = None  # declared in setup, or the default built on first use

    @property
    def roles(self):
        """The networks the method evaluates (``fastunlearn.roles.Roles``), which runtime, distributed,
        checkpoints and results act on. Methods with a teacher or several trained roles declare theirs in
        ``setup``; the others train the run's model alone (asked for after ``setup``)."""
        if self._roles is None:
            self._roles = Roles(self.run, teacher=False)
        return self._roles

    @roles.setter
    def roles(self, value) -> None:
        self._roles = value

    def trainable_parameters(self) -> list:
        raise NotImplementedError

    def step(self, step: int, gen: torch.Generator) -> dict:
        """Write this step's gradients into ``p.grad``; return scalar diagnostics for the history."""
        raise NotImplementedError

    def done(self, step_done: int, history: list) -> bool:
        """A stopping rule: whether training has reached its goal after ``step_done`` steps (``history`` holds their
        stats), so the loop ends before ``steps``, which is then the cap. Decided from the history and the
        method's state alone, so a resumed run stops where an uninterrupted one does. Default: never."""
        return False

    # Methods with extra trained roles (SFD) keep them in these hooks so checkpoints and results see them.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------ checks
def optional(check: Callable) -> Callable:
    """``check``, with None also accepted (None: the method decides)."""
    return lambda name, value: None if value is None else check(name, value)


def positive(allow_zero: bool = False) -> Callable:
    return lambda name, value: check_positive_float(name, value, allow_zero=allow_zero)


def one_of(*choices) -> Callable:
    return lambda name, value: check_choice(name, value, choices)


def integer(lo: int = 1, allow_none: bool = False, hi: Optional[int] = None) -> Callable:
    def check(name, value):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            expected = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
            raise bad_value(name, expected + (" or None" if allow_none else ""), value)
    return check


def boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise bad_type(name, "True or False", value)


def check_positive_float(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(name, "a number", value)
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise bad_value(name, "a non-negative number" if allow_zero else "a positive number", value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise bad_value(name, " | ".join(map(str, choices)), value)


def check_unit_interval(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise bad_value(name, "a number in [0, 1]", value)
