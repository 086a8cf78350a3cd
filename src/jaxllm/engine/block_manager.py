"""KV block bookkeeping on the host: which blocks a sequence owns, and prefix reuse.

A full block is named by a hash chained over (parent block's hash, the block's token ids), so equal
hashes mean equal prefixes. Full blocks are registered under their hash; a new sequence whose
prompt starts with registered blocks takes them (reference counted) instead of recomputing them.
A block whose last owner lets go keeps its contents and its hash, and waits in an LRU list: it can
still be reused until a new allocation evicts it.
"""

from __future__ import annotations

from collections import OrderedDict


def chain_hashes(token_ids: list[int], block_size: int, parent: int | None = None) -> list[int]:
    """Hashes of the full blocks of token_ids, each chained on the one before."""
    out = []
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_reuse = enable_reuse
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Registered blocks that hold a prefix of token_ids (never the whole: the last token is recomputed)."""
        if not self.enable_reuse:
            return []
        blocks = []
        for h in chain_hashes(token_ids[: len(token_ids) - 1], self.block_size):
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Add an owner to cached blocks (from match_prefix)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently freed cached ones), or None if too few are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def forget_cached(self) -> None:
        """Drop the prefix cache (the free blocks' contents are about to be overwritten)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks

    def register(self, block: int, h: int) -> None:
        """Record that `block` is full and holds the prefix named by hash h."""
        if not self.enable_reuse or self.block_hash[block] is not None:
            return
        self.block_hash[block] = h
        self.cached.setdefault(h, block)

    def release(self, blocks: list[int]) -> None:
        """Drop an owner from each block; unowned blocks become free (still reusable until evicted)."""
        for b in reversed(blocks):  # a sequence's tail is evicted before its shared head
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
            elif self.ref[b] < 0:
                raise AssertionError(f"block {b} released more often than taken")
