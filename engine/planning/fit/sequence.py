"""max_seq_len: the longest sequence that fits, within the model's position limits."""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import Budget, GpuSpec, TrainingConfig
from memtui.engine.planning.fit.search import SEQ_LIMIT, Evaluator, budget_json, largest_fitting, with_changes
from memtui.engine.units import format_gib




@dataclass(frozen=True)
class MaxSeqResult:
    """The longest sequence that fits at config's micro-batch; 0 when nothing does."""

    seq_len: int
    multiple_of: int
    at_least: bool  # the search cap itself fits: longer may fit too
    limit: int
    limit_reason: str  # why the search stops where it does
    limited_by: str  # "memory", "model" (learned positions) or "search" (the cap; see at_least)
    beyond_trained: bool  # longer than the model's max_position_embeddings (RoPE extrapolation)
    budget: Budget | None
    over_budget: Budget | None
    message: str
    estimates: int

    @property
    def fits(self) -> bool:
        return self.seq_len > 0

    def as_json(self) -> dict:
        return {
            "question": "max_seq",
            "seq_len": self.seq_len,
            "fits": self.fits,
            "multiple_of": self.multiple_of,
            "at_least": self.at_least,
            "limit": self.limit,
            "limit_reason": self.limit_reason,
            "limited_by": self.limited_by,
            "beyond_trained": self.beyond_trained,
            "message": self.message,
            "budget": budget_json(self.budget),
            "next_device_peak_bytes": None if self.over_budget is None else self.over_budget.device_peak_bytes,
            "estimates": self.estimates,
        }


def max_seq_len(
    config: TrainingConfig,
    *,
    model: ModelSpec | None = None,
    gpu: GpuSpec | None = None,
    multiple_of: int = 1,
    limit: int | None = None,
) -> MaxSeqResult:
    """Longest sequence (a multiple of `multiple_of`) at config's micro-batch that fits.

    Models with learned positions stop at max_position_embeddings; RoPE models
    may go past their trained length (the result says so) up to SEQ_LIMIT.
    """
    if multiple_of < 1:
        raise InputError("--seq-multiple", f"must be at least 1, got {multiple_of}", "1, 2, ... (e.g. 128, 256)")
    evaluator = Evaluator(config, model, gpu)
    spec = evaluator.model
    # The user's own length may be what is wrong (GPT-2 past 1024); check the rest at a safe length.
    evaluator.strict_budget(with_changes(config, seq_len=min(config.seq_len, spec.max_position_embeddings)))
    return _max_seq(evaluator, config, multiple_of, limit)


def _max_seq(evaluator: Evaluator, config: TrainingConfig, multiple_of: int, limit: int | None) -> MaxSeqResult:
    spec = evaluator.model
    if spec.positions == "learned":
        cap, reason, cap_kind = (spec.max_position_embeddings,
                                 f"{spec.id}'s {spec.max_position_embeddings} learned positions", "model")
    else:
        cap, reason, cap_kind = SEQ_LIMIT, f"the search cap of {SEQ_LIMIT:,} tokens", "search"
    if limit is not None and limit < cap:
        cap, reason, cap_kind = limit, f"the limit of {limit:,} tokens", "search"
    steps = cap // multiple_of
    if steps < 1:
        raise InputError("--seq-multiple", f"{multiple_of} is longer than the {cap:,}-token limit", f"1..{cap}")

    def peak(step: int) -> float:
        return evaluator.peak(with_changes(config, seq_len=step * multiple_of))

    step, at_cap = largest_fitting(peak, evaluator.memory, steps)
    memory = format_gib(evaluator.memory)
    if step == 0:
        over = evaluator.budget(with_changes(config, seq_len=multiple_of))
        message = (
            f"nothing fits: batch {config.batch_size} x {multiple_of} tokens needs "
            f"{format_gib(over.device_peak_bytes)} of {memory}" if over else "nothing fits"
        )
        return MaxSeqResult(0, multiple_of, False, cap, reason, "memory", False, None, over, message, evaluator.estimates)
    seq = step * multiple_of
    budget = evaluator.budget(with_changes(config, seq_len=seq))
    beyond = seq > spec.max_position_embeddings
    limited_by = cap_kind if at_cap else "memory"
    over = None if at_cap else evaluator.budget(with_changes(config, seq_len=seq + multiple_of))
    parts = [f"{seq:,} tokens x batch {config.batch_size}; peak {format_gib(budget.device_peak_bytes)} of {memory}"]
    if at_cap:
        parts.append(f"{'at least: ' if cap_kind == 'search' else ''}stops at {reason}")
    if beyond:
        parts.append(f"beyond the {spec.max_position_embeddings:,} trained positions (needs RoPE scaling to train well)")
    return MaxSeqResult(seq, multiple_of, at_cap and cap_kind == "search", cap, reason, limited_by, beyond, budget, over,
                        "; ".join(parts), evaluator.estimates)
