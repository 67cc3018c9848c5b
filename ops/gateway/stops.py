"""``stop`` sequences, applied by the gateway: the answer ends before the first one it contains.

DIO's engines stop at EOS or ``max_tokens``; the gateway cuts the text at the first stop sequence
(and, streaming, cancels the job as soon as one appears, so the worker stops generating). A stream
holds back text that could be the start of a stop sequence until the next delta shows it is not.
"""

from __future__ import annotations


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Return ``text`` up to its first stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


class StopScanner:
    """Feed a streamed answer's deltas; get back the text safe to send, and whether it stopped."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.stopped = False
        self._held = ""  # text received and not sent yet: it may begin a stop sequence

    def feed(self, delta: str) -> str:
        """Return the text of ``delta`` (with what was held) that can be sent now."""
        if self.stopped or not self.stops:
            return "" if self.stopped else delta
        text, self.stopped = cut_at_stop(self._held + delta, self.stops)
        if self.stopped:
            self._held = ""
            return text
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """Return the text still held (the answer ended without completing a stop sequence)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of some stop sequence."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
