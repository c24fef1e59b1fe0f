"""The estimator's reserved peak: its simulated step replayed through the caching-allocator model, against the
trace's replay of the real step; the CLI's fields and errors; the planner's budget shows it."""

from __future__ import annotations

import copy
import json

import pytest

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes
from memtui.engine.estimator.reserved import parse_seq_lens, replay_step, with_reserved
from memtui.engine.errors import InputError
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig

MiB = 1 << 20


def small_llama(*, tied: bool = False):
    """Llama-3 shrunk to 4 layers of width 512 with a 32k vocabulary: tensors of 0.1-60 MiB, so the allocator's
    small pool, 20 MiB segments and large blocks all take part, traced in seconds."""
    config = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    config.update(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  num_hidden_layers=4, vocab_size=32000, tie_word_embeddings=tied)
    return model_spec_from_config(config, model_id="small-llama", source="test")


# Measured (batch 2 x 512, H100): estimate and trace reserved equal to the byte on the first three, 2 MiB apart
# (0.2%) on SGD with momentum; eager attention with LoRA on every linear layer is 12 MiB (1.5%) above.
AGREEMENT = [
    dict(precision="32-true"),
    dict(precision="bf16-mixed", checkpointing="full"),
    dict(precision="bf16-true", optimizer_impl="for-loop"),
    dict(precision="32-true", optimizer="sgd-momentum"),
]


@pytest.mark.parametrize("options", AGREEMENT, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_reserved_agrees_with_the_trace(options):
    from memtui.engine.trace.runner import trace

    spec, gpu = small_llama(), resolve_gpu("h100-80gb")
    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", batch_size=2, seq_len=512, **options)
    traced = trace(config, model=spec, gpu=gpu).allocator["reserved_peak_bytes"]
    estimated = replay_step(config, spec, gpu, cublas_workspace_bytes(gpu)).reserved_peak_bytes
    assert abs(estimated - traced) <= max(0.01 * traced, 2 * MiB), (estimated / MiB, traced / MiB)


def test_the_replay_is_cached_per_option_set():
    spec, gpu = small_llama(), resolve_gpu("h100-80gb")
    config = TrainingConfig(model="llama-3.2-1b", batch_size=1, seq_len=256)
    first = replay_step(config, spec, gpu, cublas_workspace_bytes(gpu))
    assert replay_step(config, spec, gpu, cublas_workspace_bytes(gpu)) is first
    longer = replay_step(config.model_copy(update={"seq_len": 512}), spec, gpu, cublas_workspace_bytes(gpu))
    assert longer is not first and longer.allocated_peak_bytes > first.allocated_peak_bytes


def test_replayed_device_peak_is_reserved_plus_context_and_the_verdict_stays_one():
    spec, gpu = small_llama(), resolve_gpu("a100-80gb")
    config = TrainingConfig(model="llama-3.2-1b", gpu="a100-80gb", batch_size=2, seq_len=512)
    budget = with_reserved(estimate(config, model=spec, gpu=gpu), config, spec, gpu)
    assert budget.device_overhead == {"cuda_context": cuda_context_bytes(gpu), "nccl": 0}
    assert budget.replayed_device_peak_bytes == budget.reserved_peak_bytes + cuda_context_bytes(gpu)
    plain = estimate(config, model=spec, gpu=gpu)  # one verdict everywhere: the estimate's device peak decides
    assert (budget.device_peak_bytes, budget.fits, budget.per_gpu) == (plain.device_peak_bytes, plain.fits, plain.per_gpu)
    assert budget.fragmentation_bytes >= 0 and budget.replayed_seq_lens == [512, 512]


def test_estimate_json_carries_the_replay(capsys):
    assert main(["estimate", "--model", "gpt2", "--gpu", "t4", "--seq-len", "512", "--seq-lens", "256,512,1024",
                 "--steps", "3", "--alloc-conf", "expandable_segments:True", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["replayed_seq_lens"] == [256, 512, 1024, 256]
    assert data["reserved_peak_bytes"] >= data["reserved_peak_bytes"] - data["fragmentation_bytes"] > 0
    assert data["replayed_device_peak_bytes"] == data["reserved_peak_bytes"] + sum(data["device_overhead"].values())


def test_estimate_json_without_a_replay_says_why(capsys):
    assert main(["estimate", "--model", "llama-3.2-1b", "--gpus", "2", "--zero", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reserved_peak_bytes"] is None and data["fragmentation_bytes"] is None
    assert any("not replayed" in note and "ZeRO-1" in note for note in data["notes"])


@pytest.mark.parametrize("argv", [
    ["--seq-lens", "512,abc"], ["--seq-lens", "0"], ["--seq-lens", "uniform:2048-256"], ["--seq-lens", "uniform:1-x"],
    ["--steps", "0"], ["--steps", "two"], ["--alloc-conf", "max_split_size_mb:-1"],
    ["--seq-lens", "512,2048", "--seq-len", "512"],  # GPT-2 has 1024 learned positions
])
def test_replay_flags_refuse_bad_input_in_one_line(capsys, argv):
    from memtui.cli import main as cli_main

    try:
        code = cli_main(["estimate", "--model", "gpt2", *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert argv[0] in err


def test_uniform_seq_lens_are_drawn_reproducibly_in_range():
    lengths = parse_seq_lens("uniform:256-2048", 9)
    assert len(lengths) == 10 and all(256 <= length <= 2048 for length in lengths)
    assert parse_seq_lens("uniform:256-2048", 9) == lengths and len(set(lengths)) > 1
    assert parse_seq_lens("512, 1024", 2) == (512, 1024, 512)
    with pytest.raises(InputError):
        parse_seq_lens("", 1)



@pytest.mark.anyio
async def test_budget_panel_shows_reserved_and_fragmentation():
    """The planner draws the estimate at once; the replay follows from a worker into the budget table: the
    reserved peak, the fragmentation and the device peak built on them."""
    from memtui.engine.units import gib_number
    from memtui.tui.app import MemtuiApp
    from memtui.tui.widgets.budget import ComponentTable

    app = MemtuiApp(gpu_detector=None)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(ComponentTable)
        for _ in range(300):  # the default 8B step replays in about half a second
            await pilot.pause(0.05)
            if table.replayed is not None:
                break
        replayed = table.replayed
        assert replayed is not None and replayed.reserved_peak_bytes is not None
        assert replayed.config == app.result.budget.config
        await pilot.pause()
        lines = table.render().plain.splitlines()
        rows = {line[:22].strip(): line.split() for line in lines}
        assert gib_number(replayed.reserved_peak_bytes) in rows["Reserved (allocator)"]
        assert gib_number(replayed.fragmentation_bytes) in rows["of it fragmentation"]
        assert gib_number(replayed.replayed_device_peak_bytes) in rows["Device peak, replayed"]
        assert gib_number(app.result.budget.tensor_peak_bytes) in rows["Tensor peak (PyTorch)"]


@pytest.mark.parametrize(("model", "options"), [
    ("llama-3.2-1b", dict(precision="bf16-mixed", attention="eager", checkpointing="full")),
    ("gemma-2-9b", dict(precision="bf16-true", lora_rank=8, checkpointing="selective")),
])
def test_a_deep_step_is_its_middle_layer_repeated(model, options):
    """Past five layers the allocation program repeats the five-layer replay's middle layer: the same events,
    sizes, gradients and leftovers as replaying every layer."""
    from memtui.engine.estimator.sim import program
    from memtui.engine.estimator.sim.core import lf_eval

    spec = resolve_model(model)
    config = TrainingConfig(model=model, **options)
    dims, opts = program.dims_for(spec), program.options_for(config, spec)
    expanded = program._expanded_program(dims, opts, 8)
    full = program.every_layer_program(dims, opts, 8)
    values = (1.0, 2048.0, 2048.0 * 1024, 1024.0, 1024.0 ** 2)

    def sizes(allocation_program):
        return ([(index, None if size is None else lf_eval(size, values)) for index, size in allocation_program.events],
                [lf_eval(size, values) for size, *_ in allocation_program.parameters],
                allocation_program.gradients, sorted(allocation_program.leftover), allocation_program.places,
                allocation_program.layer_parameters)

    assert expanded is not None and sizes(expanded) == sizes(full)


def test_a_70b_step_replays_in_about_half_a_second():
    import time

    from memtui.engine.estimator.sim.program import allocation_program

    allocation_program.cache_clear()
    spec, gpu = resolve_model("llama-3.1-70b"), resolve_gpu("h100-80gb")
    config = TrainingConfig(model="llama-3.1-70b", precision="bf16-true", checkpointing="full", seq_len=4096)
    started = time.perf_counter()
    replayed = replay_step(config, spec, gpu, cublas_workspace_bytes(gpu))
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert replay_step(config, spec, gpu, cublas_workspace_bytes(gpu)) is replayed
    again = time.perf_counter() - started
    # 0.4-0.7 s measured on 2 shared cores (load 5-7); the bound leaves room for a slower machine.
    assert first < 3.0 and again < 0.01, (first, again)
    assert replayed.events > 50_000
