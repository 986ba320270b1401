"""Boundary defects of issue #15: values read from files, post-processing of odd text, images, unreadable files,
interrupted writes and the warnings transformers gives. Each case names the input and what was expected."""
from __future__ import annotations

import json
import re

import pytest

import fixtures_tokenizer as ft
from kosmos2_ref.processing.text import Kosmos2Tokenizer


# ------------------------------------------------------------------------------------- tokenizer_config.json

def _tokenizer_folder(tmp_path, **changes):
    folder = ft.write_tokenizer_files(tmp_path, "synthetic")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder, path


@pytest.mark.parametrize("key, value, expected", [
    ("clean_up_tokenization_spaces", "false", "true or false"),
    ("clean_up_tokenization_spaces", 0, "true or false"),
    ("model_max_length", "2048 tokens", "a positive whole number"),
    ("model_max_length", 20.5, "a positive whole number"),
    ("padding_side", "middle", "'right' or 'left'"),
    ("bos_token", 7, "a token"),
])
def test_a_bad_tokenizer_config_value_names_the_file_and_key(tmp_path, key, value, expected):
    folder, path = _tokenizer_folder(tmp_path, **{key: value})
    with pytest.raises(ValueError) as info:
        Kosmos2Tokenizer.from_pretrained(folder)
    message = str(info.value)
    print(message)
    assert str(path) in message and key in message and expected in message and repr(value) in message


def test_tokenizer_config_booleans_and_lengths_that_are_fine(tmp_path):
    folder, _ = _tokenizer_folder(tmp_path, clean_up_tokenization_spaces=False, model_max_length=1e30)
    tokenizer = Kosmos2Tokenizer.from_pretrained(folder)
    assert tokenizer.clean_up_tokenization_spaces is False and tokenizer.model_max_length == int(1e30)
    folder, _ = _tokenizer_folder(tmp_path / "b", clean_up_tokenization_spaces=True, model_max_length=77)
    tokenizer = Kosmos2Tokenizer.from_pretrained(folder)
    assert tokenizer.clean_up_tokenization_spaces is True and tokenizer.model_max_length == 77
