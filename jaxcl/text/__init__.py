"""Text for the two-tower methods: strings to fixed-length rows of token ids.

The modules, each importing only those above it:

- clip_bpe: CLIP's byte-level BPE, id for id as open_clip's tokenizer.
- tokenizers: the tokenizers a config names (bytes, SentencePiece, CLIP
  BPE), built, saved beside a run and loaded back.
"""
