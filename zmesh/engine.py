"""llama.cpp slot pool with prefix reuse.

One model and one context hold ``n_slots`` sequences (slots) in a unified KV cache.
A request reuses the longest cached prefix of any slot of its namespace: it either
continues in that slot after rolling it back to the shared prefix, or shares the
prefix into another slot with ``llama_memory_seq_cp`` (no copy: cells are tagged
with both sequences). Only the rest of the prompt is prefilled.

Each namespace (tenant) has a radix tree that mirrors exactly what the slots hold;
slots never share cache across namespaces. The tree never claims more than a slot
holds: it is cut back before a slot is overwritten and extended after the work.

One request decodes at a time (``generate`` is not re-entrant); tree queries may
come from other threads (the routing loop), guarded by a lock.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as ll

from zmesh.blocks import DEFAULT_KEY, BlockHasher
from zmesh.config import EngineConfig
from zmesh.kvstate import KvLayout, KvRefused, KvState, make_state, verify
from zmesh.model import model_fingerprint, resolve_model_path
from zmesh.protocol import INVALID_REQUEST, PROMPT_TOO_LONG, SamplingParams
from zmesh.radix import BlockEvents, RadixTree
from zmesh.stats import ewma

MIN_SLOT_CTX = 64
_Sampler = Any  # a ctypes pointer to llama_sampler


class EngineError(Exception):
    """A request the engine cannot serve; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "eog" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    slot: int
    evicted_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(slots=True)
class _Slot:
    seq: int
    namespace: str | None = None
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0


@dataclass(slots=True)
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    prefill_s_per_token: float = 0.0  # EWMA over prefills of a useful size
    service_s: float = 0.0  # EWMA of the whole request time
    decode_s_per_token: float = 0.0  # EWMA
    completion_tokens: float = 0.0  # EWMA: how long answers really are

    def predict_s(
        self, new_prompt_tokens: int, max_tokens: int, default_prefill: float, default_decode: float
    ) -> float:
        """Predicted service time of a request that must prefill ``new_prompt_tokens``."""
        prefill = self.prefill_s_per_token or default_prefill
        decode = self.decode_s_per_token or default_decode
        expect = (
            min(max_tokens, 2 * self.completion_tokens) if self.completion_tokens else max_tokens
        )
        return new_prompt_tokens * prefill + expect * decode


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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


class Engine:
    def __init__(self, config: EngineConfig | None = None, hash_key: bytes = DEFAULT_KEY) -> None:
        self.config = cfg = config or EngineConfig()
        if cfg.n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        if cfg.slot_ctx < MIN_SLOT_CTX:
            raise ValueError(f"slot_ctx must be >= {MIN_SLOT_CTX}")
        self.model_path: Path = resolve_model_path(cfg.model_path)
        self.fingerprint = model_fingerprint(self.model_path)
        self.hash_key = hash_key
        self.block_size = cfg.block_size
        self.n_slots = cfg.n_slots
        self.slot_ctx = cfg.slot_ctx
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or cfg.slot_ctx, cfg.slot_ctx - 1)
        self.max_prompt_chars = self.max_prompt_tokens * cfg.prompt_chars_per_token
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards slots' trees against routing reads
        self._trees: dict[str, RadixTree] = {}
        self._slots = [_Slot(seq=i) for i in range(cfg.n_slots)]
        self._scratch_seq = cfg.n_slots
        # Work other threads hand to the engine thread between two decode steps of the
        # running request (KV exports): the request pauses for it instead of the work
        # waiting for the whole request.
        self._between_lock = threading.Lock()
        self._between: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._serving = 0  # `serving()` depth: > 0 while a request is being served
        self._load(cfg)

    # ---- setup ---------------------------------------------------------------

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
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = min(cfg.n_batch, 512)
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
        self._batch = ll.llama_batch_init(cfg.n_batch, 0, 1)
        self._add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        # llama.cpp exports a sequence's state without the cells its sliding-window
        # layers no longer attend to (older than n_swa positions before its last), so a
        # longer prefix would arrive without its oldest cells: ship at most n_swa tokens.
        n_swa = int(ll.llama_model_n_swa(self._model))
        self.max_ship_tokens = (
            min(n_swa, self.max_prompt_tokens) if n_swa > 0 else self.max_prompt_tokens
        )

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tokens ------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EngineError(INVALID_REQUEST, f"prompt is not valid UTF-8: {exc.reason}") from exc
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

    def detokenize(self, tokens: Sequence[int]) -> str:
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

    # ---- cache view (thread-safe) -----------------------------------------

    def hasher(self, namespace: str) -> BlockHasher:
        with self._lock:  # the routing thread may ask while the engine adds a tree
            return self._tree(namespace).hasher  # type: ignore[return-value]

    def _tree(self, namespace: str) -> RadixTree:
        tree = self._trees.get(namespace)
        if tree is None:
            hasher = BlockHasher(self.fingerprint, namespace, self.block_size, self.hash_key)
            tree = self._trees[namespace] = RadixTree(hasher)
        return tree

    def local_match(self, tokens: Sequence[int], namespace: str) -> int:
        """Tokens of ``tokens`` cached in some slot of ``namespace``."""
        with self._lock:
            tree = self._trees.get(namespace)
            return tree.match(tokens).length if tree else 0

    def drain_events(self) -> BlockEvents:
        """Block ids added/removed across all namespaces since the last drain."""
        out = BlockEvents()
        with self._lock:
            for ns, tree in list(self._trees.items()):
                ev = tree.drain_events()
                out.added.extend(ev.added)
                out.removed.extend(ev.removed)
                if not tree.sequences():  # one tree per tenant seen: drop empty ones
                    del self._trees[ns]
        return out

    def block_ids(self) -> set[int]:
        with self._lock:
            return {b for tree in self._trees.values() for b in tree.block_ids()}

    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.tokens)

    def slot_tokens(self) -> list[tuple[str | None, list[int]]]:
        return [(s.namespace, list(s.tokens)) for s in self._slots]

    def slot_state_bytes(self, slot: int) -> int:
        return int(ll.llama_state_seq_get_size(self._ctx, slot))

    @property
    def kv_layout(self) -> KvLayout:
        """What a shipped KV state must agree with to be imported here."""
        return KvLayout(
            fingerprint=self.fingerprint.hex(),
            llama_version=ll.__version__,
            slot_ctx=self.slot_ctx,
            kv_type="f16",  # llama.cpp's default cell type; zmesh does not change it
            swa_full=True,
        )

    def check_consistency(self) -> list[str]:
        """Differences between llama.cpp's memory, the slots and the trees (empty = ok)."""
        problems = []
        with self._lock:
            for s in self._slots:
                pos_max = ll.llama_memory_seq_pos_max(self._mem, s.seq)
                pos_min = ll.llama_memory_seq_pos_min(self._mem, s.seq)
                if pos_max + 1 != len(s.tokens):
                    problems.append(
                        f"slot {s.seq}: llama.cpp pos_max {pos_max}, slot {len(s.tokens)}"
                    )
                if s.tokens and pos_min != 0:
                    problems.append(f"slot {s.seq}: llama.cpp pos_min {pos_min}")
                if s.tokens and s.namespace not in self._trees:
                    problems.append(f"slot {s.seq}: no tree for namespace {s.namespace}")
                for ns, tree in self._trees.items():
                    want = tuple(s.tokens) if s.namespace == ns else ()
                    if tree.sequence(s.seq) != want:
                        problems.append(f"slot {s.seq}: tree[{ns}] disagrees with the slot")
        return problems

    # ---- generation --------------------------------------------------------

    def generate(
        self,
        prompt: str | bytes | None = None,
        *,
        tokens: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        namespace: str = "default",
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Serve one request; ``on_text`` receives streamed text as it is decoded."""
        t0 = time.perf_counter()
        params = params or SamplingParams()
        try:
            params.validate()
        except ValueError as exc:
            raise EngineError(INVALID_REQUEST, str(exc)) from exc
        ids = self.prompt_tokens(prompt, tokens)
        budget = self.slot_ctx - len(ids)
        max_new = min(params.max_tokens, budget)

        slot, reuse, evicted = self._claim_slot(ids, namespace)
        t_prefill = time.perf_counter()
        sampler = self._make_sampler(params)
        self._enter_serving()
        try:
            self._extend(slot, ids[reuse:], logits_last=True)
            return self._decode_loop(
                slot,
                ids,
                reuse,
                evicted,
                max_new,
                params,
                sampler,
                on_text,
                should_stop,
                t0,
                t_prefill,
            )
        finally:
            ll.llama_sampler_free(sampler)
            with self._lock:
                self._tree(namespace).set_sequence(slot.seq, slot.tokens)
            slot.last_used = time.monotonic()
            self._leave_serving()

    def next_token_logits(
        self,
        prompt: str | bytes | None = None,
        *,
        tokens: Sequence[int] | None = None,
        namespace: str = "default",
    ) -> tuple[list[float], int]:
        """Logits of the token after ``prompt``, computed as ``generate`` computes them
        (reusing any cached prefix), and the number of prompt tokens reused.

        For checks that reuse changes nothing but float rounding; not used to serve.
        """
        r = self.generate(
            prompt, tokens=tokens, params=SamplingParams(max_tokens=1), namespace=namespace
        )
        # One token sampled and not decoded: the context still holds the prompt's logits.
        n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        return ll.llama_get_logits_ith(self._ctx, -1)[:n_vocab], r.cached_tokens

    def _decode_loop(
        self,
        slot: _Slot,
        ids: list[int],
        reuse: int,
        evicted: int,
        max_new: int,
        params: SamplingParams,
        sampler: _Sampler,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None,
        t0: float,
        t_prefill: float,
    ) -> GenerationResult:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = params.stop
        hold = max((len(s) for s in stops), default=1) - 1  # chars a stop may still claim
        text, emitted, generated = "", 0, 0
        finish = "length"
        ttft = prefill_s = 0.0
        t_first = time.perf_counter()
        while generated < max_new:
            token = ll.llama_sampler_sample(sampler, self._ctx, -1)
            if generated == 0:
                t_first = time.perf_counter()
                ttft, prefill_s = t_first - t0, t_first - t_prefill
            generated += 1
            if ll.llama_vocab_is_eog(self._vocab, token):
                finish = "eog"
                break
            text += decoder.decode(self._piece(token))
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if on_text and len(text) - hold > emitted:
                on_text(text[emitted : len(text) - hold])
                emitted = len(text) - hold
            if generated >= max_new or (should_stop and should_stop()):
                finish = "length" if generated >= max_new else "cancelled"
                break
            self._extend(slot, [token], logits_last=True)
            if self._between:
                self._run_between()
        if finish not in ("stop",):
            text += decoder.decode(b"", final=True)
        if on_text and len(text) > emitted:
            on_text(text[emitted:])
        decode_s = time.perf_counter() - t_first
        result = GenerationResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(ids),
            cached_tokens=reuse,
            completion_tokens=generated,
            ttft_s=ttft,
            prefill_s=prefill_s,
            decode_s=decode_s,
            slot=slot.seq,
            evicted_tokens=evicted,
        )
        self._record(result, t0)
        return result

    def _record(self, r: GenerationResult, t0: float) -> None:
        st = self.stats
        st.requests += 1
        st.prompt_tokens += r.prompt_tokens
        st.cached_tokens += r.cached_tokens
        prefilled = r.prompt_tokens - r.cached_tokens
        if prefilled >= 32:  # tiny prefills are dominated by fixed costs
            st.prefill_s_per_token = ewma(st.prefill_s_per_token, r.prefill_s / prefilled)
        st.service_s = ewma(st.service_s, time.perf_counter() - t0)
        st.completion_tokens = ewma(st.completion_tokens, float(r.completion_tokens))
        if r.completion_tokens > 1:
            st.decode_s_per_token = ewma(st.decode_s_per_token, r.decode_s / r.completion_tokens)

    def _claim_slot(self, ids: list[int], namespace: str) -> tuple[_Slot, int, int]:
        """Pick the slot to serve ``ids`` and make it hold the reusable prefix.

        Returns (slot, reused tokens, tokens evicted from the slot's old content).
        """
        best, common = self._longest_holder(ids, namespace)
        # Keep at least one prompt token to decode: its logits start the answer.
        reuse = min(common, len(ids) - 1)
        if best is not None and reuse > 0 and (2 * reuse >= len(best.tokens) or self.n_slots == 1):
            # Most of what the slot holds is our prefix (or it is the only slot):
            # continue in place after rolling back to the shared prefix.
            self._truncate(best, reuse)
            return best, reuse, 0
        # Otherwise keep that slot intact and share its prefix into another one.
        target = self._victim(exclude=best if reuse > 0 else None)
        evicted = len(target.tokens)
        if evicted:
            self.stats.evictions += 1
            self.stats.evicted_tokens += evicted
        self._truncate(target, 0)
        target.namespace = namespace
        if best is not None and reuse > 0:
            ll.llama_memory_seq_cp(self._mem, best.seq, target.seq, 0, reuse)
            target.tokens = best.tokens[:reuse]
        else:
            reuse = 0
        with self._lock:
            self._tree(namespace).set_sequence(target.seq, target.tokens)
        return target, reuse, evicted

    def _longest_holder(self, tokens: Sequence[int], namespace: str) -> tuple[_Slot | None, int]:
        """The slot of ``namespace`` sharing the longest prefix with ``tokens``, and its length."""
        best, common = None, 0
        for s in self._slots:
            if s.namespace == namespace and s.tokens:
                n = _common_prefix(s.tokens, tokens)
                if n > common:
                    best, common = s, n
        return best, common

    def _victim(self, exclude: _Slot | None) -> _Slot:
        """An empty slot, else the least recently used one (not ``exclude`` if avoidable)."""
        free = [s for s in self._slots if not s.tokens]
        if free:
            return free[0]
        pool = [s for s in self._slots if s is not exclude] or self._slots
        return min(pool, key=lambda s: s.last_used)

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Roll ``slot`` back to its first ``keep`` tokens, in llama.cpp and the tree."""
        if keep >= len(slot.tokens):
            return
        if not ll.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
            ll.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            keep = 0
        slot.tokens = slot.tokens[:keep]
        with self._lock:
            if slot.namespace is not None:
                self._tree(slot.namespace).set_sequence(slot.seq, slot.tokens)
            if not slot.tokens:
                slot.namespace = None

    def _extend(self, slot: _Slot, new: Sequence[int], logits_last: bool) -> None:
        """Decode ``new`` tokens into ``slot`` in batches of n_batch."""
        b = self._batch
        step = self.config.n_batch
        for start in range(0, len(new), step):
            chunk = new[start : start + step]
            pos0 = len(slot.tokens)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = slot.seq
                b.logits[i] = 0
            last = start + len(chunk) >= len(new)
            b.logits[len(chunk) - 1] = 1 if (logits_last and last) else 0
            b.n_tokens = len(chunk)
            rc = ll.llama_decode(self._ctx, b)
            if rc != 0:
                # Leave the slot exactly as far as we know it is.
                ll.llama_memory_seq_rm(self._mem, slot.seq, pos0, -1)
                raise EngineError("internal", f"llama_decode failed with status {rc}")
            slot.tokens.extend(chunk)
            if self._between and not last:
                self._run_between()  # a long prefill pauses between its chunks too

    def _make_sampler(self, p: SamplingParams) -> _Sampler:
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if p.temperature <= 0.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else ll.LLAMA_DEFAULT_SEED
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def clear(self) -> None:
        """Drop what every slot holds (benchmarks and tests start over with it)."""
        for s in self._slots:
            self._truncate(s, 0)

    # ---- work between steps ---------------------------------------------------

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Mark work on the engine thread that serves a request beyond `generate` (a KV
        import before it): other threads' work then waits for a step boundary, not for
        the whole request. `generate` marks itself; nesting is fine."""
        self._enter_serving()
        try:
            yield
        finally:
            self._leave_serving()

    def _enter_serving(self) -> None:
        with self._between_lock:
            self._serving += 1

    def _leave_serving(self) -> None:
        with self._between_lock:
            self._serving -= 1
        self._run_between()  # what arrived after the last step

    def call_between_steps(self, fn: Callable[[], Any]) -> Future[Any] | None:
        """Run ``fn`` on the engine thread at the next step boundary of the request it
        is serving now; None when it serves none (then run ``fn`` on the engine thread
        yourself, e.g. through the executor that runs `generate`)."""
        with self._between_lock:
            if not self._serving:
                return None
            fut: Future[Any] = Future()
            self._between.append((fn, fut))
            return fut

    def _run_between(self) -> None:
        with self._between_lock:
            work, self._between = self._between, []
        for fn, fut in work:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                fut.set_exception(exc)

    # ---- KV shipping (call on the engine's thread: between steps or requests) ----

    def export_prefix(
        self, tokens: Sequence[int], namespace: str, min_tokens: int = 1
    ) -> KvState | None:
        """The KV state of the longest prefix of ``tokens`` that a slot of ``namespace``
        holds, or None if none holds ``min_tokens`` of it. The slot itself is untouched:
        its prefix is shared into the scratch sequence (no copy), read out, and dropped."""
        best, common = self._longest_holder(tokens, namespace)
        common = min(common, self.max_ship_tokens)
        if best is None or common < max(min_tokens, 1):
            return None
        scratch = self._scratch_seq
        ll.llama_memory_seq_rm(self._mem, scratch, -1, -1)
        ll.llama_memory_seq_cp(self._mem, best.seq, scratch, 0, common)
        try:
            size = ll.llama_state_seq_get_size(self._ctx, scratch)
            buf = (ctypes.c_uint8 * size)()
            written = ll.llama_state_seq_get_data(self._ctx, buf, size, scratch)
            payload = ctypes.string_at(buf, written)
        finally:
            ll.llama_memory_seq_rm(self._mem, scratch, -1, -1)
        return make_state(self.kv_layout, namespace, list(best.tokens[:common]), payload)

    def import_prefix(self, state: KvState, namespace: str) -> int:
        """Load a shipped prefix into a slot of ``namespace``; returns the tokens now
        cached that were not before (0 if a slot already held as much). Raises
        `KvRefused` for a state that does not fit this engine; then no slot or tree
        holds any of it."""
        verify(state, self.kv_layout, namespace, self.max_prompt_tokens)
        tokens = list(state.header.tokens)
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise KvRefused("tokens", f"token id {bad} outside 0..{self.n_vocab - 1}")
        holder, held = self._longest_holder(tokens, namespace)
        if held >= len(tokens):
            return 0
        target = self._victim(exclude=holder)
        if target.tokens:
            self.stats.evictions += 1
            self.stats.evicted_tokens += len(target.tokens)
        self._truncate(target, 0)
        payload = state.payload
        buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        read = ll.llama_state_seq_set_data(self._ctx, buf, len(payload), target.seq)
        pos_min = ll.llama_memory_seq_pos_min(self._mem, target.seq)
        pos_max = ll.llama_memory_seq_pos_max(self._mem, target.seq)
        if read == 0 or pos_min != 0 or pos_max + 1 != len(tokens):
            ll.llama_memory_seq_rm(self._mem, target.seq, -1, -1)
            raise KvRefused(
                "rejected",
                f"llama.cpp did not load the state (read {read} bytes, "
                f"positions {pos_min}..{pos_max} for {len(tokens)} tokens)",
            )
        target.namespace = namespace
        target.tokens = tokens
        target.last_used = time.monotonic()
        with self._lock:
            self._tree(namespace).set_sequence(target.seq, target.tokens)
        return len(tokens) - held
