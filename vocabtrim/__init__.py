"""vocabtrim: trimmed drafter heads (VocabTrim / FR-Spec) and lossless batched speculative decoding on Ray."""

__version__ = "0.1.0"
