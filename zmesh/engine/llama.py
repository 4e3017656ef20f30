"""The model and the llama.cpp context: loading, tokens, text pieces, chat templates.

`LlamaBase` owns llama.cpp's handles; the slot pool and the stepper build on it.
Everything here that reads only the vocabulary or the model's metadata is thread-safe.
Once freed (`Engine.close`), the handles point at freed C memory: every use of the
context goes through `_live` and every public read of the model through `_model_use`,
so a late call raises `closed_error` instead of crashing the process.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import llama_cpp as ll

from zmesh.config import EngineConfig
from zmesh.engine.types import MIN_SLOT_CTX, EngineError, closed_error
from zmesh.model import model_fingerprint, resolve_model_path
from zmesh.protocol import INVALID_REQUEST, PROMPT_TOO_LONG

_log_callback_ref = None


def _silence_llama_logs() -> None:
    """llama.cpp logs every tensor at load; keep stderr for real errors only."""
    global _log_callback_ref
    if _log_callback_ref is not None:
        return

    @ll.llama_log_callback
    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            os.write(2, text)

    _log_callback_ref = _cb
    ll.llama_log_set(_cb, ctypes.c_void_p(0))


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


class LlamaBase:
    """One model and one context with ``n_slots`` sequences plus a scratch one."""

    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        if cfg.slot_ctx < MIN_SLOT_CTX:
            raise ValueError(f"slot_ctx must be >= {MIN_SLOT_CTX}")
        self.config = cfg
        self.model_path: Path = resolve_model_path(cfg.model_path)
        self.fingerprint = model_fingerprint(self.model_path)
        self.n_slots = cfg.n_slots
        self.slot_ctx = cfg.slot_ctx
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or cfg.slot_ctx, cfg.slot_ctx - 1)
        self.max_prompt_chars = self.max_prompt_tokens * cfg.prompt_chars_per_token
        # One step holds a token for every decoding slot plus a prefill chunk.
        self.n_batch = max(cfg.n_batch, cfg.n_slots + 1)
        # Held by whoever touches llama.cpp's context (a whole step, an export...) and
        # by `_free_llama`: see `_live`.
        self._llama = threading.RLock()
        self._load(cfg)

    def _load(self, cfg: EngineConfig) -> None:
        _silence_llama_logs()
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = cfg.n_gpu_layers
        # llama.cpp's AMX matmul (an "extra" CPU buffer type) dies with SIGSEGV on
        # this project's AMX machines (sandboxed Sapphire Rapids): keep weights in
        # plain CPU buffers there. Elsewhere the extra types (CPU repack) stay on.
        mparams.use_extra_bufts = not _cpu_has_amx()
        self._model = ll.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise EngineError("internal", f"llama.cpp could not load {self.model_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        threads = cfg.n_threads or os.cpu_count() or 1
        cparams = ll.llama_context_default_params()
        # Slots never exceed slot_ctx tokens each, so n_slots * slot_ctx cells always
        # suffice, even with no sharing at all.
        cparams.n_ctx = cfg.n_slots * cfg.slot_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(self.n_batch, 512)
        # One sequence per slot, plus a scratch one that exports a slot's prefix.
        cparams.n_seq_max = cfg.n_slots + 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one cell pool: seq_cp shares cells between slots
        cparams.swa_full = True  # Gemma 3's sliding window would lose cells on rollback
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise EngineError("internal", "llama.cpp could not create a context")
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        # llama.cpp exports a sequence's state without the cells its sliding-window
        # layers no longer attend to (older than n_swa positions before its last), so a
        # longer prefix would arrive without its oldest cells: ship at most n_swa tokens.
        n_swa = int(ll.llama_model_n_swa(self._model))
        self.max_ship_tokens = (
            min(n_swa, self.max_prompt_tokens) if n_swa > 0 else self.max_prompt_tokens
        )

    def _free_llama(self) -> None:
        with self._llama:  # waits for a call holding the context (`_live`) to leave
            if getattr(self, "_ctx", None):
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx)
                ll.llama_model_free(self._model)
                self._ctx = None

    @contextmanager
    def _live(self) -> Iterator[None]:
        """Hold llama.cpp's lock on a context not freed: raises `closed_error` once
        `_free_llama` ran (any thread; a free waits for the holder to leave)."""
        with self._llama:
            if not getattr(self, "_ctx", None):
                raise closed_error()
            yield

    def _model_use(self) -> AbstractContextManager[None]:
        """Held around a public read of the model or vocabulary (which `_free_llama`
        frees) off the engine thread; `Engine` makes a close wait for it and refuses
        it once closed."""
        return nullcontext()

    # ---- tokens ------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EngineError(INVALID_REQUEST, f"prompt is not valid UTF-8: {exc.reason}") from exc
        with self._model_use():
            return self._tokenize(data)

    def _tokenize(self, data: bytes) -> list[int]:
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, self._add_bos, True)
        if n < 0:  # buffer too small: -n tokens needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, self._add_bos, True)
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._model_use():
            return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def prompt_tokens(self, prompt: str | bytes | None, tokens: Sequence[int] | None) -> list[int]:
        """Validate and tokenize a request's prompt (text or token ids). Thread-safe (it
        only reads the vocabulary), so the node runs it off its event loop."""
        if (prompt is None) == (tokens is None):
            raise EngineError(INVALID_REQUEST, "give exactly one of prompt or tokens")
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EngineError(INVALID_REQUEST, f"prompt is not valid UTF-8: {exc}") from exc
        if prompt is not None:
            if not prompt:
                raise EngineError(INVALID_REQUEST, "prompt is empty")
            # Before tokenizing: llama.cpp takes seconds per megabyte of text.
            if len(prompt) > self.max_prompt_chars:
                raise EngineError(
                    PROMPT_TOO_LONG,
                    f"prompt has {len(prompt)} characters; this node accepts at most "
                    f"{self.max_prompt_chars} ({self.max_prompt_tokens} tokens)",
                )
            ids = self.tokenize(prompt)
        else:
            ids = list(tokens or [])
            if len(ids) > self.max_prompt_tokens:
                raise EngineError(PROMPT_TOO_LONG, self._too_many_tokens(len(ids)))
            bad = next((t for t in ids if not 0 <= t < self.n_vocab), None)
            if bad is not None:
                raise EngineError(INVALID_REQUEST, f"token id {bad} outside 0..{self.n_vocab - 1}")
        if not ids:
            raise EngineError(INVALID_REQUEST, "prompt has no tokens")
        if len(ids) > self.max_prompt_tokens:
            raise EngineError(PROMPT_TOO_LONG, self._too_many_tokens(len(ids)))
        return ids

    def _too_many_tokens(self, n: int) -> str:
        return f"prompt has {n} tokens; this node accepts at most {self.max_prompt_tokens}"

    def chat_template(self, override: str | None = None) -> bytes:
        """The chat template: ``override`` (a llama.cpp template name such as ``gemma``
        or ``chatml``, or a template), else the GGUF's ``tokenizer.chat_template``, else
        the llama.cpp built-in named after the model's architecture (``gemma3`` ->
        ``gemma``) for GGUFs shipped without one (the packaged model is one)."""
        if override:
            return override.encode()
        with self._model_use():
            tmpl = ll.llama_model_chat_template(self._model, None)
            if tmpl:
                return bytes(tmpl)
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_model_meta_val_str(self._model, b"general.architecture", buf, len(buf))
        return buf.value.rstrip(b"0123456789") if n > 0 else b""

    def chat_prompt(self, messages: Sequence[tuple[str, str]], template: str | None = None) -> str:
        """``(role, content)`` messages as one prompt in the model's chat template
        (llama.cpp's template support; see `chat_template`), ending where the
        assistant's turn begins. Thread-safe: string work only, no model state."""
        tmpl = self.chat_template(template)
        try:
            # The ctypes message array points into these bytes: keep them alive.
            encoded = [(r.encode("utf-8"), c.encode("utf-8")) for r, c in messages]
        except UnicodeEncodeError as exc:
            raise EngineError(INVALID_REQUEST, f"message is not valid UTF-8: {exc.reason}") from exc
        chat = (ll.llama_chat_message * len(encoded))(
            *(ll.llama_chat_message(r, c) for r, c in encoded)
        )
        cap = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = ll.llama_chat_apply_template(tmpl, chat, len(encoded), True, buf, cap)
            if n < 0:
                raise EngineError(
                    INVALID_REQUEST,
                    f"llama.cpp has no chat template {tmpl[:40]!r} for {self.model_path.name}"
                    " (set http.chat_template)",
                )
            if n <= cap:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = n  # the buffer was too small: n bytes are needed
        raise EngineError(INVALID_REQUEST, "chat template output kept growing")  # pragma: no cover
