"""The simulated model's text: one deterministic word per token id, so a streamed answer is checkable.

The text of tokens ``[a, b)`` followed by that of ``[b, c)`` is the text of ``[a, c)``: a stream's
deltas, concatenated, are exactly the final answer, whichever way the tokens were cut into deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

# 64 short words: about 5 characters a token with its space, near the 4 of English BPE text.
WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "as", "with", "was", "at", "by", "an",
    "be", "this", "from", "or", "are", "not", "but", "had", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "out", "up", "into", "do", "any",
    "time", "my", "new", "some", "what", "only", "very", "then", "first", "like", "over", "such", "our",
    "even", "most", "made", "after", "also", "did",
)


def token_text(token_ids: Iterable[int]) -> str:
    """Return the text of these token ids (each is a space and one word)."""
    return "".join(" " + WORDS[token % len(WORDS)] for token in token_ids)
