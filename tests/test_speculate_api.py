"""``speculate=`` / ``--speculate`` and ``draft=`` / ``--draft`` through the API and the CLI.

The sessions' exactness is proved in ``test_speculate_backends.py``; here: the question pipeline hands the
mode to the session, the output is plain decoding's, the Result carries the session's report, the stream
carries ``Speculating`` figures, and where speculation cannot run an explicit mode is refused in one line
while ``auto`` is off with a note.
"""

from __future__ import annotations

import json

import pytest
from helpers import assert_error

from qvq_local.errors import InputError
from qvq_local.events import Finished, Speculating
from qvq_local.settings import AskSettings

QUESTION = "Which bar is the tallest?"
# small budgets keep llama.cpp's context under 256 cells, where its batched and single-token attention
# agree (test_speculate_backends.py explains)
BUDGETS = {"think_budget": 24, "answer_budget": 8}


@pytest.fixture(scope="module", params=["llama", "mlx"])
def model(request):
    from qvq_local.api import load

    if request.param == "llama":
        pytest.importorskip("llama_cpp")
        ref = request.getfixturevalue("tiny_gguf_q4").model
    else:
        pytest.importorskip("mlx_vlm")
        ref = request.getfixturevalue("tiny_mlx_q4")
    with load(ref, backend=request.param) as loaded:
        loaded.prefix_cache = None  # each run prefills afresh
        yield loaded


def _result(events) -> object:
    assert isinstance(events[-1], Finished)
    return events[-1].result


def test_ngram_speculation_gives_plain_decodings_output(model, sample_image):
    plain = _result(list(model.stream([sample_image], QUESTION, **BUDGETS)))
    events = list(model.stream([sample_image], QUESTION, speculate="ngram", **BUDGETS))
    spec = _result(events)
    assert (spec.thought, spec.answer) == (plain.thought, plain.answer)
    assert [(f.reason, f.text, f.at_token) for f in spec.forced] == [
        (f.reason, f.text, f.at_token) for f in plain.forced
    ]
    assert (spec.thought_tokens, spec.answer_tokens) == (plain.thought_tokens, plain.answer_tokens)
    assert "speculation" not in plain.settings
    report = spec.settings["speculation"]
    assert report["mode"] == "ngram" and report["drafter"] == "ngram" and report["plan"] == "fixed"
    assert report["tokens"] > 0 and report["steps"] > 0 and report["tokens_per_step"] >= 1.0
    figures = [e for e in events if isinstance(e, Speculating)]
    assert figures and figures[-1].mode == "ngram" and figures[-1].on
    assert (figures[-1].tokens, figures[-1].steps) == (report["tokens"], report["steps"])
    assert isinstance(events[-2], Speculating)  # the last figures come just before Finished


def test_a_draft_model_through_load(model, sample_image):
    """``load(draft=)`` opens the draft on the same backend; an identical draft is right on nearly every
    guess and the output stays plain decoding's.  (The language lock is off: the draft proposes what the
    unmasked model would, and a random model's masked scripts would be rejected guesses.)"""
    from qvq_local.api import load

    plain = _result(list(model.stream([sample_image], QUESTION, lang_lock="off", **BUDGETS)))
    with load(model.path, backend=model.backend, draft=model.path) as drafted:
        drafted.prefix_cache = None
        assert drafted.draft is not None
        spec = drafted.ask([sample_image], QUESTION, speculate="draft", lang_lock="off", **BUDGETS)
    assert (spec.thought, spec.answer) == (plain.thought, plain.answer)
    report = spec.settings["speculation"]
    # right on every guess but those dropped where the budget cut forces the answer and where it ends
    assert report["drafter"] == "draft" and report["acceptance"] > 0.8 and report["tokens_per_step"] > 3, (
        report
    )


def test_draft_mode_without_a_draft_model_is_refused(model, sample_image):
    with pytest.raises(InputError, match="draft model"):
        model.ask([sample_image], QUESTION, speculate="draft", **BUDGETS)


def test_speculation_with_samples(model, sample_image):
    """One chain only: ngram with samples is refused; auto is off with a note and the chains run."""
    with pytest.raises(InputError, match="speculate ngram: speculation runs on one chain"):
        model.ask([sample_image], QUESTION, speculate="ngram", samples=2, **BUDGETS)
    result = model.ask([sample_image], QUESTION, speculate="auto", samples=2, **BUDGETS)
    report = result.settings["speculation"]
    assert report["mode"] == "off" and report["asked"] == "auto" and "one chain" in report["notes"][0]
    assert len(result.chains) == 2


def test_the_mode_is_checked():
    with pytest.raises(InputError, match="speculate must be one of off, ngram, draft, auto, got 'fast'"):
        AskSettings.build({"speculate": "fast"})
    assert AskSettings.build({"speculate": " NGRAM "}).speculate == "ngram"
    assert AskSettings().speculate == "off"


def test_a_backend_that_cannot_speculate(sample_image):
    """A backend without the registry's ``speculation`` capability (test_api's scripted fake): ngram is
    refused naming the backends that can, auto is off with a note and the question runs."""
    from test_api import _model

    model, _ = _model(thought="a b c", answer="\\boxed{1}")
    with pytest.raises(InputError) as err:
        model.ask([sample_image], QUESTION, speculate="ngram")
    assert_error(err, "speculate ngram", "fake backend cannot check guessed tokens", "llama.cpp", "MLX")
    result = model.ask([sample_image], QUESTION, speculate="auto")
    report = result.settings["speculation"]
    assert report["mode"] == "off" and report["asked"] == "auto" and result.answer


def test_cli_speculate_and_bad_values(tiny_gguf_q4, sample_image):
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from qvq_local.cli import app

    args = ["ask", str(sample_image), QUESTION, "--model", str(tiny_gguf_q4.model), "--backend", "llama"]
    args += ["--think-budget", "24", "--answer-budget", "8", "--no-cache", "--json"]
    out = CliRunner().invoke(app, [*args, "--speculate", "ngram"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["qvq"]["settings"]["speculation"]["mode"] == "ngram"
    bad = CliRunner().invoke(app, [*args, "--speculate", "fast"])
    assert bad.exit_code != 0
    assert_error(bad.output.strip().splitlines()[-1], "--speculate must be one of off, ngram, draft, auto")
    # --draft alone asks for the draft's guesses (it was silently ignored before); no option: plain decoding
    drafted = CliRunner().invoke(app, [*args, "--draft", str(tiny_gguf_q4.model), "--lang-lock", "off"])
    assert drafted.exit_code == 0, drafted.output
    report = json.loads(drafted.stdout.strip().splitlines()[-1])["qvq"]["settings"]["speculation"]
    assert report["mode"] == "draft" and report["drafter"] == "draft"
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "speculation" not in json.loads(plain.stdout.strip().splitlines()[-1])["qvq"]["settings"]
