"""The ``hf`` teacher backend: any ``transformers`` causal LM from a local folder, a Hub name or a ``.gguf`` file.

Identity (recorded in the manifest, compared on resume):

- teacher: the name/path as given, the architecture, ``config_sha256`` (the canonical JSON of the config without
  volatile keys such as ``transformers_version``) and ``weights_sha256`` (sha256 over the bytes of every weight
  file, streamed in 4 MiB blocks). Streaming the files costs one sequential read of the weights per run (seconds
  for a 1B model, minutes for a 70B one): negligible next to the dump, and unlike a hash of the loaded state dict it
  does not depend on the dtype or device the model is loaded to.
- tokenizer: see :func:`ddk_offline.dump.teachers.base.tokenizer_identity`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddk_offline.dump.teachers.base import Targets, reduce_logits, sha256_json
from ddk_offline.errors import UserError
from ddk_offline.format.teacher_matrices import TeacherMatrices
from ddk_offline.runtime.files import hash_stream
from ddk_offline.runtime.quiet import quiet_loading

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
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                _local_dir(source), dtype=dtype, **source.kwargs(trust_remote_code)
            )
    except (OSError, ValueError) as e:
        raise _load_error(source, "cannot load it as a causal LM", e) from None
    return model.to(device).eval()


def text_config_of(config):
    """The language model's config (a multimodal config's text part; the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_size_of(config) -> int:
    """The teacher's logit width V."""
    return int(text_config_of(config).vocab_size)


def max_positions_of(config) -> int | None:
    value = getattr(text_config_of(config), "max_position_embeddings", None)
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
            hash_stream(h, f)
    return {
        "name": source.name,
        "gguf_file": source.gguf_file,
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "config_sha256": sha256_json(cfg),
        "weights_sha256": h.hexdigest(),
        "weight_files": [p.name for p in files],
    }


class HFTeacher:
    """The ``hf`` backend (see :class:`~ddk_offline.dump.teachers.base.TeacherBackend`).

    Args:
        teacher: ``--teacher``: a local folder, a ``.gguf`` file, or a Hub name.
        gguf_file: the GGUF file inside ``teacher`` when it is a folder.
        trust_remote_code: allow the model's own Python code (off unless the user turns it on).
    """

    backend = "hf"

    def __init__(self, teacher: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
        self.source = resolve_teacher(teacher, gguf_file)
        self.name = self.source.name
        self.trust_remote_code = trust_remote_code
        self._config = None
        self._tokenizer = None
        self.model = None

    @property
    def config(self):
        if self._config is None:
            self._config = load_config(self.source, trust_remote_code=self.trust_remote_code)
        return self._config

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def vocab_size(self) -> int:
        return vocab_size_of(self.config)

    def max_positions(self) -> int | None:
        return max_positions_of(self.config)

    def identity(self) -> dict[str, Any]:
        return {**teacher_identity(self.source, self.config), "backend": self.backend}

    def load(self, *, device: torch.device, dtype: torch.dtype) -> None:
        self.model = load_model(self.source, dtype=dtype, device=device, trust_remote_code=self.trust_remote_code)

    def hidden_size(self) -> int:
        return int(text_config_of(self.config).hidden_size)

    @torch.inference_mode()
    def targets(
        self, input_ids: torch.Tensor, *, k: int, extra_temperatures: tuple[float, ...] = (), hidden: bool = False
    ) -> Targets:
        return compute_targets(self.model, input_ids, k=k, extra_temperatures=extra_temperatures, hidden=hidden)

    def matrices(self) -> TeacherMatrices:
        return model_matrices(self.model, softcap=getattr(text_config_of(self.config), "final_logit_softcapping", None))


@torch.inference_mode()
def compute_targets(
    model, input_ids: torch.Tensor, *, k: int, extra_temperatures: tuple[float, ...] = (), hidden: bool = False
) -> Targets:
    """Run a loaded ``transformers`` model on ``input_ids`` [B, L] and reduce its logits (timing the forward).

    With ``hidden``, ``Targets.hidden`` [B, L, D] float32 is ``outputs.hidden_states[-1]``: what DSKD's reference
    code reads, and for Llama/Gemma-style models the state after the final norm (the one the head multiplies).
    """
    device = next(model.parameters()).device
    start = time.perf_counter()
    out = model(input_ids=input_ids.to(device), use_cache=False, output_hidden_states=hidden)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    forward_s = time.perf_counter() - start
    targets = reduce_logits(out.logits, input_ids, k=k, extra_temperatures=extra_temperatures)
    targets.forward_s = forward_s
    if hidden:
        targets.hidden = out.hidden_states[-1].float().cpu().numpy()
    return targets


@torch.inference_mode()
def model_matrices(model, *, softcap: float | None = None, chunk: int = 16384) -> TeacherMatrices:
    """The embedding module's output for every id (in chunks of ``chunk`` ids), the head and its bias, in float32."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or emb is None:
        raise TeacherError(
            f"the teacher ({type(model).__name__}) has no input embedding and linear output head that DSKD can use"
        )
    device = emb.weight.device
    n = int(emb.num_embeddings)
    ids = torch.arange(n, device=device)
    embed = torch.cat([emb(ids[s : s + chunk]).float().cpu() for s in range(0, n, chunk)])
    bias = getattr(head, "bias", None)
    scale = getattr(emb, "embed_scale", None)  # Gemma's scaled embedding module keeps its sqrt(D) here
    return TeacherMatrices(
        embed=embed,
        head=head.weight.detach().float().cpu(),
        head_bias=None if bias is None else bias.detach().float().cpu(),
        tied=head.weight.data_ptr() == emb.weight.data_ptr(),
        softcap=None if softcap is None else float(softcap),
        dtype="float32",
        embed_scale=None if scale is None else float(scale),
    )
