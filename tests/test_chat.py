"""``--chat-template``: the one rule for plain-string prompts (``vocabtrim.chat``)."""

from types import SimpleNamespace

import pytest

from vocabtrim.chat import as_user_message, wraps_strings
from vocabtrim.errors import UserError

WITH = SimpleNamespace(chat_template="{{ messages }}")
WITHOUT = SimpleNamespace(chat_template=None)


@pytest.mark.parametrize("mode, tokenizer, wrapped", [
    ("auto", WITH, True), ("auto", WITHOUT, False), ("always", WITH, True), ("never", WITH, False), ("never", WITHOUT, False),
])
def test_which_modes_wrap_string_prompts(mode, tokenizer, wrapped):
    assert wraps_strings(mode, tokenizer, "m") is wrapped


def test_always_without_a_chat_template_is_refused():
    with pytest.raises(UserError, match="--chat-template always but m's tokenizer has no chat template"):
        wraps_strings("always", WITHOUT, "m")


def test_only_non_empty_strings_become_a_user_message():
    assert as_user_message("hi") == [{"role": "user", "content": "hi"}]
    for bad in (None, "", "  ", 3, [{"role": "user", "content": "x"}]):
        assert as_user_message(bad) == bad  # bad rows stay bad rows with their own error; lists stay lists
