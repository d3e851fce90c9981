"""Helpers of the tests that run erase(): the real digits split into what to forget and keep, and a simulated crash."""
import fastunlearn as fu
from fastunlearn.methods import REGISTRY


def digits_split(n_forget: int, n_retain: int):
    """(forget, retain): the first ``n_forget`` images of digit 3 and the first ``n_retain`` of the other digits."""
    data = fu.datasets.digits()
    three = data.labels == 3
    return (fu.DataPoints(data.images[three][:n_forget], labels=data.labels[three][:n_forget]),
            fu.DataPoints(data.images[~three][:n_retain], labels=data.labels[~three][:n_retain]))


def crash_at(monkeypatch, method_name: str, at_step: int):
    """Make the registered method raise KeyboardInterrupt at step ``at_step`` (a killed run); returns the undo."""
    cls = REGISTRY[method_name]
    original = cls.step

    def crashing(self, step, gen):
        if step == at_step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, gen)

    monkeypatch.setattr(cls, "step", crashing)
    return lambda: monkeypatch.setattr(cls, "step", original)
