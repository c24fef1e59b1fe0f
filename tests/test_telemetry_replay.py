"""Recorded NVML streams replay through the live code path: Nvml reader, sampler source, SampleSeries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtui.engine.telemetry.nvml import NvmlDevice, NvmlReading
from memtui.engine.telemetry.recording import NvmlRecorder, read_recording, replay_device, replay_samples
from memtui.engine.telemetry.series import SampleSeries

DATA = Path(__file__).parent / "data"
H100 = DATA / "nvml_h100_synthetic.jsonl"
MIG = DATA / "nvml_mig_synthetic.jsonl"


def raw_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def test_fixtures_say_they_are_synthetic():
    for path in (H100, MIG):
        header, records = read_recording(path)
        assert header["synthetic"] is True and "NOT recorded from a real GPU" in header["source"]
        assert len(records) == 120  # 6 s at 20 Hz


def test_replay_yields_what_a_live_run_would_emit():
    records = raw_records(H100)
    samples = list(replay_samples(H100))
    assert len(samples) == len(records)
    for sample, record in zip(samples, records, strict=True):
        assert sample["t"] == record["t"]
        assert sample["nvml_used"] == record["memory"]["used"]
        mine = [p["usedGpuMemory"] for p in record["processes"] if p["pid"] == 4242]
        assert sample["nvml_process"] == (mine[0] if mine else None)
        assert sample["allocated"] is None and sample["rss"] is None  # NVML only: the rest is N/A


def test_series_keeps_the_peak_whatever_the_chart_width():
    series = SampleSeries()
    for sample in replay_samples(H100):
        series.add(sample)
    expected = max(p["usedGpuMemory"] for r in raw_records(H100) for p in r["processes"])
    assert series.peak("nvml_process") == expected
    for width in (1, 7, 33, 500):
        columns = series.buckets("nvml_process", width)
        assert max(value for value in columns if value is not None) == expected
    assert series.first_time("nvml_process") == pytest.approx(1.0)
    assert series.peak("allocated") is None and not series.has("rss")


def test_mig_stream_has_device_memory_and_na_per_process():
    samples = list(replay_samples(MIG))
    assert samples and all(sample["nvml_process"] is None for sample in samples)
    assert all(sample["nvml_used"] is not None for sample in samples)
    device = replay_device(MIG)
    assert device is not None and device.mig_mode is True and device.name == "NVIDIA H100 80GB HBM3"


def test_record_then_replay_round_trip(tmp_path):
    device = NvmlDevice(index=0, name="NVIDIA L4", uuid="GPU-1", driver_version="550.54.15",
                        memory_total=24 << 30, compute_capability="8.9", mig_mode=None)
    path = tmp_path / "run.jsonl"
    recorder = NvmlRecorder(path, device=device, pids=[77], started=100.0, hz=20)
    readings = [
        NvmlReading(used=1 << 30, free=23 << 30, total=24 << 30, processes=((77, 512 << 20),)),
        NvmlReading(used=None, free=None, total=None, processes=None),  # a query NVML refused
        NvmlReading(used=3 << 30, free=21 << 30, total=24 << 30, processes=((77, 2 << 30), (80, None))),
    ]
    for index, reading in enumerate(readings):
        recorder.record(100.0 + 0.05 * (index + 1), reading)
    recorder.close()
    samples = list(replay_samples(path))
    assert [s["nvml_used"] for s in samples] == [1 << 30, None, 3 << 30]
    assert [s["nvml_process"] for s in samples] == [512 << 20, None, 2 << 30]
    assert [s["t"] for s in samples] == [0.05, 0.1, 0.15]
    assert replay_device(path).compute_capability == "8.9"


def test_malformed_recording_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(H100.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        read_recording(path)
    path.write_text('{"format": "something else"}\n')
    with pytest.raises(ValueError, match="not a memtui-nvml-stream"):
        read_recording(path)


def test_series_counts_a_peak_between_two_samples_and_decimation_keeps_maxima():
    series = SampleSeries(max_points=8)
    for index in range(40):
        peak = 900 if index == 13 else None
        series.add({"type": "sample", "t": index * 0.05, "allocated": 100 + index, "allocated_peak": peak})
    assert series.peak("allocated") == 900
    assert len(series.times) <= 8
    assert max(v for v in series.values["allocated"] if v is not None) == 900
    series.add({"type": "phase", "t": 1.0, "step": 2, "phase": "backward"})
    assert series.phases[-1].phase == "backward" and series.samples == 40
