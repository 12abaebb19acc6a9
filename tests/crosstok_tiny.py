"""A second tiny tokenizer family for cross-tokenizer tests: SentencePiece-style BPE with byte fallback.

Trained on the fly on the tiny corpus with a small alphabet, so accented letters, CJK and emoji fall back to
``<0xNN>`` byte pieces, as they do in Llama-2 and Gemma vocabularies.
"""

from __future__ import annotations

import json

from tiny import make_corpus, make_model


def sentencepiece_tokenizer(vocab_size: int = 320, *, dummy_prefix: bool = False, bos: bool = True):
    """A Gemma-like tokenizer: ``▁`` for spaces, ``<0xNN>`` byte fallback, ``<bos>``/``<eos>``/``<unk>``/``<pad>``.

    ``dummy_prefix`` adds Llama-2's normaliser that puts a ``▁`` in front of every text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, limit_alphabet=60, show_progress=False
    )
    base.train_from_iterator([r["text"] for r in make_corpus(40, seed=7)], trainer=trainer)
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
        special["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def save_other_tokenizer_student(folder):
    """Save a tiny random-init student that reads its own (SentencePiece-style) tokenizer into ``folder``."""
    tok = sentencepiece_tokenizer()
    model = make_model(len(tok), hidden=16, layers=1, heads=2, max_pos=256)
    model.config.eos_token_id, model.config.bos_token_id = tok.eos_token_id, tok.bos_token_id
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
