"""Pipeline parallelism (issue 13): every rank of torch.distributed.pipelining's schedules traced on the fake process
group, and the estimator's per-rank budgets held to those traces."""

from __future__ import annotations

import copy
import json

import pytest

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.estimator.layout import pipeline_refusal, pipeline_stage_layers
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.estimator.pipeline import rank_actions, rank_schedule
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig


def small_llama(layers: int = 4, vocab: int = 2048):
    """Llama-3 shrunk (untied, a 2048 vocabulary, width 256): the pipeline's code paths in seconds per rank."""
    config = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    config.update(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False)
    return model_spec_from_config(config, model_id="small-llama", source="test")


SPEC = small_llama()


def pipeline(schedule: str, pp: int = 2, microbatches: int = 4, batch_size: int = 4) -> TrainingConfig:
    return TrainingConfig(model="llama-3.2-1b", batch_size=batch_size, seq_len=128, gpus=pp, pp=pp,
                          pp_schedule=schedule, microbatches=microbatches)


def in_flight(actions) -> int:
    """The most micro-batches a rank holds between their forward and backward."""
    held = most = 0
    for kind, _stage, _microbatch in actions:
        held += 1 if kind == "F" else -1
        most = max(most, held)
    return most


def test_schedules_order_forwards_and_backwards_as_torch_does():
    gpipe = rank_actions(pipeline("gpipe", pp=4, microbatches=8), 0)
    assert [kind for kind, _s, _m in gpipe] == ["F"] * 8 + ["B"] * 8
    # Schedule1F1B: rank r warms up with pp - r forwards, so the first stage holds the most micro-batches.
    assert [in_flight(rank_actions(pipeline("1f1b", pp=4, microbatches=8), rank)) for rank in range(4)] == [4, 3, 2, 1]
    one_f_one_b = rank_actions(pipeline("1f1b", pp=4, microbatches=8), 1)
    assert [kind for kind, _s, _m in one_f_one_b][:6] == ["F", "F", "F", "B", "F", "B"]
    # Interleaved: rank r runs stages r and r + pp, each micro-batch forward and backward once on each.
    interleaved = rank_actions(pipeline("interleaved-1f1b", pp=2, microbatches=4), 1)
    assert sorted(interleaved) == sorted((kind, stage, mb) for kind in "FB" for stage in (1, 3) for mb in range(4))
    assert pipeline_stage_layers(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_every_rank_is_traced_and_the_estimate_is_exact_per_rank(schedule):
    """The trace runs PipelineStage and the schedule on every rank of the fake process group; the estimator's
    per-rank budgets (micro-batches in flight, received inputs and output gradients, the last stage's logits and
    inputs kept by its losses) are within 0.5% of each rank's traced tensor peak (measured: within 0.02%)."""
    import torch.distributed as dist

    from memtui.engine.trace import trace

    config = pipeline(schedule)
    traced = trace(config, model=SPEC)
    assert not dist.is_initialized()
    assert any(line.startswith("pipeline parallel (traced)") for line in traced.traced), traced.traced
    assert not any("pipeline" in line for line in traced.modelled), traced.modelled
    estimated = estimate(config, model=SPEC)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert [stage.rank for stage in traced.budget.stages] == [0, 1] == [stage.rank for stage in estimated.stages]
    first, last = traced.budget.stages
    assert (first.embedding, first.head, last.embedding, last.head) == (True, False, False, True)
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=0.005), (schedule, traced_rank.rank)
    # The budget is the rank with the largest peak, in both.
    assert traced.budget.tensor_peak_bytes == max(stage.tensor_peak_bytes for stage in traced.budget.stages)
    assert estimated.tensor_peak_bytes == max(stage.tensor_peak_bytes for stage in estimated.stages)


def test_interleaved_schedule_is_the_runtimes_own_order():
    """Interleaved 1F1B runs through _PipelineScheduleRuntime, whose lowering (_add_send_recv, _add_wait_send)
    decides when receive buffers are made and sends let go; the estimator's port of it gives torch's own
    pipeline_order_with_comms, every action of every rank (in-place, so no model and no tracing)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for pp, microbatches in ((2, 4), (4, 4), (4, 8), (8, 8), (3, 6)):
        dist.init_process_group("fake", rank=0, world_size=pp, store=FakeStore())
        try:
            stages = [PipelineStage(torch.nn.Linear(4, 4), index, 2 * pp, torch.device("cpu"),
                                    input_args=torch.empty(1, 4), output_args=torch.empty(1, 4))
                      for index in (0, pp)]
            lowered = ScheduleInterleaved1F1B(stages, microbatches).pipeline_order_with_comms
        finally:
            dist.destroy_process_group()
        config = pipeline("interleaved-1f1b", pp=pp, microbatches=microbatches, batch_size=microbatches)
        for rank in range(pp):
            expected = [(action.computation_type.value, action.stage_index,
                         -1 if action.microbatch_index is None else action.microbatch_index)
                        for action in lowered[rank]]
            assert rank_schedule(config, rank) == expected, (pp, microbatches, rank)


DEEP = small_llama(layers=8, vocab=16384)


@pytest.mark.parametrize("schedule, pp", [("interleaved-1f1b", 4), ("1f1b", 8)])
def test_deeper_pipelines_are_exact_on_every_rank(schedule, pp):
    """Every rank's tensor peak within 0.05% of its trace (measured: within 0.01%). Interleaved 1F1B: the
    runtime's receive buffers made ahead of their forwards and backwards, forward sends held until the
    backward, backward sends until the step's end (before: -2%). 1F1B at 8 ranks: the first rank peaks in a
    later micro-batch's embedding backward, beside the received output gradient backward_one_chunk holds to its
    end (before: -0.1% here; +0.33% at full size, where the new gradients made since the previous candidate
    peak were counted as temporaries once more)."""
    from memtui.engine.trace import trace

    config = pipeline(schedule, pp=pp, microbatches=pp, batch_size=pp)
    traced = trace(config, model=DEEP)
    estimated = estimate(config, model=DEEP)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert len(traced.budget.stages) == len(estimated.stages) == pp
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=0.0005), (schedule, traced_rank.rank)


def test_gpipe_holds_every_micro_batch_and_1f1b_at_most_one_per_stage():
    """Estimated at full size: GPipe's first rank holds all eight micro-batches' activations, 1F1B's at most four
    (pp), its last rank one."""
    def activations(schedule: str) -> list[int]:
        config = TrainingConfig(model="llama-3.2-1b", batch_size=8, microbatches=8, seq_len=1024, gpus=4, pp=4,
                                pp_schedule=schedule)
        return [stage.per_gpu.activations for stage in estimate(config).stages]

    gpipe, one_f_one_b = activations("gpipe"), activations("1f1b")
    assert gpipe[1] > 1.8 * one_f_one_b[1]
    assert one_f_one_b[0] > one_f_one_b[1] > one_f_one_b[2]


@pytest.mark.parametrize("argv, message", [
    (["--pp", "2", "--gpus", "2", "--batch-size", "4", "--microbatches", "3"],
     "memtui: error: --microbatches: 3 does not divide --batch-size 4 into equal micro-batches (allowed: 1, 2, 4)"),
    (["--pp", "4", "--gpus", "4"], "memtui: error: --microbatches: 1F1B needs at least one micro-batch per stage"),
    (["--pp", "2", "--gpus", "2", "--batch-size", "3", "--microbatches", "3", "--pp-schedule", "interleaved-1f1b"],
     "memtui: error: --microbatches: interleaved 1F1B runs the micro-batches in rounds of --pp 2"),
    (["--pp", "16", "--gpus", "16", "--batch-size", "16", "--microbatches", "16", "--pp-schedule", "interleaved-1f1b"],
     "memtui: error: --pp-schedule: interleaved 1F1B puts two stages on each rank: 32 stages for 16 layers"),
])
def test_schedules_refuse_what_torch_refuses_in_one_line(capsys, argv, message):
    code = main(["estimate", "--model", "llama-3.2-1b", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1


def test_estimate_json_has_every_ranks_budget(capsys):
    code = main(["estimate", "--model", "llama-3.2-1b", "--gpus", "4", "--pp", "4", "--batch-size", "4",
                 "--microbatches", "4", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [stage["rank"] for stage in data["stages"]] == [0, 1, 2, 3]
    assert data["tensor_peak_bytes"] == max(stage["tensor_peak_bytes"] for stage in data["stages"])
    assert sum(stage["layers"] for stage in data["stages"]) == 16


def test_lora_stages_are_traced_and_estimated_per_rank():
    """peft's LoRA on each stage's own layers, DDP over each stage's data-parallel pair: the stage runs the base
    model inside the PeftModel. The first stage's frozen embedding output is kept by the decoder's forward (its
    `inputs_embeds`) until that forward returns, which the estimate follows (the first rank's forward peak, with
    other micro-batches' 16-bit weight copies saved, was 1 MiB short at Llama 3.2 1B's width)."""
    from memtui.engine.trace import trace

    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=128, gpus=4, zero=0, pp=2, microbatches=2,
                            pp_schedule="1f1b", lora_rank=8)
    assert pipeline_refusal(config, SPEC) is None
    traced = trace(config, model=SPEC)
    assert any(line.startswith("pipeline parallel (traced)") for line in traced.traced), traced.traced
    estimated = estimate(config, model=SPEC)
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes == pytest.approx(traced_rank.tensor_peak_bytes, rel=0.001)


def test_qlora_stages_send_their_16_bit_hidden_states():
    """QLoRA keeps the unquantized base parameters (embedding, norms) in 16 bits, so the hidden states a stage sends
    are 16-bit: the receive buffers and every later stage's residual stream too (the trace had declared fp32 ones,
    as under plain mixed precision, and the last rank was 11.5% above the estimate at Llama 3.2 1B's full size)."""
    from memtui.engine.trace import trace

    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=128, gpus=2, pp=2, microbatches=2,
                            pp_schedule="1f1b", lora_rank=8, quant="nf4")
    assert pipeline_refusal(config, SPEC) is None
    traced = trace(config, model=SPEC)
    estimated = estimate(config, model=SPEC)
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        # measured: -0.033% and -0.035%, the tiny width's one-GPU QLoRA error (fp32 receive buffers in the trace:
        # -0.34% on both; in the estimate's schedule: +0.06% and +0.14%)
        assert estimated_rank.tensor_peak_bytes == pytest.approx(traced_rank.tensor_peak_bytes, rel=0.002)


def test_pipeline_with_quantized_weights_beside_tensor_parallelism_is_refused():
    from tests.refusal import refusal

    spec = resolve_model("llama-3.1-8b")
    assert pipeline_refusal(pipeline("1f1b"), SPEC) is None
    combined = TrainingConfig(model="llama-3.1-8b", gpus=8, pp=2, tp=2, batch_size=2, microbatches=2, lora_rank=8,
                              quant="nf4")
    assert "no stack runs quantized weights under tensor parallelism" in refusal(combined, spec)


def test_torchtitan_pipeline_settings_are_read(tmp_path, capsys):
    """--from a torchtitan TOML: the schedule by torch's class name, the local batch in micro-batches of
    pipeline_parallel_microbatch_size sequences."""
    path = tmp_path / "train.toml"
    path.write_text('[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 8\nseq_len = 1024\n'
                    '[parallelism]\npipeline_parallel_degree = 4\ndata_parallel_shard_degree = 1\n'
                    'pipeline_parallel_schedule = "Interleaved1F1B"\npipeline_parallel_microbatch_size = 2\n')
    code = main(["estimate", "--from", str(path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (data["config"]["pp_schedule"], data["config"]["microbatches"], len(data["stages"])) == (
        "interleaved-1f1b", 4, 4)


def test_largest_batch_under_pipeline_parallelism_is_a_multiple_of_the_micro_batches():
    from memtui.engine.planning.fit import max_batch_size

    config = TrainingConfig(model="llama-3.2-1b", gpus=4, pp=4, batch_size=4, microbatches=4, seq_len=1024)
    result = max_batch_size(config)
    assert result.batch_size >= 4 and result.batch_size % 4 == 0, result.message
    assert estimate(config.model_copy(update={"batch_size": result.batch_size})).fits
