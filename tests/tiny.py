"""Tiny, download-free stand-ins for a real teacher: a BPE tokenizer trained on the fly, a random-init
Llama-architecture causal LM built from a config, and a small multi-domain corpus.

Everything is deterministic for a given seed, so tests can compare dumps byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Three domains that differ clearly in statistics, so per-domain numbers differ too.
_WORDS = (
    "the a of and to in is was for on that with as by at from his her it an be this which or are "
    "river mountain village morning letter garden window winter summer evening quiet bright old "
    "young story road house friend voice light shadow music stone forest walked said looked found"
).split()
_CODE_LINES = [
    "def {f}(x, y):",
    "    return x + {n}",
    "    if x > {n}:",
    "        y = {f}(y, x)",
    "for i in range({n}):",
    "    total += i * {n}",
    "import {f}",
    "class {F}:",
    "    def __init__(self):",
    "        self.{f} = {n}",
]
_IDENTS = ["alpha", "beta", "gamma", "delta", "parse", "load", "value", "index", "buffer", "node"]


def _prose_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def _code_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 12)):
        f = rng.choice(_IDENTS)
        lines.append(rng.choice(_CODE_LINES).format(f=f, F=f.capitalize(), n=rng.randint(0, 99)))
    return "\n".join(lines)


def _numbers_doc(rng: random.Random) -> str:
    rows = []
    for _ in range(rng.randint(3, 9)):
        rows.append(", ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(3, 8))))
    return "\n".join(rows)


DOMAINS = {"prose": _prose_doc, "code": _code_doc, "numbers": _numbers_doc}


def make_corpus(docs_per_domain: int = 30, seed: int = 0) -> list[dict[str, str]]:
    """Return ``[{"text": ..., "domain": ...}, ...]`` with domains interleaved."""
    rng = random.Random(seed)
    rows = []
    for i in range(docs_per_domain):
        for name, make in DOMAINS.items():
            rows.append({"text": make(rng), "domain": name, "id": f"{name}-{i}"})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_domain_folders(rows: list[dict[str, str]], root: Path) -> Path:
    """Folder layout: ``root/<domain>/<n>.txt``, one document per file."""
    for n, row in enumerate(rows):
        d = root / row["domain"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{n:05d}.txt").write_text(row["text"], encoding="utf-8")
    return root


def train_tokenizer(vocab_size: int = 384, seed: int = 0, *, bos: bool = False):
    """A byte-level BPE tokenizer trained on the tiny corpus, wrapped for transformers.

    With ``bos`` it also has a BOS token ``<s>`` that it puts in front of text when asked for special tokens
    (``add_special_tokens=True``), as Gemma's and Llama's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<s>"] if bos else ["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [r["text"] for r in make_corpus(60, seed=seed + 1)]
    tok.train_from_iterator(texts, trainer=trainer)
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        special["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def make_model(
    vocab_size: int,
    *,
    hidden: int = 48,
    layers: int = 2,
    heads: int = 4,
    max_pos: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
):
    """A random-init Llama-architecture causal LM (float32, eval mode); ``tie_word_embeddings``: one tensor for the
    input embedding and the output head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; scale the head so distributions are peaked like a real LM's.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def save_teacher(directory: Path, *, vocab_size: int = 384, seed: int = 0, bos: bool = False, **model_kwargs) -> Path:
    """Write tokenizer + model with `save_pretrained` into ``directory`` and return it (``bos``: a tokenizer that
    adds a BOS, see :func:`train_tokenizer`)."""
    tok = train_tokenizer(vocab_size, seed=seed, bos=bos)
    model = make_model(len(tok), seed=seed, **model_kwargs)
    if bos:
        model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def write_student_config(path: Path, vocab_size: int) -> Path:
    """The config JSON of the smallest student the run tests train (random init, 1 layer, context 64)."""
    path.write_text(make_model(vocab_size, hidden=16, layers=1, heads=2, max_pos=64).config.to_json_string())
    return path
