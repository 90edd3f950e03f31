"""The one rule for plain-string prompts, shared by ``calibrate`` (generated sources), ``generate`` and
``train-drafter --source target`` (which has no flag: ``auto``).

``--chat-template``:
- ``auto`` (default): a string prompt is wrapped as one user message in the tokenizer's chat template when
  the tokenizer has one, and fed as it is otherwise;
- ``always``: a string prompt is always wrapped (a tokenizer without a chat template is refused);
- ``never``: a string prompt is fed as it is (message lists are refused).
A list of ``{role, content}`` messages always goes through the chat template (refused without one).
"""

from __future__ import annotations

import hashlib
import json

from vocabtrim.errors import UserError

MODES = ("auto", "always", "never")
HELP = (
    "how a plain-string prompt is fed: auto = as a user message in the chat template when the tokenizer has one, "
    "else as it is; always = as a user message (refused without a chat template); never = as it is. "
    "Message lists always use the chat template"
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


TEMPLATE_KEY = "chat_template_sha256"  # the settings key of ``template_sha256`` (records written before it lack it)


def template_sha256(tokenizer, mode: str = "auto") -> str | None:
    """A hash of the chat template prompts go through under ``--chat-template`` ``mode`` (a named set of templates
    hashed as one), or None: under ``never``, or without one. Not in ``models.tokenizer_fingerprint``: tokenizers
    that differ only in their templates make the same token ids."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or mode == "never":
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def wraps_strings(mode: str, tokenizer, model_name: str) -> bool:
    """Whether string prompts become a user message under ``mode`` with this tokenizer (UserError if impossible)."""
    if mode not in MODES:
        raise UserError(f"--chat-template must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "always" and not has_chat_template(tokenizer):
        raise UserError(f"--chat-template always but {model_name}'s tokenizer has no chat template: use auto or never")
    return mode == "always" or (mode == "auto" and has_chat_template(tokenizer))


def as_user_message(prompt):
    """A non-empty string as ``[{"role": "user", "content": prompt}]``; anything else unchanged (bad rows stay bad)."""
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    return prompt


def check_message_lists(mode: str, tokenizer, model_name: str, where: str) -> None:
    """Refuse (one line) message lists that cannot be fed: they always go through the chat template, so not
    under ``never`` nor with a tokenizer that has none. ``where`` names what holds them, as
    "FILE holds message lists in 'COLUMN'"."""
    if mode == "never":
        raise UserError(f"{where}, which need the chat template: drop --chat-template never")
    if not has_chat_template(tokenizer):
        raise UserError(f"{where} but {model_name}'s tokenizer has no chat template: give it one (chat_template in its "
                        "tokenizer_config.json), or pass plain text prompts")
