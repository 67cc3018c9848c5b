"""Which workers recently received which prompt-prefix blocks (pure, bounded LRU)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dio.protocol.defaults import PREFIX_BLOCK_TOKENS


class PrefixIndex:
    """Map a prefix-block hash to the workers that were sent it, most recent last.

    It mirrors what each engine's prefix cache probably holds; it is a hint, never a guarantee
    (engines evict), so affinity only ever lowers a cost, it never filters. Each worker's share is
    bounded by its own cache (``set_capacity``: its KV cache in blocks, where vLLM keeps cached
    prefixes): a worker sent more blocks than that has evicted the oldest, so crediting them would
    promise a fast GPU prefill it no longer skips.
    """

    def __init__(self, max_blocks: int = 200_000, block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        self.max_blocks = max_blocks
        self.block_tokens = block_tokens  # prompt tokens one hash names
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._held: dict[str, OrderedDict[int, None]] = {}  # per worker: its blocks, least recent first
        self._capacity: dict[str, int] = {}  # per worker: blocks its cache holds (unbounded when unknown)

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        """Bound what ``worker_id`` is believed to cache to ``blocks`` blocks."""
        self._capacity[worker_id] = max(blocks, 0)
        self._evict(worker_id)

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, hashes: list[int] | None, worker_id: str) -> None:
        """Remember that ``worker_id`` received (and will cache) these blocks."""
        held = self._held.setdefault(worker_id, OrderedDict())
        for h in hashes or ():
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = set()
            else:
                self._holders.move_to_end(h)
            holders.add(worker_id)
            held[h] = None
            held.move_to_end(h)
        self._evict(worker_id)
        while len(self._holders) > self.max_blocks:
            oldest, holders = self._holders.popitem(last=False)
            for wid in holders:
                self._held.get(wid, OrderedDict()).pop(oldest, None)

    def _evict(self, worker_id: str) -> None:
        """Forget the worker's least recent blocks beyond its cache."""
        held, capacity = self._held.get(worker_id), self._capacity.get(worker_id)
        if held is None or capacity is None:
            return
        while len(held) > capacity:
            h, _ = held.popitem(last=False)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(worker_id)

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
        self._held.pop(worker_id, None)
        self._capacity.pop(worker_id, None)
