"""Which workers recently received which prompt-prefix blocks (pure, bounded LRU)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dio.protocol.defaults import PREFIX_BLOCK_TOKENS


class PrefixIndex:
    """Map a prefix-block hash to the workers that were sent it, most recent last.

    It mirrors what each engine's prefix cache probably holds; it is a hint, never a guarantee
    (engines evict), so affinity only ever lowers a cost, it never filters.
    """

    def __init__(self, max_blocks: int = 200_000, block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        self.max_blocks = max_blocks
        self.block_tokens = block_tokens  # prompt tokens one hash names
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, hashes: list[int] | None, worker_id: str) -> None:
        """Remember that ``worker_id`` received (and will cache) these blocks."""
        for h in hashes or ():
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = set()
            else:
                self._holders.move_to_end(h)
            holders.add(worker_id)
        while len(self._holders) > self.max_blocks:
            self._holders.popitem(last=False)

    def matched_blocks(self, hashes: list[int] | None, ids: list[str], rows: np.ndarray) -> np.ndarray:
        """Leading blocks of ``hashes`` each candidate row holds."""
        matched = np.zeros(len(rows), dtype=np.int64)
        if not hashes:
            return matched
        open_rows = {ids[r]: i for i, r in enumerate(rows)}
        for h in hashes:
            holders = self._holders.get(h)
            if not holders:
                break
            still = {wid: i for wid, i in open_rows.items() if wid in holders}
            if not still:
                break
            for i in still.values():
                matched[i] += 1
            open_rows = still
        return matched

    def forget_worker(self, worker_id: str) -> None:
        for holders in self._holders.values():
            holders.discard(worker_id)
