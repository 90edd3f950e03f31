"""The trimmed drafter head: the drafter's LM-head rows for the kept token ids.

- ``trimmed``: the head in memory (``TrimmedHead``, ``head_from_ids``).
- ``select``: which ids to keep (top-K, or the smallest K reaching a coverage), special tokens always in.
- ``files``: the names of the files in a head folder and the manifest kinds.
- ``io``: save a head, read its manifest, load it back refusing one built for another drafter or tokenizer.
- ``export``: the kept ids as SGLang, EAGLE-3 and SpecForge read them.
- ``plot``: the coverage curve with the chosen K.
- ``build``: ``vocabtrim build-head``: histogram + drafter → a head folder (an EAGLE-3 drafter re-trimmed).

The histogram, the head folder and every file in it are locations (``vocabtrim.storage``): local paths or
object-store URIs (``s3://bucket/head``); each file is written whole (a temporary file renamed, or one upload).
"""
