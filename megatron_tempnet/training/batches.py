"""Micro-batches for one data-parallel rank, in Megatron's order, from any map-style token dataset.

A dataset item is a dict with "tokens" [s] (inputs), "labels" [s] (next tokens) and "loss_mask" [s]
(megatron-core's GPTDataset items have this form, and so do `MockTokens`). Sample order: global batch i
holds samples [c + i*G, c + (i+1)*G) where c is the number of samples consumed before; within it, micro-batch j
on data-parallel rank r holds samples c + i*G + j*m*DP + r*m + [0, m). So the union over DP ranks of one
step is the same global batch at any DP size, and resuming at c continues the same stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..models.build import causal_mask


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, next token of each position
    loss_mask: torch.Tensor  # [b, s] float, 1 where the token counts
    position_ids: torch.Tensor  # [b, s] int64
    attention_mask: torch.Tensor  # [1, 1, s, s] bool, True = masked (future positions)


def collate(items: Sequence[dict], device: torch.device) -> Batch:
    tokens = torch.stack([torch.as_tensor(it["tokens"], dtype=torch.long) for it in items]).to(device)
    labels = torch.stack([torch.as_tensor(it["labels"], dtype=torch.long) for it in items]).to(device)
    loss_mask = torch.stack([torch.as_tensor(it["loss_mask"], dtype=torch.float) for it in items]).to(device)
    b, s = tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    return Batch(tokens, labels, loss_mask, positions, causal_mask(s, device))


class MockTokens(torch.utils.data.Dataset):
    """Synthetic, learnable sequences: t_j = (a + j * b) mod V with a, b drawn per sample from its index.

    A model can learn them (the step b is visible after two tokens), so a falling loss means training works.
    """

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        start = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        step = int(torch.randint(1, 8, (1,), generator=g))
        seq = (start + step * torch.arange(self.seq_length + 1)) % self.vocab_size
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.ones(self.seq_length)}


def micro_batches(
    dataset, *, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
    dp_rank: int, dp_size: int, device: torch.device,
) -> Iterator[Batch]:
    """Endless micro-batches for this DP rank starting after `consumed_samples` (wraps around the dataset)."""
    n = len(dataset)
    per_step = global_batch_size // (micro_batch_size * dp_size) if micro_batch_size > 0 else 0
    if per_step < 1 or n < 1:  # config.validate_config refuses these; an endless loop that yields nothing must not follow
        raise ValueError(f"no micro-batch to draw: global batch {global_batch_size}, micro-batch {micro_batch_size}, "
                         f"{dp_size} data-parallel rank(s), {n} samples")
    step_start = consumed_samples
    while True:
        for j in range(per_step):
            first = step_start + j * micro_batch_size * dp_size + dp_rank * micro_batch_size
            yield collate([dataset[(first + k) % n] for k in range(micro_batch_size)], device)
        step_start += global_batch_size
