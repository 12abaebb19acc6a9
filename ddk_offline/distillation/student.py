"""Build the student: an existing checkpoint, a config (random init), or a smaller model derived from the teacher.

Derive rules (`derive_student`, spec ``layers=8,hidden=384[,heads=,kv_heads=,intermediate=]`` or ``drop=12-19``):

- The student has the teacher's architecture and config, with the given sizes changed; every size must be <= the
  teacher's (derive makes a smaller model; for anything else pass a config JSON).
- Layers: ``layers=n`` keeps n evenly spaced teacher layers, always the first and the last
  (index round(j * (L - 1) / (n - 1)) for j = 0..n-1; n = 1 keeps layer 0). First and last are kept because they
  adapt the embeddings and the head; the middle ones are the most redundant. Per-layer config lists
  (``layer_types``) are subset the same way.
- Or ``drop=a-b``: remove the contiguous block of teacher layers a..b (0-based, inclusive) and keep every other
  layer in order (``layers`` is then implied; the two keys are exclusive). Measured on SmolLM2-135M (30 layers,
  `pipelines/derive_scan.py`, docs/results/derive_scan.md): which layers go matters far more than how many. With no
  training, 24 evenly spaced layers give a mean per-domain PPL ratio of ~45 to the teacher, ``drop=13-18`` (also
  24 layers) ~2.4, a block ending at layer 28 or 29 ~10^5-10^7: a pretrained model tolerates losing a block of its
  middle-to-late layers, not every n-th layer and not its last ones.
- Width: the student keeps the FIRST ``hidden`` residual dimensions (embeddings, norms, every projection's hidden
  side), the first ``intermediate`` MLP units, and the first query and key/value heads. Any index set works if it is
  the same in every layer (the residual stream stays consistent); the first one needs no calibration data (an
  importance-ranked choice, as in Minitron, would start better but needs activations). The head dimension is never
  sliced: RoPE rotates pairs (j, j + head_dim / 2) inside a head and the attention scale depends on it, so narrowing
  drops whole heads instead. Defaults: ``heads`` scales with ``hidden`` (heads_T * hidden / hidden_T, must be an
  integer) and ``kv_heads`` keeps the teacher's group size, so each kept query head keeps its own key/value head;
  choosing another group size is valid but regroups the kept query heads (a rougher start).
- Tied input/output embeddings stay tied (both are sliced the same way). Width changes are refused for fused
  projections (``qkv_proj``, ``c_attn``, ``gate_up_proj``...), where prefix slicing would mix q, k and v rows; a
  layers-only derive works for any architecture whose blocks are numbered ``.layers.i.``/``.h.i.``/``.blocks.i.``.
- Parameters without a same-named teacher parameter of at least the student's shape keep their random init; they are
  listed in a warning and in ``config.ddk_derived["random_init"]``.

Vocabulary (`check_vocab`): the student must have exactly the teacher's logit dimension (model embedding matrices may
be padded beyond the tokenizer, e.g. Qwen's 151936 rows for 151665 tokens; top-k ids, the teacher's logsumexp and
its tail mass all refer to that dimension), and at least as many rows as the tokenizer has tokens.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ddk_offline.runtime.quiet import quiet_loading

logger = logging.getLogger(__name__)

# spec key -> config attribute (transformers' attribute_map resolves the aliases of e.g. GPT-2 for the first four).
DERIVE_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
}
_FUSED_NAMES = ("qkv_proj", "c_attn", "gate_up_proj", "query_key_value", "W_pack", "Wqkv")
_LAYER_RE = re.compile(r"^(.*?\.(?:layers|h|blocks|block)\.)(\d+)(\..*)$")


class StudentMismatchError(ValueError):
    """The student cannot be trained or evaluated on the dump; the message says what differs and the fix."""


class VocabMismatchError(StudentMismatchError):
    """The student cannot be trained on the dump: its vocabulary differs from the teacher's."""


def parse_derive_spec(spec: str) -> dict[str, Any]:
    """Parse ``layers=8,hidden=384`` into ``{"layers": 8, "hidden": 384}`` (every value a positive integer), and
    ``drop=a-b`` (or ``drop=a``) into ``{"drop": (a, b)}`` (0-based teacher layers, inclusive; exclusive with
    ``layers``)."""
    out: dict[str, Any] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or key not in (*DERIVE_KEYS, "drop"):
            raise ValueError(
                f"derive spec {spec!r}: bad item {part!r}; use KEY=INT with KEY in {sorted(DERIVE_KEYS)}, or drop=A-B"
            )
        if key in out:
            raise ValueError(f"derive spec {spec!r}: {key!r} given twice")
        if key == "drop":
            a, dash, b = value.partition("-")
            b = b if dash else a
            if not (a.isdigit() and b.isdigit()) or int(a) > int(b):
                raise ValueError(
                    f"derive spec {spec!r}: drop={value!r} must be A-B with 0 <= A <= B (teacher layers, 0-based, "
                    "inclusive), e.g. drop=12-19"
                )
            out[key] = (int(a), int(b))
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"derive spec {spec!r}: {key}={value!r} must be a positive integer")
        out[key] = int(value)
    if not out:
        raise ValueError(f"derive spec {spec!r} is empty; e.g. 'layers=8,hidden=384'")
    if "drop" in out and "layers" in out:
        raise ValueError(f"derive spec {spec!r}: give layers= or drop=, not both (drop= implies the layer count)")
    return out


def dropped_block_layers(n_teacher: int, first: int, last: int) -> list[int]:
    """Teacher layer indices kept when the block ``first..last`` (inclusive) is removed."""
    if last >= n_teacher:
        raise ValueError(f"drop={first}-{last}: the teacher has layers 0..{n_teacher - 1}")
    if last - first + 1 >= n_teacher:
        raise ValueError(f"drop={first}-{last} removes all {n_teacher} teacher layers; keep at least one")
    return [i for i in range(n_teacher) if not first <= i <= last]


def select_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layer indices, first and last kept: round(j * (L - 1) / (n - 1))."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"layers={n_student} must be between 1 and the teacher's {n_teacher}")
    if n_student == 1:
        return [0]
    return [int((j * (n_teacher - 1)) / (n_student - 1) + 0.5) for j in range(n_student)]


def _load_pretrained(source: str | Path, *, trust_remote_code: bool, dtype: Any = None):
    """`from_pretrained` of an HF directory, a hub name, or a ``.gguf`` file (dequantised by transformers)."""
    from transformers import AutoModelForCausalLM

    path = Path(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found; pass an existing .gguf file")
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        # The weights are dequantised on load; transformers still marks the model as GGUF-quantised, which refuses
        # save_pretrained (the final model) and .float(). Drop the marker: it is a plain model now.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        return model
    looks_local = path.is_absolute() or str(source).startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"student/teacher checkpoint {path} not found; pass a save_pretrained directory, a .gguf file or a hub name"
        )
    with quiet_loading():
        return AutoModelForCausalLM.from_pretrained(str(source), **kwargs)


def _cfg_get(cfg: Any, key: str) -> int | None:
    value = getattr(cfg, DERIVE_KEYS[key], None)
    return int(value) if isinstance(value, int) else None


def _resolve_sizes(cfg: Any, want: dict[str, int], spec: str) -> dict[str, int]:
    """Teacher sizes overridden by ``want``, with heads / kv_heads defaults and validity checks."""
    teacher = {k: _cfg_get(cfg, k) for k in DERIVE_KEYS}
    if teacher["kv_heads"] is None and teacher["heads"] is not None:
        teacher["kv_heads"] = teacher["heads"]  # no GQA field: multi-head attention
    for key, value in want.items():
        if teacher[key] is None:
            raise ValueError(f"derive spec {spec!r}: the teacher config ({cfg.model_type}) has no {DERIVE_KEYS[key]}")
        if value > teacher[key]:
            raise ValueError(
                f"derive spec {spec!r}: {key}={value} exceeds the teacher's {teacher[key]}; derive only shrinks, "
                "pass a config JSON for a larger student"
            )
    sizes = {**teacher, **want}
    if "hidden" in want and "heads" not in want:
        heads, rem = divmod(teacher["heads"] * want["hidden"], teacher["hidden"])
        if rem or heads < 1:
            raise ValueError(
                f"derive spec {spec!r}: hidden={want['hidden']} gives {teacher['heads']}*{want['hidden']}/"
                f"{teacher['hidden']} heads, not an integer; pass heads= explicitly"
            )
        sizes["heads"] = heads
    if "kv_heads" not in want and sizes["heads"] != teacher["heads"]:
        group = teacher["heads"] // teacher["kv_heads"]
        if sizes["heads"] % group:
            raise ValueError(
                f"derive spec {spec!r}: {sizes['heads']} heads are not a multiple of the teacher's group size {group} "
                "(heads per kv head); pass kv_heads= explicitly"
            )
        sizes["kv_heads"] = sizes["heads"] // group
    if sizes["heads"] % sizes["kv_heads"]:
        raise ValueError(f"derive spec {spec!r}: heads={sizes['heads']} must be a multiple of kv_heads")
    head_dim = getattr(cfg, "head_dim", None) or teacher["hidden"] // teacher["heads"]
    if not isinstance(getattr(cfg, "head_dim", None), int) and sizes["hidden"] != sizes["heads"] * head_dim:
        # This architecture derives head_dim = hidden / heads; we never slice inside a head (see module docstring).
        raise ValueError(
            f"derive spec {spec!r}: {cfg.model_type} uses head_dim = hidden / heads; keep it at the teacher's "
            f"{head_dim} (hidden = heads * {head_dim})"
        )
    return sizes


def derive_student(teacher: Any, spec: str, *, trust_remote_code: bool = False, dtype: Any = None) -> torch.nn.Module:
    """A smaller model of the teacher's architecture, initialised from the teacher where shapes allow.

    Args:
        teacher: a loaded `PreTrainedModel`, or a path / hub name / ``.gguf`` file to load it from.
        spec: ``layers=8,hidden=384`` (keys: layers, hidden, heads, kv_heads, intermediate) or ``drop=12-19`` (a
            contiguous block of teacher layers removed); see the module docstring.
        trust_remote_code: passed to transformers (off unless asked).
        dtype: the student's dtype; default the teacher's.

    Returns:
        The student model (eval mode off, i.e. ready to train), with ``config.ddk_derived`` recording the teacher,
        the spec, the kept layers and any parameters left at random init.
    """
    from transformers import AutoModelForCausalLM

    want = parse_derive_spec(spec)
    drop = want.pop("drop", None)
    source = None
    if isinstance(teacher, (str, Path)):
        source = str(teacher)
        teacher = _load_pretrained(teacher, trust_remote_code=trust_remote_code)
    cfg = copy.deepcopy(teacher.config)
    if drop is not None:
        if _cfg_get(cfg, "layers") is None:
            raise ValueError(f"derive spec {spec!r}: the teacher config ({cfg.model_type}) has no num_hidden_layers")
        kept = dropped_block_layers(_cfg_get(cfg, "layers"), *drop)
        want["layers"] = len(kept)
    sizes = _resolve_sizes(cfg, want, spec)
    t_sd = teacher.state_dict()
    if any(sizes[k] != _cfg_get(cfg, k) for k in ("hidden", "heads", "kv_heads", "intermediate") if _cfg_get(cfg, k)):
        fused = sorted({f for name in t_sd for f in _FUSED_NAMES if f in name})
        if fused:
            raise ValueError(
                f"derive spec {spec!r}: width changes are not supported for fused projections {fused} "
                f"({cfg.model_type}); derive with layers= only, or pass a config JSON"
            )
    if drop is None:
        kept = select_layers(_cfg_get(cfg, "layers"), sizes["layers"])
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    for key, value in sizes.items():
        if value is not None and _cfg_get(cfg, key) is not None:
            setattr(cfg, DERIVE_KEYS[key], value)

    student = AutoModelForCausalLM.from_config(
        cfg, trust_remote_code=trust_remote_code, dtype=dtype or next(teacher.parameters()).dtype
    )
    random_init = []
    with torch.no_grad():
        for name, param in student.state_dict().items():
            m = _LAYER_RE.match(name)
            t_name = f"{m.group(1)}{kept[int(m.group(2))]}{m.group(3)}" if m else name
            src = t_sd.get(t_name)
            if (
                src is None
                or src.dim() != param.dim()
                or any(s > t for s, t in zip(param.shape, src.shape, strict=True))
            ):
                random_init.append(name)
                continue
            param.copy_(src[tuple(slice(0, s) for s in param.shape)])
    student.tie_weights()
    if random_init:
        logger.warning("derive_student(%s): left at random init: %s", spec, ", ".join(random_init))
    teacher_name = source or teacher.config.name_or_path
    student.config.ddk_derived = {"teacher": teacher_name, "spec": spec, "layers": kept, "random_init": random_init}
    return student.train()


def load_student(
    *,
    pretrained: str | Path | None = None,
    config: str | Path | None = None,
    derive: str | None = None,
    teacher: Any = None,
    trust_remote_code: bool = False,
    dtype: Any = None,
    seed: int | None = None,
) -> torch.nn.Module:
    """Build the student from exactly one source.

    Args:
        pretrained: an HF directory, a hub name, or a ``.gguf`` file (``from_pretrained(dir, gguf_file=name)``).
        config: a transformers config JSON (or a directory holding ``config.json``); the model is randomly initialised.
        derive: a derive spec (``layers=8,hidden=384``); needs ``teacher`` (a model or a path).
        teacher: the teacher for ``derive``.
        trust_remote_code: off unless asked.
        dtype: torch dtype of the student (default: the checkpoint's / teacher's / fp32).
        seed: seeds the random init of ``config`` students (without touching the global RNG state).
    """
    given = [k for k, v in (("pretrained", pretrained), ("config", config), ("derive", derive)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"load_student: pass exactly one of pretrained=, config=, derive= (got {given or 'none'})")
    if derive is not None:
        if teacher is None:
            raise ValueError("load_student: derive= needs teacher= (the teacher model or its path)")
        return derive_student(teacher, derive, trust_remote_code=trust_remote_code, dtype=dtype)
    if pretrained is not None:
        return _load_pretrained(pretrained, trust_remote_code=trust_remote_code, dtype=dtype).train()

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config)
    if not path.exists():
        raise FileNotFoundError(f"student config {path} not found; pass a transformers config.json (or its folder)")
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.train()


def check_vocab(
    student: torch.nn.Module, tokenizer_vocab_size: int, dump_path: str | Path, teacher_vocab_size: int | None = None
) -> None:
    """Refuse a student whose vocabulary does not fit the dump.

    Args:
        student: the student model.
        tokenizer_vocab_size: ``len(tokenizer)`` of the dump's tokenizer (added tokens included).
        dump_path: the dump, named in the message.
        teacher_vocab_size: the teacher's logit dimension as recorded in the dump (rows of its output matrix, which
            may be padded beyond the tokenizer). When given, the student's rows must equal it.

    Raises:
        VocabMismatchError: with what differs, where, and the fix.
    """
    rows = student.get_input_embeddings().weight.shape[0]
    out = student.get_output_embeddings()
    out_rows = out.weight.shape[0] if out is not None else rows
    expected = teacher_vocab_size if teacher_vocab_size is not None else tokenizer_vocab_size
    problems = []
    if out_rows != rows:
        problems.append(f"its input embeddings have {rows} rows but its output layer has {out_rows}")
    if rows < tokenizer_vocab_size:
        problems.append(f"it has {rows} embedding rows, fewer than the dump tokenizer's {tokenizer_vocab_size} tokens")
    if teacher_vocab_size is not None and rows != teacher_vocab_size:
        problems.append(f"it has {rows} embedding rows but the teacher's logits in the dump have {teacher_vocab_size}")
    if problems:
        raise VocabMismatchError(
            f"Student vocabulary does not match the teacher dump {dump_path}: " + "; ".join(problems) + ". "
            f"Fix: derive the student from the teacher (a derive spec such as 'layers=8'), or pass a student "
            f"config with vocab_size={expected} (and train with the dump's tokenizer); a student with its own "
            "tokenizer trains with --cross-tokenizer exact-map|uld|dskd."
        )


def check_fits(student: torch.nn.Module, manifest: Any, dump_path: str | Path) -> None:
    """Refuse a student that cannot read the dump's rows: its vocabulary (:func:`check_vocab`) and its context.

    Args:
        student: the model.
        manifest: the dump's :class:`~ddk_offline.format.manifest.Manifest`.
        dump_path: the dump, named in the message.

    Raises:
        StudentMismatchError: what differs, and the fix.
    """
    check_vocab(student, manifest.tokenizer_tokens, dump_path, manifest.vocab_size)
    max_pos = getattr(student.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos < manifest.seq_len:
        raise StudentMismatchError(
            f"the student's max_position_embeddings is {max_pos} but the dump's sequences have {manifest.seq_len} "
            "tokens; use a student config with max_position_embeddings >= seq_len"
        )
