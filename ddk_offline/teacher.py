"""Load a teacher (local folder, Hub name or ``.gguf`` file) and its tokenizer; identity hashes; per-position targets.

Identity (recorded in the manifest, compared on resume):

- teacher: the name/path as given, the architecture, ``config_sha256`` (the canonical JSON of the config without
  volatile keys such as ``transformers_version``) and ``weights_sha256`` (sha256 over the bytes of every weight
  file, streamed in 4 MiB blocks). Streaming the files costs one sequential read of the weights per run (seconds
  for a 1B model, minutes for a 70B one): negligible next to the dump, and unlike a hash of the loaded state dict it
  does not depend on the dtype or device the model is loaded to.
- tokenizer: ``vocab_size`` (the teacher's logit width V, the range of the stored top-k ids), ``tokens``
  (``len(tokenizer)``), ``vocab_sha256`` (the sorted token -> id map) and the EOS token that separates documents.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk_offline.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash"}


class TeacherError(UserError):
    """The teacher or its tokenizer cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher lives: a local folder (optionally with a GGUF file in it) or a Hub name."""

    name: str
    location: str
    gguf_file: str | None = None
    local: bool = True

    def kwargs(self, trust_remote_code: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def resolve_teacher(teacher: str, gguf_file: str | None = None) -> TeacherSource:
    """Resolve ``--teacher`` (+ ``--gguf-file``) to a :class:`TeacherSource` without loading anything."""
    path = Path(teacher).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TeacherError(f"--teacher {teacher}: a file must be a .gguf; otherwise pass the model's folder")
        return TeacherSource(teacher, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise TeacherError(f"--gguf-file {gguf_file}: no such file in {path}; check the name")
        return TeacherSource(teacher, str(path.resolve()), gguf_file)
    if path.exists() or teacher.startswith((".", "/", "~")) or teacher.count("/") > 1:
        raise TeacherError(f"--teacher {teacher}: no such file or folder; check the path")
    return TeacherSource(teacher, teacher, gguf_file, local=False)


def _local_dir(source: TeacherSource) -> Path:
    """A local folder holding the teacher's files (a Hub model is fetched into the Hub cache if allowed)."""
    if source.local:
        return Path(source.location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.location))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all mean "cannot use this name"
        raise TeacherError(
            f"--teacher {source.name}: not a local path and not fetchable from the Hub ({type(e).__name__}: {e}); "
            "pass a local folder or .gguf file"
        ) from None


def _load_error(source: TeacherSource, what: str, exc: Exception) -> TeacherError:
    if "trust_remote_code" in str(exc):
        # transformers refuses (rightly) to import a model's own Python code; name our flag, not its argument.
        return TeacherError(
            f"--teacher {source.name}: the model ships its own Python code (auto_map in its config), which is not "
            "run by default; read that code, and pass --trust-remote-code only if you trust it"
        )
    return TeacherError(f"--teacher {source.name}: {what} ({exc})")


def load_config(source: TeacherSource, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_local_dir(source), **source.kwargs(trust_remote_code))
    except (OSError, ValueError) as e:
        raise _load_error(source, "cannot read the model config", e) from None


def load_tokenizer(source: TeacherSource, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(_local_dir(source), **source.kwargs(trust_remote_code))
    except (OSError, ValueError) as e:
        raise _load_error(source, "cannot load its tokenizer", e) from None
    if not set(tok.get_vocab()) - set(tok.all_special_tokens):
        # transformers builds an empty tokenizer from config.json alone when the folder has no tokenizer files;
        # every document would then tokenise to nothing and the dump would hold only EOS tokens.
        raise TeacherError(
            f"--teacher {source.name}: the tokenizer has no tokens besides special ones (no tokenizer files in the "
            "model folder?); save the teacher's tokenizer there with tokenizer.save_pretrained(folder)"
        )
    if tok.eos_token_id is None:
        raise TeacherError(
            f"--teacher {source.name}: the tokenizer has no EOS token, needed to separate packed documents; "
            "set `eos_token` in its tokenizer_config.json"
        )
    return tok


def load_model(source: TeacherSource, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """The teacher in eval mode on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            _local_dir(source), dtype=dtype, **source.kwargs(trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise _load_error(source, "cannot load it as a causal LM", e) from None
    return model.to(device).eval()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TeacherError(f"--device {device!r}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; else float32 | bfloat16 | float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise TeacherError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def vocab_size_of(config) -> int:
    """The teacher's logit width V."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def max_positions_of(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def teacher_identity(source: TeacherSource, config) -> dict[str, Any]:
    """Name, architecture, config hash and weight-file hash (see the module docstring for the cost)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    folder = _local_dir(source)
    if source.gguf_file:
        files = [folder / source.gguf_file]
    else:
        found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        safetensors = [p for p in found if p.suffix == ".safetensors"]
        files = safetensors or found
        if not files:
            raise TeacherError(f"--teacher {source.name}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
    return {
        "name": source.name,
        "gguf_file": source.gguf_file,
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "config_sha256": _sha256_json(cfg),
        "weights_sha256": h.hexdigest(),
        "weight_files": [p.name for p in files],
    }


def tokenizer_identity(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Vocab size (logit width), tokenizer length, vocab hash and EOS token."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "vocab_size": vocab_size,
        "tokens": len(tokenizer),
        "vocab_sha256": _sha256_json(vocab),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": int(tokenizer.eos_token_id),
        "class": type(tokenizer).__name__,
    }


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class Targets:
    """The teacher's stored outputs for a batch of B sequences of L tokens (numpy, on the host).

    Attributes:
        topk_ids: [B, L, K] int64, ids of the K largest logits, descending.
        topk_logits: [B, L, K] float32 raw logits at those ids (T = 1).
        lse: [B, L] float32 logsumexp of the full logit row.
        nll: [B, L] float32 loss on the next token ``input_ids[:, n + 1]``; NaN at n = L - 1.
        extra_lse: {T: [B, L] float32 logsumexp(logits / T)}.
        forward_s: seconds spent in the model's forward (device-synchronised).
    """

    topk_ids: np.ndarray
    topk_logits: np.ndarray
    lse: np.ndarray
    nll: np.ndarray
    extra_lse: dict[float, np.ndarray] = field(default_factory=dict)
    forward_s: float = 0.0


@torch.inference_mode()
def compute_targets(
    model, input_ids: torch.Tensor, *, k: int, extra_temperatures: tuple[float, ...] = (), chunk_elements: int = 1 << 24
) -> Targets:
    """Run the teacher on ``input_ids`` [B, L] and reduce its logits [B, L, V] to the stored targets.

    The fp32 upcast, logsumexp and top-k run over ``chunk_elements // V`` rows at a time, so the extra memory
    beyond the model's own logits is bounded (64 MiB of fp32 per chunk by default) whatever B, L and V are.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    forward_s = time.perf_counter() - start
    B, L, V = logits.shape
    flat = logits.reshape(B * L, V)
    labels = torch.full((B, L), -1, dtype=torch.long, device=device)
    labels[:, :-1] = ids[:, 1:]
    labels = labels.reshape(-1)
    N = B * L
    out_ids = torch.empty((N, k), dtype=torch.long, device=device)
    out_vals = torch.empty((N, k), dtype=torch.float32, device=device)
    lse = torch.empty(N, dtype=torch.float32, device=device)
    nll = torch.empty(N, dtype=torch.float32, device=device)
    extra = {t: torch.empty(N, dtype=torch.float32, device=device) for t in extra_temperatures}
    rows = max(1, chunk_elements // V)
    for s in range(0, N, rows):
        x = flat[s : s + rows].float()
        lse[s : s + rows] = row_lse = torch.logsumexp(x, dim=-1)
        out_vals[s : s + rows], out_ids[s : s + rows] = torch.topk(x, k, dim=-1, sorted=True)
        lab = labels[s : s + rows]
        picked = x.gather(1, lab.clamp_min(0)[:, None])[:, 0]
        nll[s : s + rows] = torch.where(lab >= 0, row_lse - picked, torch.full_like(picked, float("nan")))
        for t in extra_temperatures:
            extra[t][s : s + rows] = torch.logsumexp(x / t, dim=-1)
    host = lambda t: t.cpu().numpy()
    return Targets(
        topk_ids=host(out_ids).reshape(B, L, k),
        topk_logits=host(out_vals).reshape(B, L, k),
        lse=host(lse).reshape(B, L),
        nll=host(nll).reshape(B, L),
        extra_lse={t: host(v).reshape(B, L) for t, v in extra.items()},
        forward_s=forward_s,
    )
