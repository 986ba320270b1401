"""The KV cache: per layer keys and values [B, H, S, D], preallocated and filled in place (docs/numerics.md §7.2).

Mirrors what transformers keeps in its ``DynamicCache`` (keys after k_proj/v_proj with their biases, unscaled,
before any LayerNorm), but laid out like llama2.c's ``run.c``: one buffer per layer sized up front, so a decoding
step writes one column of each buffer and allocates nothing. If a caller writes past the capacity the buffers
grow (doubling), so the cache is never a hard limit. ``generate`` sizes it for the whole generation, or for the
model's ``max_position_embeddings`` when a huge ``max_new_tokens`` asks for more (an early EOS then costs
nothing of what was not used).
"""
from __future__ import annotations


class KVCache:
    """Keys and values of every decoder layer. ``length`` tokens are stored, the same number in every layer."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int, xp,
                 dtype=None):
        self.xp = xp
        self.dtype = dtype if dtype is not None else xp.float32
        shape = (batch, num_heads, max(int(capacity), 1), head_dim)
        self.keys = [xp.empty(shape, dtype=self.dtype) for _ in range(num_layers)]     # L × [B, H, cap, D]
        self.values = [xp.empty(shape, dtype=self.dtype) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def __len__(self) -> int:
        return self.length

    def _grow(self, needed: int) -> None:
        xp, cap = self.xp, self.capacity
        new_cap = max(needed, 2 * cap)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                B, H, _, D = old.shape
                new = xp.empty((B, H, new_cap, D), dtype=self.dtype)
                new[:, :, :self.length] = old[:, :, :self.length]
                store[i] = new

    def update(self, layer: int, k, v):
        """Write this step's k, v [B, H, T, D] after the stored tokens of ``layer``; return all keys and values
        so far, [B, H, length+T, D] views of the buffers (no copy). Call :meth:`advance` once every layer is done."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more tokens as stored (after all layers have called :meth:`update`)."""
        self.length += int(num_tokens)

    def reorder(self, batch_indices) -> None:
        """Reorder (and/or repeat) the rows along the batch axis, as beam search needs after each step."""
        idx = self.xp.asarray(batch_indices)
        n = self.length
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                new = self.xp.empty((len(idx),) + buf.shape[1:], dtype=self.dtype)
                new[:, :, :n] = buf[idx, :, :n]
                store[i] = new

    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.keys + self.values)
