"""The embedded world: grammar, renderer, checker and tokenizer."""
from __future__ import annotations

import random

import numpy as np
import pytest

from cdlab.world import (ATTRIBUTES, BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Caption, adherence,
                         check, parse_caption, render, sample_captions)
from cdlab.world.checker import read


def test_captions_round_trip_through_text():
    for cap in sample_captions(300, seed=3):
        assert parse_caption(cap.text) == cap


def test_grammar_covers_every_value_and_never_hides_the_object():
    caps = sample_captions(4000, seed=0)
    for attr, values in zip(("color", "background", "shape", "size", "position"),
                            (COLORS, BACKGROUNDS, SHAPES, SIZES, POSITIONS)):
        assert {getattr(c, attr) for c in caps} == set(values)
    assert all(c.color != c.background for c in caps)
    with pytest.raises(ValueError, match="invisible"):
        Caption("small", "red", "circle", "center", "red")


@pytest.mark.parametrize("text", ["", "a dog", "a huge red circle in the center on a blue background"])
def test_parse_rejects_what_the_grammar_cannot_say(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_render_is_deterministic_by_seed_and_seed_matters():
    cap = Caption("large", "red", "triangle", "top left", "blue")
    a, b, c = (np.asarray(render(cap, s)) for s in (1, 1, 2))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_checker_is_at_least_99_percent_right_on_ground_truth():
    caps = sample_captions(1500, seed=11)
    imgs = [render(c, seed=i) for i, c in enumerate(caps)]
    scores = adherence(imgs, caps)
    assert scores["all"] >= 0.99, scores
    for a in ATTRIBUTES:
        assert scores[a] >= 0.99, (a, scores)


def test_checker_rejects_wrong_captions_attribute_by_attribute():
    cap = Caption("large", "red", "square", "bottom right", "white")
    img = render(cap, 0)
    assert all(check(img, cap).values())
    wrong = {"color": "blue", "background": "black", "shape": "circle", "size": "small", "position": "top left"}
    for attr, value in wrong.items():
        other = Caption(**{**cap.as_dict(), attr: value})
        result = check(img, other)
        assert result[attr] is False
        assert all(v for k, v in result.items() if k != attr)


def test_checker_on_noise_is_mostly_wrong():
    rng = np.random.default_rng(0)
    from PIL import Image
    caps = sample_captions(200, seed=5)
    noise = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in caps]
    assert adherence(noise, caps)["all"] < 0.05


def test_tokenizer_keeps_every_grammar_word_whole(tmp_path):
    from transformers import CLIPTokenizer
    from cdlab.tiny.architecture import MAX_LENGTH, write_tokenizer
    from cdlab.world import all_words

    write_tokenizer(str(tmp_path))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == MAX_LENGTH
    for w in all_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    text = sample_captions(1, seed=0)[0].text
    assert len(tok(text).input_ids) == len(text.split()) + 2
    # Out-of-grammar text still tokenizes (byte-level fallback), it is never an error.
    assert len(tok.tokenize("zebra!")) >= 5
