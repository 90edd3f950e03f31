"""vocabtrim's speculative decoding engine.

- ``scheduler``: ``Engine`` (continuous batching, one step at a time), ``EngineConfig``, ``RowOutput``
- ``gamma``: adaptive speculation length
- ``sampling``: logits processing, counter-based noise, the Gumbel-coupling and rejection samplers
- ``drafters``: the ``Drafter`` protocol and its implementations
- ``model``, ``cache``, ``attention``, ``heads``: one model's forward over a static per-slot KV cache
"""

from __future__ import annotations


def build_drafter(drafter_model=None, head=None, target=None):
    """The drafter for a loaded drafter model (None: the target alone) and an optional ``TrimmedHead``;
    an EAGLE-3 model (``vocabtrim.eagle3``) becomes an ``Eagle3Drafter`` reading ``target``'s layers."""
    from vocabtrim.eagle3 import Eagle3Model
    from vocabtrim.errors import UserError

    if drafter_model is None:
        if head is not None:
            raise UserError("a trimmed head needs a drafter (drop --no-draft or --head)")
        return None
    if isinstance(drafter_model, Eagle3Model):
        from vocabtrim.engine.drafters.eagle3 import Eagle3Drafter

        from vocabtrim.models import EAGLE3_NO_HEAD

        if head is not None:
            raise UserError(EAGLE3_NO_HEAD)
        return Eagle3Drafter(drafter_model, int(target.config.num_hidden_layers))
    from vocabtrim.engine.drafters.causal_lm import CausalLMDrafter
    from vocabtrim.engine.heads import trimmed_head

    h = None if head is None else trimmed_head(head.token_ids, head.weight, head.bias, drafter_model)
    return CausalLMDrafter(drafter_model, h)


def make_engine(target, drafter_model=None, head=None, **config):
    """An ``Engine`` for a target and an optional Hugging Face drafter model and trimmed head;
    ``config``: ``EngineConfig`` fields."""
    from vocabtrim.engine.scheduler import Engine, EngineConfig
    from vocabtrim.errors import UserError
    from vocabtrim.models import logits_width

    from vocabtrim.eagle3 import Eagle3Model

    eagle3 = isinstance(drafter_model, Eagle3Model)  # its t2d was checked against the target when it was loaded
    if drafter_model is not None and not eagle3 and logits_width(target) != logits_width(drafter_model):
        raise UserError(f"target and drafter logits widths differ: {logits_width(target)} vs {logits_width(drafter_model)}")
    return Engine(target, build_drafter(drafter_model, head, target), EngineConfig(**config))
