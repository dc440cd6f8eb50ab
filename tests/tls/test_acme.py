"""ACME error texts: one line, whole up to ERR_MAX, cut at a word boundary beyond it."""

from __future__ import annotations

from pyrycode_relay.tls.acme import ERR_MAX, error_text


def test_every_line_is_kept_on_one_line() -> None:
    exc = ValueError("Authorization for x failed:\n  Challenge http-01 failed with error boom\n")
    assert error_text(exc) == (
        "ValueError: Authorization for x failed: Challenge http-01 failed with error boom"
    )


def test_an_empty_message_gives_the_type() -> None:
    assert error_text(TimeoutError()) == "TimeoutError"


def test_hidden_strings_are_replaced() -> None:
    exc = ValueError('expected "tok.thumb" got "other"')
    assert error_text(exc, hide=["tok.thumb"]) == (
        'ValueError: expected "[key authorization]" got "other"'
    )


def test_a_text_at_the_bound_is_whole() -> None:
    message = "x" * (ERR_MAX - len("ValueError: "))
    assert error_text(ValueError(message)) == f"ValueError: {message}"


def test_a_longer_text_is_cut_at_a_word_boundary_and_marked() -> None:
    words = " ".join(f"word{i:04d}" for i in range(ERR_MAX))  # every word 8 characters
    text = error_text(ValueError(words))
    assert len(text) <= ERR_MAX and text.endswith("…")
    kept = text[: -len("…")].split(" ")
    assert kept[0] == "ValueError:" and all(len(w) == 8 for w in kept[1:]), kept[-1]
    assert words.startswith(" ".join(kept[1:]) + " ")


def test_one_unbroken_token_is_cut_at_the_bound() -> None:
    text = error_text(ValueError("y" * 5000))
    assert len(text) == ERR_MAX and text.endswith("y…")
