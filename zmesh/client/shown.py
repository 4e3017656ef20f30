"""What the caller has seen of one streamed answer, so that a retry on another node
repeats nothing and a departing retry restarts visibly (`attempt` + 1)."""

from __future__ import annotations

from zmesh import protocol as P


class Shown:
    """What the caller has seen of one streamed answer, so that a retry on another node
    repeats nothing (see `AsyncClient.stream`)."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.text = ""  # delivered in the current attempt
        self.attempt = 0  # the attempt the caller sees
        self.index = 0
        self.source: tuple[int, int] = (0, 0)  # (client attempt, the node's attempt)
        self.source_text = ""

    def chunk(self, tries: int, ch: P.Chunk) -> P.Chunk | None:
        if (tries, ch.attempt) != self.source:
            if tries == self.source[0]:
                # The node itself restarted (its forward failed): a visible restart,
                # as the node reports it.
                self.attempt, self.index, self.text = self.attempt + 1, 0, ""
            self.source, self.source_text = (tries, ch.attempt), ""
        self.source_text += ch.text
        return self._show(self.source_text, final=False)

    def done(self, done: P.Done) -> P.Chunk | None:
        """A last chunk when the final text is not what the chunks delivered."""
        return None if done.text == self.text else self._show(done.text, final=True)

    def _show(self, full: str, final: bool) -> P.Chunk | None:
        if full.startswith(self.text):
            new = full[len(self.text) :]
        elif self.text.startswith(full) and not final:
            return None  # a retry still repeating what was delivered
        else:  # the retry's text departs from what was delivered: restart visibly
            self.attempt, self.index, new = self.attempt + 1, 0, full
        if not new:
            return None
        self.text = full
        self.index += 1
        return P.Chunk(request_id=self.rid, index=self.index - 1, text=new, attempt=self.attempt)
