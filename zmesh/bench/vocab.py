"""Prompts as the model's token ids, for the benchmarks that send tokens.

`Tokenizer` loads the model's vocabulary only (well under a second); `tokenize_workload`
tokenizes a workload so that every policy serves identical tokens (a shared prefix
once, a chat turn as its parent's tokens plus its own); `fitting_subjects` picks the
MMLU subjects whose questions fit a slot.
"""

from __future__ import annotations

from zmesh.workload import Workload, load_mmlu, mmlu_prefix, mmlu_question


class Tokenizer:
    """The model's tokenizer (vocabulary only: loads in well under a second)."""

    def __init__(self, model_path: str | None = None) -> None:
        import llama_cpp as ll

        from zmesh.engine import _silence_llama_logs
        from zmesh.model import resolve_model_path

        self._ll = ll
        _silence_llama_logs()
        params = ll.llama_model_default_params()
        params.vocab_only = True
        path = resolve_model_path(model_path)
        self._model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise RuntimeError(f"could not load the vocabulary of {path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))

    def __call__(self, text: str, bos: bool) -> list[int]:
        ll = self._ll
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, bos and self.add_bos, True)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(
                self._vocab, data, len(data), buf, cap, bos and self.add_bos, True
            )
        return list(buf[:n])

    def close(self) -> None:
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tokenize_workload(workload: Workload, tok: Tokenizer) -> list[list[int]]:
    """Token ids per request: the shared prefix tokenized once, then each request's own
    text; a chat turn extends its parent's tokens, so prefixes match token for token."""
    prefix_memo: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for r in workload.requests:
        if r.parent >= 0:
            head = out[r.parent]
        elif r.prefix in prefix_memo:
            head = prefix_memo[r.prefix]
        else:
            head = prefix_memo[r.prefix] = tok(r.prefix, True)
        out.append(head + tok(r.suffix, False))
    return out


def fitting_subjects(
    tok: Tokenizer, max_prompt: int, max_prefix: int, path: str | None = None
) -> list[str]:
    """MMLU subjects whose every shipped question fits ``max_prompt`` tokens."""
    ok = []
    for subject, (dev, test) in sorted(load_mmlu(path).items()):
        n_prefix = len(tok(mmlu_prefix(subject, dev), True))
        if n_prefix > max_prefix:
            continue
        if n_prefix + max(len(tok(mmlu_question(q), False)) for q in test) <= max_prompt:
            ok.append(subject)
    return ok
