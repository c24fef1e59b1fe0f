"""Each allocation of a traced step is made on a stream, and the caching allocator keeps each stream's pools apart:
FSDP2's reduce-scatter outputs (the sharded gradients) never reuse the activations' blocks freed in backward."""

from __future__ import annotations

import json

from memtui.cli import main
from memtui.engine.allocator import replay
from memtui.engine.model.specs import TrainingConfig
from tests.test_trace_parallel import SPEC, config


def _fsdp2_log():
    from memtui.engine.trace.fake_step import run_fake_steps
    from memtui.engine.trace.parallel import data_parallel

    training = config(gpus=4, zero=3)
    with data_parallel(training, SPEC.num_layers) as parallel:
        log, _extras = run_fake_steps(SPEC, training, lambda _stage, _fraction: None, parallel=parallel)
    return log


def test_fsdp2_gradients_live_on_the_reduce_scatter_stream_and_gathers_on_the_copy_in_stream():
    from memtui.engine.trace.analysis import allocation_sequence

    log = _fsdp2_log()
    stream_of = {alloc_id: log.stream_names[alloc.stream] for alloc_id, alloc in log.allocations.items()}
    steady = [alloc for alloc in log.allocations.values() if alloc.step == 2]
    gradients = [alloc for alloc in steady if alloc.category == "gradients"]
    # foreach_reduce makes its output under `with device_handle.stream(reduce_scatter_stream)`; the sharded
    # gradients are views of it until zero_grad
    assert gradients and {stream_of[alloc.alloc_id] for alloc in gradients} == {"FSDP2 reduce-scatter"}
    # foreach_all_gather makes the all-gather output on the copy-in stream; the activations are the default's
    assert any(stream_of[alloc.alloc_id] == "FSDP2 all-gather copy-in" for alloc in steady)
    # and nothing else: what the layers compute is on the default stream
    assert {alloc.op for alloc in steady if stream_of[alloc.alloc_id] != "default"} == {"empty.memory_format"}
    sequence = allocation_sequence(log)
    per_stream = sum(replay([event for event in sequence if event[2] == stream]).reserved_peak_bytes
                     for stream in {event[2] for event in sequence})
    # pools never shared: the reserved peak is each stream's own, added up (reserved only grows, unbounded)
    assert replay(sequence).reserved_peak_bytes == per_stream
    assert replay([(key, size) for key, size, _stream in sequence]).reserved_peak_bytes < per_stream


def test_trace_json_reports_the_reserved_peak_of_each_stream(capsys):
    code = main(["trace", "--model", "qwen2.5-0.5b", "--batch-size", "1", "--seq-len", "64", "--gpus", "4",
                 "--zero", "3", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    by_stream = data["allocator"]["reserved_by_stream"]
    assert set(by_stream) == {"default", "FSDP2 all-gather copy-in", "FSDP2 reduce-scatter"}
    assert sum(by_stream.values()) == data["reserved_peak_bytes"]
    # the reduce-scatter pool holds every sharded gradient at the step's end, apart from the default pool
    assert by_stream["FSDP2 reduce-scatter"] >= data["model_states"]["gradients"]


def test_a_single_gpu_trace_is_one_stream():
    from memtui.engine.trace import trace

    result = trace(TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=32), model=SPEC)
    assert "reserved_by_stream" not in result.allocator
