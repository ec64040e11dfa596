"""The sampling rule set (runtime/sampling.py) that the entry model and the LLM step both apply."""

import math

import pytest

from runtime.core.errors import InputError
from runtime.sampling import Sampling


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=40, top_p=0.9), dict(top_p=1.0, top_k=0),
                                dict(min_tokens=8), dict(penalties=(("repetition_penalty", 1.1),))])
def test_valid_settings_pass(kw):
    assert Sampling(**kw).check(max_tokens=8) == Sampling(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=-0.01), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(top_p=math.nan), "top_p"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=9), "min_tokens"), (dict(beam_width=0), "beam_width must be 1"),
    (dict(beam_width=4), "beam_width must be 1"), (dict(penalties=(("presence_penalty", math.nan),)), "presence_penalty"),
    (dict(penalties=(("frequency_penalty", math.nan),)), "frequency_penalty must be a finite number"),
    (dict(penalties=(("repetition_penalty", 0.0),)), "repetition_penalty must be a finite number > 0"),
    (dict(penalties=(("repetition_penalty", -1.5),)), "repetition_penalty must be a finite number > 0"),
])
def test_invalid_settings_are_refused_by_name(kw, message):
    with pytest.raises(InputError, match=message):
        Sampling(**kw).check(max_tokens=8)
