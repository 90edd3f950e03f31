"""One rule for the ids that end generation, the padding id, and the ids a drafter always keeps."""

from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from vocabtrim.special_tokens import eos_ids, pad_id, special_token_ids


def tokenizer(eos=None, pad=None, **more):
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad, **more)


@pytest.mark.parametrize("generation, expected", [
    (None, [2]),
    (GenerationConfig(eos_token_id=7), [2, 7]),
    (GenerationConfig(eos_token_id=[9, 2, 7]), [2, 7, 9]),
    ({"eos_token_id": 5}, [2, 5]),  # a generation_config.json, as the vLLM backend reads it
    ({"eos_token_id": [5, 6]}, [2, 5, 6]),
])
def test_eos_ids_union_the_tokenizer_and_the_generation_config(generation, expected):
    assert eos_ids(tokenizer(eos=2), generation) == expected


def test_eos_ids_come_from_the_generation_config_when_the_tokenizer_has_none():
    assert eos_ids(tokenizer(), {"eos_token_id": [4, 3]}) == [3, 4]
    assert eos_ids(tokenizer(), None) == []


@pytest.mark.parametrize("tok, generation, expected", [
    (tokenizer(eos=2, pad=0), {"pad_token_id": 5, "eos_token_id": 7}, 0),  # the tokenizer's own pad
    (tokenizer(eos=2), {"pad_token_id": 5, "eos_token_id": 7}, 5),  # else the generation config's
    (tokenizer(eos=2), {"eos_token_id": 7}, 2),  # else the tokenizer's EOS
    (tokenizer(), {"eos_token_id": [7, 8]}, 7),  # else the generation config's first EOS
    (tokenizer(), GenerationConfig(eos_token_id=[7, 8]), 7),
    (tokenizer(), None, None),
])
def test_pad_falls_back_in_one_order(tok, generation, expected):
    assert pad_id(tok, generation) == expected


def test_a_drafter_keeps_every_eos_and_the_padding_id():
    tok = tokenizer(eos=2, bos_token_id=1, unk_token_id=None, all_special_ids=[1, 2, 11], added_tokens_decoder={})
    kept = special_token_ids(tok, GenerationConfig(eos_token_id=[2, 9]))
    assert kept == [1, 2, 9, 11]  # pad falls back to the EOS 2
    assert set(eos_ids(tok, GenerationConfig(eos_token_id=[2, 9]))) <= set(kept)
