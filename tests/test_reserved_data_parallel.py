"""The estimator's reserved peak of a data-parallel rank: its step program with FSDP2's gathers, reshards and
reduce-scatters on their streams (memtui.engine.estimator.fsdp_sequence), or with DDP's buckets
(memtui.engine.estimator.ddp_sequence), replayed through the allocator model, against the trace's replay of the
real program on a fake process group, stream by stream."""

from __future__ import annotations

import json

import pytest

from memtui.cli import main
from memtui.engine.allocator import replay
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.estimator.reserved import allocation_sequence, replay_step
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig
from tests.test_reserved import MiB, small_llama


def _by_stream(sequence) -> dict[int, int]:
    return {stream: replay([event for event in sequence if event[2] == stream]).reserved_peak_bytes
            for stream in sorted({event[2] for event in sequence})}


# Measured (4 layers of width 512, batch 2 x 512, 4 ranks): every stream's reserved peak equal to the byte on each.
@pytest.mark.parametrize("options", [
    dict(zero=3, checkpointing="full"),
    dict(zero=2, fsdp_param_dtype="compute"),
    dict(zero=3, shard_group=2),  # HSDP: sharded over 2, replicated across the 2 groups
    dict(zero=0),  # DDP: one bucket over every gradient, rebuilt before the second step in the order they came
    dict(zero=0, lora_rank=8, precision="bf16-true"),  # DDP's buckets over the adapters only
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_each_streams_reserved_peak_agrees_with_the_data_parallel_trace(options):
    from memtui.engine.trace.analysis import allocation_sequence as traced_sequence
    from memtui.engine.trace.fake_step import run_fake_steps
    from memtui.engine.trace.parallel import data_parallel

    spec, gpu = small_llama(), resolve_gpu("h100-80gb")
    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", gpus=4, batch_size=2, seq_len=512,
                            **{"precision": "bf16-mixed", **options})
    workspace = cublas_workspace_bytes(gpu)
    with data_parallel(config, spec.num_layers) as parallel:
        log, _extras = run_fake_steps(spec, config, lambda _stage, _fraction: None, parallel=parallel)
    traced = _by_stream(traced_sequence(log, before_forward=(workspace // 2, workspace - workspace // 2)))
    estimated = _by_stream([event if len(event) == 3 else (*event, 0)
                            for event in allocation_sequence(config, spec, workspace, (512, 512))])
    assert len(traced) == (1 if options["zero"] == 0 else 3) and traced.keys() == estimated.keys()
    for stream, traced_bytes in traced.items():
        assert abs(estimated[stream] - traced_bytes) <= 2 * MiB, (stream, estimated[stream] / MiB, traced_bytes / MiB)


# torchtitan's Llama 3 8B (FSDP2 casting to bf16, reducing in fp32); Phi-3 reduced in the dtype autograd made, where
# the analytic model once counted one layer's gradients in flight instead of the last reduce-scatter input beside
# the layer in progress (84 MiB low at 8 GPUs).
@pytest.mark.parametrize(("model", "options"), [
    ("llama-3.1-8b", dict(gpus=8, batch_size=2, seq_len=8192, checkpointing="selective-op", fsdp_param_dtype="compute")),
    ("llama-3.1-8b", dict(gpus=128, batch_size=2, seq_len=8192, checkpointing="selective-op", fsdp_param_dtype="compute")),
    ("phi-3-mini", dict(gpus=8, batch_size=1, seq_len=1024)),
    # ... compiled, its selective checkpoint in each layer's graph (backward's recomputed matmuls among the buffers)
    ("llama-3.1-8b", dict(gpus=8, batch_size=2, seq_len=8192, checkpointing="selective-op", fsdp_param_dtype="compute",
                          compile=True, eager_loss=True)),
], ids=["8b-8", "8b-128", "phi-3-8", "8b-8-compile"])
def test_the_replay_holds_the_estimates_tensor_peak(model, options):
    """The sequence is the estimator's own program: the most it holds at once (in the allocator's 512-byte units)
    is the estimate's tensor peak, with FSDP2's gathered layers, reduce-scatter buffers and sharded gradients in it."""
    spec, gpu = resolve_model(model), resolve_gpu("h100-80gb")
    config = TrainingConfig(model=model, gpu="h100-80gb", zero=3, precision="bf16-mixed", **options)
    sequence = allocation_sequence(config, spec, cublas_workspace_bytes(gpu), (config.seq_len, config.seq_len))
    live: dict = {}
    held = peak = 0
    for key, size, *_stream in sequence:
        if size > 0:
            live[key] = (size + 511) // 512 * 512
            held += live[key]
            peak = max(peak, held)
        else:
            held -= live.pop(key, 0)
    tensor_peak = estimate(config, model=spec, gpu=gpu).tensor_peak_bytes
    assert abs(peak - tensor_peak) <= MiB, (peak, tensor_peak)
    assert replay_step(config, spec, gpu, cublas_workspace_bytes(gpu)).reserved_peak_bytes > peak


def test_a_multi_gpu_fsdp2_estimate_carries_the_reserved_peak(capsys):
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--gpus", "4", "--zero", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reserved_peak_bytes"] >= data["tensor_peak_bytes"] > 0
    assert not any("not replayed" in note for note in data["notes"])
