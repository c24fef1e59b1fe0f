"""QLoRA under data parallelism traced (issue 13), not modelled on a single-GPU trace: DDP and ZeRO-1 beside the
frozen 4-bit weights (only the adapters' gradients in the buckets), and FSDP2 as bitsandbytes shards 4-bit weights
(the packed weights sharded, their quantization statistics whole on every rank); FSDP2's CPUOffloadPolicy for
--zero 3 --offload optimizer+params; the estimator held to the traces. DeepSpeed's optimizer-only offload and
LLM.int8 under FSDP2 stay modelled, each with its one-line reason."""

from __future__ import annotations

import functools

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.parallel import QLORA_FSDP2, data_parallel_refusal
from tests.refusal import refusal
from tests.test_trace_pp_combined import small_llama

SPEC = small_llama(layers=2)  # untied, width 256, a 2048 vocabulary


def config(**options) -> TrainingConfig:
    return TrainingConfig(**{"model": "llama-3.2-1b", "batch_size": 2, "seq_len": 64, "lora_rank": 8,
                             "quant": "nf4", "precision": "bf16-true", **options})


@functools.cache
def _traced(**options):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config(**options), model=SPEC)
    assert not dist.is_initialized()
    assert not any("parallel" in line for line in result.modelled), result.modelled
    return result


def _estimated_peak(**options) -> int:
    training = config(**options)
    return estimate(training, model=SPEC).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu(training.gpu))


def _agrees(options: dict) -> None:
    """What data parallelism changes, traced against estimated: the rank's peak less the one-GPU peak (the tiny
    width's own one-GPU error, a few hundred bytes per 4-bit layer's small buffers, is not data parallelism's),
    and the peak itself within 0.5%."""
    one_gpu = {name: value for name, value in options.items() if name in ("quant", "lora_rank", "precision")}
    traced, alone = _traced(**options), _traced(gpus=1, **one_gpu)
    estimated, estimated_alone = _estimated_peak(**options), _estimated_peak(gpus=1, **one_gpu)
    traced_change = traced.traced_tensor_peak_bytes - alone.traced_tensor_peak_bytes
    assert estimated - estimated_alone == pytest.approx(traced_change, abs=4096), options
    assert estimated == pytest.approx(traced.traced_tensor_peak_bytes, rel=0.005), options


def test_which_data_parallel_programs_are_traced_and_why_the_rest_are_not():
    for options in ({"gpus": 2, "zero": 0}, {"gpus": 2, "zero": 1}, {"gpus": 2, "zero": 2}, {"gpus": 4, "zero": 3},
                    {"gpus": 8, "zero": 3, "shard_group": 2}, {"gpus": 2, "zero": 1, "quant": "int8"}):
        assert data_parallel_refusal(config(**options)) is None, options
    assert "Int8Params" in refusal(config(gpus=2, zero=3, quant="int8"), SPEC)
    assert data_parallel_refusal(config(gpus=2, zero=3, offload="optimizer+params")) is None
    assert data_parallel_refusal(config(gpus=2, zero=3, offload="optimizer+params", grad_accum=2)) is None
    assert "CPUOffloadPolicy" in data_parallel_refusal(config(gpus=2, zero=3, offload="optimizer+params",
                                                              optimizer_in_backward=True))
    for options in ({"gpus": 2, "zero": 3, "offload": "optimizer"}, {"gpus": 2, "zero": 1, "offload": "optimizer"}):
        assert "ZeRO-Offload" in data_parallel_refusal(config(**options)), options


@pytest.mark.parametrize("run", ["estimate", "trace"])
def test_int8_under_fsdp2_is_refused_naming_the_field(run):
    """bitsandbytes' Int8Params keeps its row scales on the parameter, which FSDP2's sharding drops: no stack runs
    it, so neither the estimate nor the trace gives a figure for it (it was modelled on a single-GPU trace)."""
    from memtui.engine.errors import InputError
    from memtui.engine.trace import trace

    with pytest.raises(InputError, match="int8 under --zero 3 .FSDP2.: bitsandbytes' Int8Params") as refused:
        (estimate if run == "estimate" else trace)(config(gpus=2, zero=3, quant="int8"), model=SPEC)
    assert refused.value.field == "quant"


def test_ddp_beside_4_bit_weights_buckets_the_adapters_gradients_only():
    """The frozen 4-bit weights have no gradients: DDP's buckets hold the adapters' (fp32 here), as the estimate's
    DDP term says; the weights are the one-GPU trace's."""
    traced, alone = _traced(gpus=2, zero=0), _traced(gpus=1)
    assert any("DDP at world size 2" in line for line in traced.traced), traced.traced
    assert traced.budget.model_states.weights == alone.budget.model_states.weights
    _agrees({"gpus": 2, "zero": 0})
    _agrees({"gpus": 2, "zero": 1})


@pytest.mark.parametrize("options", [{"gpus": 2, "zero": 3}, {"gpus": 2, "zero": 2}, {"gpus": 4, "zero": 3}])
def test_fsdp2_shards_the_packed_weights_and_keeps_their_statistics_whole(options):
    """Between steps a rank holds 1/dp of the parameters and every 4-bit layer's quantization statistics whole:
    weights(dp) = (weights(1) - whole) / dp + whole with one `whole` at every world size, no smaller than the
    statistics themselves (absmax, nested absmax, code, offset per layer, each a 512-byte block or more; the rest
    is the norms' shards, rounded up to a block). Sharded statistics would leave `whole` near zero."""
    traced, alone = _traced(**options), _traced(gpus=1)
    assert QLORA_FSDP2 in traced.traced, traced.traced
    dp = options["gpus"]
    whole = (dp * traced.budget.model_states.weights - alone.budget.model_states.weights) / (dp - 1)
    statistics = 0
    for linear in SPEC.linears:
        blocks = -(-linear.in_features * linear.out_features // 64)
        statistics += -(-blocks // 512) * 512 + 3 * 512  # absmax; nested absmax, code and offset: one block each
    statistics *= SPEC.num_layers
    norms = (2 * SPEC.num_layers + 1) * 512
    assert statistics <= whole <= statistics + norms + 2048, (whole, statistics)
    _agrees(options)


def test_qlora_pipeline_stages_with_ddp_are_traced_and_estimated_per_rank():
    """QLoRA's stages with DDP on each (the frozen 4-bit weights outside its buckets): traced, not refused (beside
    FSDP2 too: tests/test_trace_pp_lora.py). Measured: each rank 25 KiB under the trace (-0.035%), the tiny width's
    one-GPU error."""
    from memtui.engine.estimator.layout import pipeline_refusal
    from memtui.engine.trace import trace

    spec = small_llama(layers=4)
    training = config(gpus=4, zero=0, pp=2, microbatches=2)
    assert pipeline_refusal(training, spec) is None
    assert "tensor parallelism" in refusal(config(gpus=4, tp=2, pp=2, microbatches=2), spec)
    traced = trace(training, model=spec)
    assert any(line.startswith("DDP on each stage over dp 2") for line in traced.traced), traced.traced
    estimated = estimate(training, model=spec)
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes == pytest.approx(traced_rank.tensor_peak_bytes, rel=0.001)


FULL = {"quant": "none", "lora_rank": 0, "precision": "bf16-mixed"}


@pytest.mark.parametrize("options", [{"gpus": 2, "zero": 3, "offload": "optimizer+params"},
                                     {"gpus": 2, "zero": 3, "offload": "optimizer+params", **FULL}])
def test_fsdp2_cpu_offload_keeps_the_shards_gradients_and_optimizer_on_the_host(options):
    """CPUOffloadPolicy: between steps the device holds no shard, no gradient and no optimizer state (a 4-bit
    layer's statistics excepted: not parameters, they stay on the GPU); the peak is FSDP2's without them."""
    from memtui.engine.trace.parallel import CPU_OFFLOAD

    traced = _traced(**options)
    assert CPU_OFFLOAD in traced.traced, traced.traced
    on_device = _traced(**{**options, "offload": "none"})
    states, kept = traced.budget.model_states, on_device.budget.model_states
    assert states.optimizer_states == 0 < kept.optimizer_states
    assert states.weights < kept.weights // 10  # the buffers (rotary, 4-bit statistics) alone
    if "quant" not in options:
        # QLoRA's peak (backward's first moments) holds no reduced gradient yet: the difference is the resident
        # shards and the optimizer's states, nothing else. The estimate agrees as it does without offload.
        assert (on_device.traced_tensor_peak_bytes - traced.traced_tensor_peak_bytes
                == kept.weights - states.weights + kept.optimizer_states)
        _agrees(options)
    # The full fine-tune's FSDP2 estimate is a few percent off at this tiny width with or without offload (exact at
    # real widths: docs/accuracy-parallel.md), so only the trace is checked here.
    assert traced.peak_phase == "backward" and on_device.traced_tensor_peak_bytes > traced.traced_tensor_peak_bytes
