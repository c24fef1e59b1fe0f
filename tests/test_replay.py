"""`memtui replay`: a snapshot in torch.cuda.memory._dump_snapshot's format, written here by hand with the
segment events torch 2.15's caching allocator makes for its allocations, replayed through the model."""

from __future__ import annotations

import collections
import json
import pickle

import pytest

from memtui.cli import main
from memtui.engine.allocator.snapshot import load_snapshot, replay_snapshot
from memtui.engine.errors import InputError

MiB = 1 << 20
A, B, C, E = 0x7F0000000000, 0x7F0000200000, 0x7F0001600000, 0x7F1000000000


def entry(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": [], "device_free": 0}


def free(addr: int, size: int) -> list[dict]:
    return [entry("free_requested", addr, size), entry("free_completed", addr, size)]


def segment(address: int, total: int, blocks: list[tuple[int, str]], expandable: bool = False) -> dict:
    return {"device": 0, "address": address, "total_size": total, "stream": 0, "segment_type": "large",
            "segment_pool_id": (0, 0), "allocated_size": sum(s for s, st in blocks if st == "active_allocated"),
            "active_size": 0, "requested_size": 0, "is_expandable": expandable,
            "blocks": [{"size": size, "requested_size": size, "address": address, "state": state, "frames": []}
                       for size, state in blocks]}


def cudamalloc_snapshot() -> dict:
    # 1000 B: a 2 MiB small segment; 5 MiB: a 20 MiB segment (kLargeBuffer); 12 MiB + 1 fits the 15 MiB
    # remainder; 15 MiB: a 16 MiB segment; freed, a 14 MiB request takes it (best fit), split.
    trace = [
        entry("segment_alloc", A, 2 * MiB), entry("alloc", A, 1000),
        entry("segment_alloc", B, 20 * MiB), entry("alloc", B, 5 * MiB),
        entry("alloc", B + 5 * MiB, 12 * MiB + 1),
        *free(B, 5 * MiB),
        entry("segment_alloc", C, 16 * MiB), entry("alloc", C, 15 * MiB),
        *free(C, 15 * MiB),
        entry("alloc", C, 14 * MiB),
    ]
    segments = [
        segment(A, 2 * MiB, [(1024, "active_allocated"), (2 * MiB - 1024, "inactive")]),
        segment(B, 20 * MiB, [(5 * MiB, "inactive"), (12 * MiB + 512, "active_allocated"), (3 * MiB - 512, "inactive")]),
        segment(C, 16 * MiB, [(14 * MiB, "active_allocated"), (2 * MiB, "inactive")]),
    ]
    return {"segments": segments, "device_traces": [trace]}


def expandable_snapshot() -> dict:
    trace = [
        entry("segment_map", E, 20 * MiB), entry("alloc", E, 5 * MiB),
        entry("segment_map", E + 20 * MiB, 20 * MiB), entry("alloc", E + 5 * MiB, 30 * MiB),
    ]
    segments = [segment(E, 40 * MiB, [(5 * MiB, "active_allocated"), (30 * MiB, "active_allocated"),
                                      (5 * MiB, "inactive")], expandable=True)]
    return {"segments": segments, "device_traces": [trace],
            "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}


def write(tmp_path, snapshot: dict, name: str = "snap.pickle"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(snapshot))
    return path


def test_the_model_matches_a_recorded_cudamalloc_run_event_by_event(tmp_path):
    result = replay_snapshot(load_snapshot(write(tmp_path, cudamalloc_snapshot())))
    assert result.complete and result.allocations == 5 and result.frees == 2
    assert result.recorded_reserved_peak_bytes == 38 * MiB
    assert result.predicted_reserved_peak_bytes == 38 * MiB
    assert result.predicted_reserved_end_bytes == result.recorded_reserved_end_bytes == 38 * MiB
    assert result.predicted_segments_end == result.recorded_segments_end == 3
    assert result.first_divergence is None


def test_the_recorded_allocator_settings_are_replayed_and_can_be_overridden(tmp_path):
    snapshot = load_snapshot(write(tmp_path, expandable_snapshot()))
    result = replay_snapshot(snapshot)
    assert result.alloc_conf == "expandable_segments:True"
    assert result.predicted_reserved_peak_bytes == result.recorded_reserved_peak_bytes == 40 * MiB
    assert result.predicted_segments_end == 1 and result.first_divergence is None
    from memtui.engine.allocator import parse_alloc_conf

    plain = replay_snapshot(snapshot, parse_alloc_conf(""))  # cudaMalloc segments: 20 MiB + 30 MiB
    assert plain.predicted_reserved_peak_bytes == 50 * MiB
    divergence = plain.first_divergence
    assert divergence is not None and divergence.event == 3
    assert (divergence.predicted_reserved_bytes, divergence.recorded_reserved_bytes) == (50 * MiB, 40 * MiB)


def test_a_trace_that_starts_mid_run_is_flagged(tmp_path):
    snapshot = cudamalloc_snapshot()
    snapshot["device_traces"][0] = snapshot["device_traces"][0][4:]  # lost the first two segment_allocs
    result = replay_snapshot(load_snapshot(write(tmp_path, snapshot)))
    assert not result.complete and result.recorded_start_bytes == 22 * MiB


def test_cli_json(tmp_path, capsys):
    path = write(tmp_path, cudamalloc_snapshot())
    assert main(["replay", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["predicted"]["reserved_peak_bytes"] == data["recorded"]["reserved_peak_bytes"] == 38 * MiB
    assert data["error_pct"]["reserved_peak"] == 0.0 and data["first_divergence"] is None


def test_cli_table(tmp_path, capsys):
    path = write(tmp_path, expandable_snapshot())
    assert main(["replay", str(path), "--alloc-conf", "max_split_size_mb:512"]) == 0
    out = capsys.readouterr().out
    assert "reserved peak" in out and "first divergence at trace event 3" in out


@pytest.mark.parametrize("payload", [
    pickle.dumps({"segments": [], "device_traces": [], "x": collections.OrderedDict()}),
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"cos\nsystem\n(S'true'\ntR.",
])
def test_a_pickle_naming_any_class_is_refused_without_running_it(tmp_path, payload, capsys):
    path = tmp_path / "evil.pickle"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="not a memory snapshot"):
        load_snapshot(path)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SNAPSHOT" in err


def test_bad_alloc_conf_and_missing_file_are_one_line_errors(tmp_path, capsys):
    path = write(tmp_path, cudamalloc_snapshot())
    assert main(["replay", str(path), "--alloc-conf", "expandable_segments:yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expandable_segments" in err and "True, False" in err
    assert main(["replay", str(tmp_path / "missing.pickle")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---- the trace's allocation sequence ------------------------------------------------------------------
def test_the_traced_sequence_is_what_the_allocator_sees():
    from memtui.engine.allocator import FREE, replay
    from memtui.engine.trace.analysis import allocation_sequence
    from memtui.engine.trace.tracker import Allocation, Event, MemoryLog

    def alloc(alloc_id: int, raw: int, host: bool = False, stream: int = 0) -> Allocation:
        return Allocation(alloc_id=alloc_id, nbytes=raw, raw_bytes=raw, phase="forward", step=1, op="op",
                          shape=(), dtype="float32", module="", host=host, stream=stream)

    log = MemoryLog()
    for a in (alloc(0, 5 * MiB), alloc(1, 8, host=True), alloc(2, 12 * MiB + 1), alloc(3, 15 * MiB),
              alloc(4, 5 * MiB, stream=1)):
        log.allocations[a.alloc_id] = a
    log.events = [Event(0, 5 * MiB), Event(1, 512), Event(2, 12 * MiB + 512), Event(0, -5 * MiB), Event(3, 16 * MiB),
                  Event(4, 5 * MiB)]
    log.phase_marks = [(0, 0, "setup"), (1, 1, "forward")]
    sequence = allocation_sequence(log, before_forward=(MiB, MiB))
    # the host tensor is not the device allocator's; the workspaces come at the first forward, never freed
    assert sequence == [(0, 5 * MiB, 0), (-1, MiB, 0), (-2, MiB, 0), (2, 12 * MiB + 1, 0), (0, FREE, 0),
                        (3, 15 * MiB, 0), (4, 5 * MiB, 1)]
    # 20 MiB (5 MiB, then 12 MiB + 1 in its remainder), 2 MiB small segment (the workspaces), 16 MiB, and a
    # 20 MiB segment for stream 1: the 5 MiB freed on stream 0 is in stream 0's pool, not stream 1's
    assert replay(sequence).reserved_peak_bytes == 58 * MiB
    assert replay(sequence[:-1] + [(4, 5 * MiB, 0)]).reserved_peak_bytes == 38 * MiB


def test_trace_reports_the_reserved_peak(capsys):
    import copy

    from memtui.engine.allocator import parse_alloc_conf
    from memtui.engine.model.architectures import model_spec_from_config
    from memtui.engine.model.presets import resolve_model
    from memtui.engine.model.specs import TrainingConfig
    from memtui.engine.trace import trace

    hf = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    hf.update(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=2, vocab_size=512, tie_word_embeddings=True)
    spec = model_spec_from_config(hf, model_id="tiny-llama", source="test")
    config = TrainingConfig(model="llama-3.2-1b", seq_len=64)
    result = trace(config, model=spec)
    data = result.as_json()
    replayed = data["allocator"]
    assert data["reserved_peak_bytes"] == replayed["reserved_peak_bytes"]
    # reserved >= allocated (block sizes) >= the traced tensor peak (512-rounded) plus the workspaces
    assert data["reserved_peak_bytes"] >= replayed["allocated_peak_bytes"] >= data["tensor_peak_bytes"]
    assert data["reserved_peak_bytes"] % (2 * MiB) == 0  # segments are 2 MiB multiples
    expandable = trace(config, model=spec, alloc_config=parse_alloc_conf("expandable_segments:True"))
    assert expandable.budget.reserved_peak_bytes != data["reserved_peak_bytes"]
    assert "expandable_segments:True" in expandable.allocator["alloc_conf"]


def test_trace_bad_alloc_conf_fails_before_tracing(capsys):
    assert main(["trace", "--model", "gpt2", "--alloc-conf", "max_split_size_mb:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_split_size_mb" in err and ">= 20" in err
