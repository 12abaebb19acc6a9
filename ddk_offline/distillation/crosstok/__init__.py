"""Cross-tokenizer distillation (``distill --cross-tokenizer``): a student whose tokenizer differs from the dump's.

- :mod:`.vocab_bytes`: the bytes of every token id, read from the vocabulary;
- :mod:`.align`: a teacher row's documents re-tokenised by the student, and byte-exact position pairs;
- :mod:`.rows`: the student rows of a whole dump, built once and cached by both tokenizers' hashes;
- :mod:`.methods`: the losses (``exact-map``, ``uld``) behind one small interface.
"""
