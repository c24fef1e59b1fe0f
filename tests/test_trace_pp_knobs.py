"""Pipeline parallelism with the single-GPU step's loss, accumulation and loss-scaling options (issue 13): torchtune's
chunked loss and the fused linear cross-entropy as the last stage's output and loss_fn, gradient accumulation as
torchtitan's loop of schedule.step() calls, fp16's GradScaler on every rank; each rank's estimate held to its trace."""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.layout import pipeline_refusal
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_pp_combined import small_llama

SPEC = small_llama(layers=2)


def pipeline(**options) -> TrainingConfig:
    return TrainingConfig(**{"model": "llama-3.2-1b", "batch_size": 4, "seq_len": 64, "pp": 2, "gpus": 2,
                             "microbatches": 4, **options})


def _traced_and_exact(config: TrainingConfig, rel: float = 0.001, spec=SPEC):
    """Every rank's tensor peak as traced (no part of the pipeline modelled) and as estimated, within `rel`."""
    import torch.distributed as dist

    from memtui.engine.trace import trace

    traced = trace(config, model=spec)
    assert not dist.is_initialized()
    assert not any("pipeline" in line for line in traced.modelled), traced.modelled
    estimated = estimate(config, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=rel), traced_rank.rank
    return traced, estimated


@pytest.mark.parametrize("loss, schedule, options", [
    ("chunked", "1f1b", {}), ("fused-linear", "gpipe", {}),
    ("chunked", "1f1b", {"gpus": 4, "zero": 3, "microbatches": 2}), ("fused-linear", "1f1b", {"gpus": 4, "zero": 0})],
    ids=["chunked", "fused", "chunked-fsdp2", "fused-ddp"])
def test_the_last_stage_runs_the_chunked_or_fused_loss_and_keeps_its_output(loss, schedule, options):
    """The last stage's forward returns the head's chunks (torchtune) or the final norm's output (fused linear
    cross-entropy), which PipelineStage keeps until the micro-batch's backward; the loss_fn takes them. Each rank as
    estimated (measured: within 16 KiB per rank, 0.05%), alone and with DDP or FSDP2 on each stage."""
    traced, _estimated = _traced_and_exact(pipeline(loss=loss, pp_schedule=schedule, **options))
    assert any(line.startswith(("torchtune's chunked loss on the last stage", "fused linear cross-entropy on the"))
               for line in traced.traced), traced.traced


def test_the_chunked_loss_of_a_batched_micro_batch():
    """Two sequences per micro-batch: each sequence chunk of the head's input is copied for its matmul."""
    _traced_and_exact(pipeline(loss="chunked", microbatches=2))


@pytest.mark.parametrize("options", [{"pp_schedule": "interleaved-1f1b", "microbatches": 2}, {"gpus": 4, "zero": 0},
                                     {"gpus": 8, "zero": 3, "tp": 2, "microbatches": 2}],
                         ids=["interleaved", "ddp", "fsdp2-tp"])
def test_gradient_accumulation_runs_the_schedule_once_per_step(options):
    """torchtitan's loop: schedule.step() per accumulation step, then the optimizers; the gradients stay whole
    (under DDP PipelineStage all-reduces them after each step's last backward, in place). Under FSDP2 each step
    ends resharded and reduce-scattered: the next gathers again and makes its unsharded gradients beside the shards
    so far, and adds its reduce-scatter to them (the first stage's whole-vocabulary embedding gradient, under
    DTensor's plan, to the shard of the rank's slice)."""
    spec = small_llama(layers=4) if options.get("pp_schedule") == "interleaved-1f1b" else SPEC  # two stages a rank
    traced, _estimated = _traced_and_exact(pipeline(grad_accum=2, **options), spec=spec)
    assert any("2 of 2 schedule.step() calls per optimizer step" in line for line in traced.traced), traced.traced


def test_fp16_scales_the_last_stages_loss_and_every_rank_unscales():
    """16-mixed: a GradScaler per rank (its scale and growth tracker: optimizer states), the loss scaled on the
    last stage; with gradient accumulation and the chunked loss beside it."""
    traced, _estimated = _traced_and_exact(pipeline(precision="16-mixed", grad_accum=2, loss="chunked"))
    assert any(line.startswith("fp16 loss scaling: a GradScaler on every rank") for line in traced.traced)


def test_what_is_not_traced_is_refused_in_one_line():
    from tests.refusal import refusal

    for options, words in (({"optimizer_in_backward": True}, "accumulates every gradient over the micro-batches"),
                           ({"activation_offload": True}, "is modelled on one GPU"),
                           ({"loss": "chunked", "loss_dtype": "compute"}, "LitGPT has no pipeline parallelism"),
                           ({"loss": "fused-linear", "gpus": 4, "zero": 3}, "ZeRO-3 has resharded")):
        reason = refusal(pipeline(**options), SPEC)
        assert reason is not None and words in reason and "\n" not in reason, options
    for options in ({"loss": "chunked"}, {"loss": "fused-linear"}, {"grad_accum": 4}, {"precision": "16-mixed"},
                    {"grad_accum": 2, "gpus": 4, "zero": 3}, {"precision": "16-mixed", "gpus": 4, "zero": 3}):
        assert pipeline_refusal(pipeline(**options), SPEC) is None, options
    # beside tensor parallelism the chunked and fused losses stay refused, as beside data parallelism without --pp
    from memtui.engine.errors import InputError

    for options in ({"gpus": 4, "tp": 2}, {"gpus": 2, "pp": 1, "microbatches": 1}):
        with pytest.raises(InputError, match="--pp above 1 with --tp 1"):
            estimate(pipeline(loss="fused-linear", **options), model=SPEC)
