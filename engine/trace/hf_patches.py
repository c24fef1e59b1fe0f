"""Keep transformers on the code path a real run takes, even though the tensors are fake.

transformers treats fake tensors as "tracing" (torch.compile / export) and then
skips data-dependent shortcuts. For a training batch without padding the
important one is packed-sequence detection: on real position ids 0..s-1 it
finds no packing, lets SDPA use `is_causal` and native grouped-query attention;
under fake tensors it assumes packing, materialises a (b, 1, s, s) mask and
expands K and V to every head, which no real step does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def real_run_decisions() -> Iterator[None]:
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    # Synthetic batches are one unpadded sequence per row: never packed.
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original
