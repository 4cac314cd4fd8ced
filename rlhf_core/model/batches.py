"""Token batches for the shared forward pass.

Tokenizers, policies, critics and the one forward pass that both rollout and training use.

Sequence layout (both for recording log-probs during rollout and for training):

    [pad … pad  prompt tokens  response tokens]        every row ends at the last column
     <------------------ W columns ------------>        W = the batch's longest prompt + response

Each row is its prompt followed by its response, left-padded, so a batch is exactly as wide as its
longest sequence (no padding between prompt and response).  Position ids are the cumulative sum of
the attention mask minus one, so a row's logits do not depend on how much padding its batch has.
The response of row i occupies its last r_i columns; the logits one column earlier predict each
response token.  They are gathered into [B, R] arrays aligned with ``response_ids`` (response token t
of every row in column t, R = the longest response) and divided by the sampling temperature before
the log-softmax, exactly as the sampler did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_core.errors import DataError


@dataclass
class TokenBatch:
    """A collated batch (layout in the module docstring).

    input_ids/attention_mask/position_ids: [B, W]; response_ids/response_mask: [B, R], response token t
    of each row in column t; response_start: [B], the column of each row's first response token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    response_start: torch.Tensor

    @property
    def response_width(self) -> int:  # R
        return self.response_mask.shape[1]

    def gather_response(self, window: torch.Tensor) -> torch.Tensor:
        """[B, R+1, ...] values of the last R+1 columns -> [B, R, ...]: those of the columns that predict
        each response token (column response_start + t − 1); padding columns t ≥ r_i repeat a valid one."""
        batch, width_r = self.response_mask.shape
        first = self.input_ids.shape[1] - (width_r + 1)  # column of window[:, 0]
        offsets = torch.arange(width_r, device=window.device)
        index = (self.response_start.to(window.device).unsqueeze(1) - 1 - first + offsets).clamp(0, width_r - 1)
        index = index.view(batch, width_r, *([1] * (window.dim() - 2))).expand(-1, -1, *window.shape[2:])
        return window.gather(1, index)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                          self.response_ids.to(device), self.response_mask.to(device), self.response_start.to(device))


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (stable order within a length)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [B, W] with W the longest sequence: each row right-aligned, padded on the
    left with ``pad_id`` (mask 0), as ``generate`` takes prompts."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence):] = 1
    return input_ids, attention_mask


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> TokenBatch:
    """Each row = prompt + response, left-padded to the batch's longest sequence (module docstring)."""
    if not prompt_ids or len(prompt_ids) != len(response_ids):
        raise ValueError("collate needs equally many (>0) prompts and responses")
    width_r = max(1, max(len(r) for r in response_ids))
    # At least R+1 columns, so that the R+1 logits of gather_response exist even when every response is empty.
    width = max(width_r + 1, max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids)))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response = torch.full((batch, width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width_r), dtype=torch.float32)
    response_start = torch.zeros(batch, dtype=torch.long)
    for row, (prompt_row, response_row) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt_row:
            raise DataError(f"row {row}: empty prompt (zero tokens)")
        start = width - len(prompt_row) - len(response_row)
        input_ids[row, start:] = torch.tensor(list(prompt_row) + list(response_row), dtype=torch.long)
        attention_mask[row, start:] = 1
        response_start[row] = width - len(response_row)
        if len(response_row):
            response[row, :len(response_row)] = torch.tensor(response_row, dtype=torch.long)
            response_mask[row, :len(response_row)] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, position_ids, response, response_mask, response_start)
