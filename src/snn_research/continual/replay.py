"""A fixed-size, seeded reservoir of old-domain blocks, and the draws that mix them into updates.

Reservoir sampling (Vitter's algorithm R): the first ``size`` items fill the buffer; the n-th item
after that (0-based, n >= size) replaces a uniformly chosen slot with probability size / (n + 1). After
any number of offers every item seen is in the buffer with the same probability, size / seen, so the
buffer is a uniform sample of everything offered, and its memory is ``size`` blocks however long the
source. The generator's state is part of the buffer's state, so a saved and reloaded buffer goes on
exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch


class ReservoirBuffer:
    def __init__(self, size: int, block_length: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"replay.size must be >= 1 (got {size})")
        self.size = size
        self.items = torch.zeros(size, block_length, dtype=torch.long)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def offer(self, item: torch.Tensor) -> None:
        """Offer one block (L,) to the buffer."""
        if self.seen < self.size:
            self.items[self.seen] = item
        else:
            slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
            if slot < self.size:
                self.items[slot] = item
        self.seen += 1

    def offer_all(self, blocks: torch.Tensor) -> None:
        for block in blocks:
            self.offer(block)

    def draw(self, count: int, seed: int, update: int) -> torch.Tensor:
        """``count`` distinct buffered blocks for update number ``update``: the same on every run."""
        if count == 0:
            return self.items[:0]
        if count > self.filled:
            raise ValueError(f"a replay draw of {count} blocks from a buffer holding {self.filled}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + update)
        return self.items[torch.randperm(self.filled, generator=generator)[:count]]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(tensors, scalars) to save; ``load`` restores them."""
        return ({"items": self.items.clone(), "generator": self.generator.get_state()},
                {"size": self.size, "seen": self.seen})

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> "ReservoirBuffer":
        items = tensors["items"]
        buffer = cls(int(scalars["size"]), items.shape[1], 0)
        if items.shape[0] != buffer.size:
            raise ValueError(f"replay buffer state holds {items.shape[0]} blocks but says its size is {buffer.size}")
        buffer.items = items.clone()
        buffer.seen = int(scalars["seen"])
        buffer.generator.set_state(tensors["generator"])
        return buffer
