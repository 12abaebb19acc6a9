"""Interim top-k codec (replaced by the compressed codec): ids int32 + log-probs fp16, zstd."""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

import numpy as np
import zstandard

_MAGIC = b"TK0\x01"


@dataclass(frozen=True)
class CodecConfig:
    name: str = "fp16-zstd"
    version: int = 1
    level: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        return cls(**d)


class TopKCodec:
    def __init__(self, config: CodecConfig | None = None, *, vocab_size: int, k: int):
        self.config = config or CodecConfig()
        self.vocab_size, self.k = vocab_size, k

    def encode(self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray) -> bytes:
        order = np.argsort(-logits, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1).astype(np.int32)
        logp = (np.take_along_axis(logits, order, 1) - lse[:, None]).astype(np.float16)
        body = zstandard.ZstdCompressor(level=self.config.level).compress(ids.tobytes() + logp.tobytes())
        return _MAGIC + struct.pack("<II", *ids.shape) + body

    def decode(self, blob: bytes, lse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if blob[:4] != _MAGIC:
            raise ValueError("top-k blob: bad magic (corrupted shard?)")
        L, k = struct.unpack("<II", blob[4:12])
        raw = zstandard.ZstdDecompressor().decompress(blob[12:], max_output_size=L * k * 6)
        ids = np.frombuffer(raw[: L * k * 4], np.int32).reshape(L, k).astype(np.int64)
        logp = np.frombuffer(raw[L * k * 4 :], np.float16).reshape(L, k).astype(np.float32)
        return ids, logp + lse[:, None].astype(np.float32)

    def describe(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_description(cls, d: dict, *, vocab_size: int, k: int) -> TopKCodec:
        return cls(CodecConfig.from_dict(d), vocab_size=vocab_size, k=k)
