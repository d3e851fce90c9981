"""Concept erasure on a trained text-to-image model: the bundled ``fu.zoo.digits_text()``, a tiny Stable
Diffusion pipeline (UNet2DConditionModel with cross-attention, CLIP text encoder and tokenizer built locally)
trained on scikit-learn's digits with prompts that name the digit. Its prompts map to classes, so erasing
"a picture of the digit three" is judged with the digits classifier, and the other digits' prompts are the
unrelated prompts that must stay close to the original (which a random-weight toy cannot show: see
tests/test_concepts.py)."""
import json

import pytest
import torch

import fastunlearn as fu
from fastunlearn.text import digit_prompt

CONCEPT = digit_prompt(3)
EVAL = dict(n_per_class=50, num_inference_steps=25)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return fu.zoo.digits_text()


@pytest.fixture(scope="module")
def base_rates(esd_report):
    return esd_report["before"]["recognition"]  # the bundled model's own rates, from the same evaluation


def test_bundled_text_model_draws_the_digit_its_prompt_names(pipe, base_rates):
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(CONCEPT).input_ids)[-2:] == ["three</w>", "<|endoftext|>"]
    assert pipe.unet.config.fastunlearn_class_prompts[3] == CONCEPT
    rates = list(base_rates.values())
    assert sum(rates) / 10 >= 0.85 and min(rates) >= 0.6, base_rates
    assert base_rates[3] >= 0.8, base_rates


def _erased(report, base_rates):
    """(the concept's class rate after, mean fraction of their rate the other digits keep, shift ratio)."""
    after = report["after"]["recognition"]
    kept = sum(after[c] / base_rates[c] for c in range(10) if c != 3) / 9
    return after[3], kept, report["unrelated_shift_mean"] / report["concept_shift"]


@pytest.fixture(scope="module")
def esd_report(pipe):
    res = fu.erase(pipe, forget=fu.Concept(CONCEPT), method="esd", steps=100, batch_size=16, lr=2e-4,
                   ddim_steps=25, progress=False)
    return fu.evaluate(res, before=pipe, **EVAL)


def test_esd_erases_the_concept_and_moves_other_prompts_less(esd_report, base_rates):
    """ESD has no preservation term: its cross-attention edit for "three" also reaches the other digits'
    prompts, which share most of their tokens (measured: 94% -> 2%, others keep 86.8%, worst digit 9 at 67%;
    the other prompts move 0.19x as much as the concept). The erased prompt's rate depends on the sampler
    (22% when drawn with 20 DDIM steps instead of 25): the edit is weaker than EraseDiff's."""
    forget, kept, shift = _erased(esd_report, base_rates)
    assert forget <= 0.15 and kept >= 0.8 and shift < 0.35, (forget, kept, shift, esd_report["after"]["recognition"])


@pytest.fixture(scope="module")
def erasediff_report(pipe):
    data = fu.datasets.digits()
    keep = data.labels != 3
    retain = fu.DataPoints(data.images[keep], prompts=[digit_prompt(int(c)) for c in data.labels[keep]])
    res = fu.erase(pipe, forget=fu.Concept(CONCEPT, anchor=digit_prompt(8)), retain=retain, method="erasediff",
                   steps=150, batch_size=32, lr=1e-4, n_generate=64, generate_steps=25, progress=False)
    return fu.evaluate(res, before=pipe, **EVAL)


def test_erasediff_erases_the_concept_and_keeps_the_other_prompts(erasediff_report, base_rates):
    """With the retain term the other digits stay (measured with the forget images guided at the pipeline's 7.5:
    94% -> 2%, others keep 99.8%, worst 97.9%; the other prompts move 0.10x as much as the concept. Unguided, the
    earlier default: 0%, 99.6%, 95.7%, 0.09x)."""
    forget, kept, shift = _erased(erasediff_report, base_rates)
    assert forget <= 0.05 and kept >= 0.95 and shift < 0.2, (forget, kept, shift,
                                                             erasediff_report["after"]["recognition"])


def test_cli_erases_a_prompt_of_the_bundled_text_model_and_evaluates_it(tmp_path, capsys):
    from fastunlearn.cli import main

    main(["erase", "--model", "digits_text", "--concept", CONCEPT, "--method", "esd", "--steps", "2",
          "--batch-size", "2", "--option", "ddim_steps=2", "--no-progress", "--out", str(tmp_path / "r")])
    main(["eval", str(tmp_path / "r"), "--n-per-class", "2", "--num_inference_steps", "2"])
    m = json.loads((tmp_path / "r" / "eval" / "metrics.json").read_text())
    assert m["base_model"] == "zoo:digits_text" and m["kind"] == "text" and m["concept"] == CONCEPT
    assert m["forgotten_classes"] == [3] and set(m["after"]["recognition"]) == set(str(c) for c in range(10))
    assert "concept shift" in capsys.readouterr().out
