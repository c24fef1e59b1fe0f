"""Gradient accumulation (--grad-accum) and the optimizer stepped in backward (--optimizer-in-backward):
the estimate against the trace, what each does to the gradients at the peak, and their refusals."""

from __future__ import annotations

import json

import pytest

from memtui.cli import main
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.planning.ladder import savings_ladder
from tests.test_trace import tiny_llama

ESTIMATE_VS_TRACE = [
    # At 4 layers the peak is backward's end of a later micro-batch, where a tied head's new gradient waits for the
    # embedding's beside the one accumulated (the estimate missed it: -9.2%).
    dict(model="llama-3.2-1b", precision="bf16-true", batch_size=1, seq_len=512, grad_accum=6, layers=4),
    # Data parallel, traced for real: DDP under no_sync (unsharded gradients), FSDP2 accumulating its shards.
    dict(model="qwen2.5-0.5b", precision="bf16-mixed", batch_size=1, seq_len=512, grad_accum=2, gpus=2, layers=4),
    dict(model="qwen2.5-0.5b", precision="bf16-mixed", batch_size=2, seq_len=1024, grad_accum=2, gpus=2, zero=2),
    dict(model="llama-3.2-1b", precision="bf16-mixed", batch_size=2, seq_len=512, optimizer_in_backward=True),
    # torchtune's chunked head on a tied embedding: each chunk's whole-vocabulary gradient summed in autograd's input
    # buffer, nothing stepped until the embedding's joins (the estimate was one head gradient short).
    dict(model="llama-3.2-3b", precision="bf16-true", batch_size=2, seq_len=1024, optimizer_in_backward=True,
         loss="chunked", loss_chunks=8, layers=2),
    # A parameter steps once the node that made its gradient has returned: DeepSeek-V3's head steps after its
    # matmul's backward let the logits' gradient go (the estimate stepped it beside that gradient: +0.44%).
    dict(model="deepseek-v3", precision="bf16-true", batch_size=1, seq_len=1024, optimizer_in_backward=True, layers=3),
]


@pytest.mark.parametrize("options", ESTIMATE_VS_TRACE, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_matches_trace(options):
    from memtui.engine.model.presets import resolve_model
    from memtui.engine.trace.generic import at_depth
    from memtui.engine.trace.runner import trace

    options = dict(options)
    layers = options.pop("layers", None)
    config = TrainingConfig(gpu="h100-80gb", **options)
    spec = at_depth(resolve_model(config.model), layers) if layers else None  # None: the preset itself
    result = trace(config, model=spec)
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - result.traced_tensor_peak_bytes) / result.traced_tensor_peak_bytes < 0.002, (
        estimated, result.traced_tensor_peak_bytes)
    if config.grad_accum > 4:  # traced: 4 micro-batches per step, and it says so
        assert any("4 of 6 micro-batches" in line for line in result.traced)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_an_untied_chunked_head_steps_in_backward_once_its_chunks_are_summed(impl):
    """An untied head under the chunked loss: each chunk's weight gradient is summed in autograd's input buffer and
    the head steps (its post-accumulate-grad hook) only after the last chunk's, so at the sum of a chunk the running
    sum, the new chunk's gradient and their sum are alive, and nothing has stepped yet. The estimate stepped the first
    chunk's gradient at once (fused: -9.8%, one head short; foreach: +0.16%, its step one chunk early)."""
    import copy

    from memtui.engine.model.architectures import model_spec_from_config
    from memtui.engine.model.presets import resolve_model
    from memtui.engine.trace.runner import trace

    hf = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    hf.update(hidden_size=2048, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              num_hidden_layers=2, vocab_size=32000, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    spec = model_spec_from_config(hf, model_id="small-untied", source="test")
    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", precision="bf16-true", batch_size=1, seq_len=256,
                            loss="chunked", optimizer_in_backward=True, optimizer_impl=impl)
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - traced) / traced < 0.0005, (estimated, traced)


@pytest.mark.parametrize("options", [dict(grad_accum=3), dict(optimizer_in_backward=True)],
                         ids=["grad-accum", "optimizer-in-backward"])
def test_fake_trace_equals_a_real_cpu_run(options):
    from memtui.engine.trace.analysis import summarize
    from memtui.engine.trace.fake_step import run_fake_steps

    config = TrainingConfig(model="llama-3.2-1b", precision="bf16-mixed", batch_size=2, seq_len=32, **options)
    fake, real = (summarize(run_fake_steps(tiny_llama(), config, fake=fake)[0]) for fake in (True, False))
    assert fake.peak_bytes == real.peak_bytes and fake.breakdown == real.breakdown


def test_real_steps_accumulate_and_step_in_backward_like_the_plain_step():
    """The hooks step every parameter once per step, and the accumulated gradient is the mean's."""
    import torch

    from memtui.engine.torchside.build import build_model, build_optimizer, training_step

    spec = tiny_llama()
    results = {}
    for name, options in {"plain": {}, "in-backward": dict(optimizer_in_backward=True)}.items():
        config = TrainingConfig(model="llama-3.2-1b", precision="32-true", optimizer="sgd", batch_size=2,
                                seq_len=16, **options)
        torch.manual_seed(0)
        model = build_model(spec, config)
        optimizer = build_optimizer(model, config, device_type="cpu")
        ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        training_step(model, optimizer, ids, ids, autocast=lambda: torch.autocast("cpu", enabled=False))
        assert all(p.grad is None for p in model.parameters())
        results[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(results["plain"], results["in-backward"], atol=1e-6)


def test_gradients_at_the_peak():
    base = dict(model="llama-3.2-1b", gpu="h100-80gb", precision="bf16-mixed", batch_size=2, seq_len=1024)
    plain, accumulating = (estimate(TrainingConfig(**base, **extra)) for extra in ({}, dict(grad_accum=2)))
    full_gradients = plain.model_states.gradients
    # The second micro-batch's backward: the whole set of gradients beside the activations.
    assert accumulating.peak_phase == "backward" and accumulating.per_gpu.gradients >= full_gradients
    assert accumulating.tensor_peak_bytes > plain.tensor_peak_bytes
    # Short sequences, where the gradients at the optimizer step set the peak: never a full set in backward,
    # at most the tied embedding's (it waits for the embedding's backward).
    short = dict(base, batch_size=1, seq_len=256)
    plain, in_backward = (estimate(TrainingConfig(**short, **extra)) for extra in ({}, dict(optimizer_in_backward=True)))
    assert in_backward.per_gpu.gradients < full_gradients and in_backward.model_states.gradients == 0
    assert in_backward.tensor_peak_bytes < plain.tensor_peak_bytes
    assert [point.phase for point in in_backward.timeline] == ["start", "forward", "loss", "backward", "end"]


@pytest.mark.parametrize(("options", "fields"), [
    (dict(optimizer_in_backward=True, grad_accum=4), "--grad-accum"),
    (dict(optimizer_in_backward=True, zero=1, gpus=2), "--zero"),
    (dict(optimizer_in_backward=True, precision="16-mixed"), "16-mixed"),
])
def test_refusals_are_one_line_naming_the_fields(options, fields):
    with pytest.raises(InputError) as raised:
        estimate(TrainingConfig(model="qwen2.5-0.5b", **options))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--optimizer-in-backward") and fields in message


def test_cli(capsys):
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--grad-accum", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["grad_accum"] == 2
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--optimizer-in-backward", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["optimizer_in_backward"] is True
    with pytest.raises(SystemExit) as refused:  # argparse's own check of the bounds
        main(["estimate", "--model", "qwen2.5-0.5b", "--grad-accum", "0"])
    assert refused.value.code == 2 and "--grad-accum: must be at least 1" in capsys.readouterr().err
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--grad-accum", "2", "--optimizer-in-backward"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--grad-accum" in err and "Traceback" not in err


def test_ladder_rung_removes_the_gradients():
    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", precision="bf16-true", seq_len=256,
                            optimizer_in_backward=True)
    rung = savings_ladder(config).final
    assert rung.keys == ("optimizer_in_backward",) and rung.label == "optimizer step in backward"
    assert rung.removed["gradients"] > 0 and rung.removed_total > 0
