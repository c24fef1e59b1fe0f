"""A deep model traced at a few layers and extended: the same log, event by event, as tracing every layer."""

from __future__ import annotations

import pytest

from memtui.engine.model.specs import TrainingConfig
from tests.test_trace import tiny_llama

OPTIONS = [
    dict(precision="bf16-mixed"),
    dict(precision="bf16-mixed", checkpointing="full"),
    dict(precision="bf16-true", lora_rank=4, lora_targets="all-linear"),
    dict(precision="bf16-true", quant="nf4", lora_rank=4),
    dict(precision="32-true", attention="eager", grad_accum=2),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_five_layers_extended_to_nine_are_the_nine_layer_trace(options):
    from memtui.engine.trace.extend import TRACED_LAYERS, extend_log, same_log
    from memtui.engine.trace.fake_step import run_fake_steps

    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=32, **options)
    few, _ = run_fake_steps(tiny_llama(TRACED_LAYERS), config, layer_tags=True)
    every, _ = run_fake_steps(tiny_llama(9), config)
    assert same_log(extend_log(few, TRACED_LAYERS, 9), every)


def test_the_trace_of_a_deep_model_is_the_same_extended_or_traced_at_every_layer(monkeypatch):
    from memtui.engine.trace import extend
    from memtui.engine.trace.runner import trace

    spec = tiny_llama(9)
    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=64, precision="bf16-mixed",
                            checkpointing="full")
    extended = trace(config, model=spec)
    assert any(line.startswith("layers: traced at 5 and 6") for line in extended.traced)
    monkeypatch.setattr(extend, "extension_refusal", lambda *_args, **_kwargs: "every layer")
    every = trace(config, model=spec)
    assert not any(line.startswith("layers:") for line in every.traced)
    first, second = extended.as_json(), every.as_json()
    for data in (first, second):
        data.pop("seconds")
        data.pop("traced")
    assert first == second


@pytest.mark.parametrize("options", [dict(gpus=4, zero=3), dict(gpus=2, tp=2)], ids=["fsdp2", "tp"])
def test_a_parallel_trace_is_the_same_extended_or_traced_at_every_layer(monkeypatch, options):
    """FSDP2's per-layer all-gathers and reduce-scatters and DTensor's per-layer collectives repeat layer by layer
    too: the data- and tensor-parallel traces are extended from 5 and 6 layers (an 8B model at tp 2: 10 s, was
    107 s) and equal the trace of every layer (TP x FSDP2 was checked the same way on Llama-3.2-3B). DDP's
    buckets do not repeat per layer: it is traced whole."""
    from memtui.engine.trace import extend
    from memtui.engine.trace.runner import trace
    from tests.test_trace_parallel import tiny_untied_llama

    spec = tiny_untied_llama().model_copy(update={"num_layers": 7, "config": {**tiny_untied_llama().config,
                                                                              "num_hidden_layers": 7}})
    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=32, precision="bf16-mixed", **options)
    extended = trace(config, model=spec)
    assert any(line.startswith("layers: traced at 5 and 6") for line in extended.traced), extended.traced
    monkeypatch.setattr(extend, "extension_refusal", lambda *_args, **_kwargs: "every layer")
    every = trace(config, model=spec)
    first, second = extended.as_json(), every.as_json()
    for data in (first, second):
        data.pop("seconds")
        data.pop("traced")
    assert first == second
