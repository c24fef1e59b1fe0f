"""Pipeline parallelism combined with tensor and data parallelism (issue 13): each pipeline rank traced at the real
world size on a (pp, dp, tp) DeviceMesh as torchtitan builds it, and the estimator's per-rank budgets held to it."""

from __future__ import annotations

import copy

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.layout import pipeline_refusal
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig


def small_llama(layers: int = 4, vocab: int = 2048):
    """Llama-3 shrunk (untied, a 2048 vocabulary, width 256), as tests/test_pipeline.py: seconds per rank."""
    config = copy.deepcopy(resolve_model("llama-3.2-1b").hf_config())
    config.update(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False)
    return model_spec_from_config(config, model_id="small-llama", source="test")


SPEC = small_llama(layers=2)


def combined(**options) -> TrainingConfig:
    return TrainingConfig(**{"model": "llama-3.2-1b", "batch_size": 2, "seq_len": 64, "pp": 2, "microbatches": 2,
                             **options})


def _traced(config: TrainingConfig, spec=SPEC):
    import torch.distributed as dist

    from memtui.engine.trace import trace

    result = trace(config, model=spec)
    assert not dist.is_initialized()  # torn down: the next trace in this process starts its own group
    assert not any("pipeline" in line or "parallel" in line for line in result.modelled), result.modelled
    return result


def test_pipeline_with_data_and_tensor_parallelism_is_traced():
    for options in ({"gpus": 4, "zero": 0}, {"gpus": 4, "zero": 1}, {"gpus": 4, "zero": 3},
                    {"gpus": 8, "zero": 3, "shard_group": 2}, {"gpus": 4, "tp": 2},
                    # with DDP, ZeRO-1 or HSDP beside the tensor parallelism too (tests/test_trace_tp_dp.py)
                    {"gpus": 8, "tp": 2, "zero": 0}, {"gpus": 8, "tp": 2, "zero": 1},
                    {"gpus": 16, "tp": 2, "zero": 3, "shard_group": 2}):
        assert pipeline_refusal(combined(**options), SPEC) is None, options


def _exact_per_rank(config: TrainingConfig, traced, rel: float = 0.005, spec=SPEC):
    estimated = estimate(config, model=spec)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=rel), traced_rank.rank
    return estimated


@pytest.mark.parametrize("schedule", ["gpipe", "interleaved-1f1b"])
def test_pipeline_with_ddp_is_traced_and_the_estimate_is_exact_per_rank(schedule):
    """DDP on each stage: PipelineStage runs the forwards and all but the last backward under no_sync, and keeps
    every sent output until its micro-batch's backward (DDP's reducer needs it): under GPipe rank 0 holds all four
    micro-batches' outputs at its peak (0.5 MiB, 0.8% of it). Measured: within 8 KiB per rank, both schedules."""
    config = combined(gpus=4, zero=0, pp_schedule=schedule, microbatches=4, batch_size=4, seq_len=128)
    spec = small_llama(layers=4) if schedule == "interleaved-1f1b" else SPEC  # two stages per rank
    traced = _traced(config, spec)
    assert any(line.startswith("DDP on each stage over dp 2") for line in traced.traced), traced.traced
    _exact_per_rank(config, traced, rel=2e-4, spec=spec)


def test_pipeline_with_zero1_shards_each_stages_optimizer_on_its_own():
    """ZeRO-1: a ZeroRedundancyOptimizer per stage over the data-parallel ranks (whole tensors, largest first).
    The estimate's states are the data-parallel rank holding the most (here rank 1), the trace's rank 0's: the
    rest of each pipeline rank's peak agrees exactly, and the states within one tensor's share."""
    config = combined(gpus=4, zero=1)
    traced = _traced(config)
    assert any(line.startswith("ZeRO-1: torch's ZeroRedundancyOptimizer on each stage") for line in traced.traced)
    estimated = estimate(config, model=SPEC)
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        states, estimated_states = traced_rank.per_gpu.optimizer_states, estimated_rank.per_gpu.optimizer_states
        assert states < 0.75 * traced_rank.per_gpu.gradients * 2  # AdamW's two fp32 states, sharded over 2 ranks
        assert states <= estimated_states < 1.05 * states
        assert estimated_rank.tensor_peak_bytes - estimated_states == pytest.approx(
            traced_rank.tensor_peak_bytes - states, rel=5e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_pipeline_with_hsdp_is_traced_and_the_estimate_is_exact_per_rank(zero):
    """HSDP on each stage (2 replicas x 2 shards of a (pp, dp_replicate, dp_shard, tp) mesh): sharded within the
    shard group, as FSDP2 over 2 ranks; the replicas' all-reduce works in place."""
    config = combined(gpus=8, zero=zero, shard_group=2)
    traced = _traced(config)
    assert any("as HSDP (2 replicas x 2 shards" in line for line in traced.traced), traced.traced
    _exact_per_rank(config, traced, rel=5e-4)


def test_pipeline_with_tensor_parallelism_is_traced_and_the_estimate_is_exact_per_rank():
    """DTensor's plan on each stage (sequence parallel: 1/tp of the tokens cross between stages, the first stage's
    embedding gradient whole-vocabulary): the estimate is each rank's traced tensor peak (measured: within 10 KiB)."""
    config = combined(gpus=4, tp=2)
    traced = _traced(config)
    assert any(line.startswith("tensor parallel (traced): DTensor at tp 2") for line in traced.traced), traced.traced
    estimated = estimate(config, model=SPEC)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    assert [stage.rank for stage in traced.budget.stages] == [0, 1] == [stage.rank for stage in estimated.stages]
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=0.005), traced_rank.rank
        assert estimated_rank.per_gpu.gradients == pytest.approx(traced_rank.per_gpu.gradients, rel=0.005)


@pytest.mark.parametrize("zero", [2, 3])
def test_pipeline_with_fsdp2_is_traced_and_the_estimate_is_exact_per_rank(zero):
    """FSDP2 per layer and on each stage over the data-parallel ranks: PipelineStage's backwards accumulate the
    gradients unsharded (sync off) and keep the layers they gathered; the estimator's per-rank budgets follow that
    (measured: within 10 KiB), gradients whole through backward, 1/dp after the step."""
    config = combined(gpus=4, zero=zero)
    traced = _traced(config)
    assert any(line.startswith("FSDP2 fully_shard per decoder layer and on each stage over dp 2")
               for line in traced.traced), traced.traced
    estimated = estimate(config, model=SPEC)
    workspace = cublas_workspace_bytes(resolve_gpu(config.gpu))
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes - workspace == pytest.approx(
            traced_rank.tensor_peak_bytes - workspace, rel=0.005), traced_rank.rank
        # At the peak every gradient of the stage is alive unsharded, not the 1/dp shard the optimizer steps on
        # (AdamW: two fp32 states per element of the shard)
        assert traced_rank.per_gpu.gradients > 1.9 * traced_rank.per_gpu.optimizer_states / 2
        assert estimated_rank.per_gpu.gradients == pytest.approx(traced_rank.per_gpu.gradients, rel=0.005)


def test_pipeline_with_tensor_parallelism_and_fsdp2_is_traced_not_modelled():
    """The configuration tests/test_trace_parallel.py's modelled-layout test used (PP x TP x FSDP2, gpipe, a 65,536
    vocabulary), now traced: the rank peaks in backward in the trace as in the estimate, and they agree per rank."""
    from tests.test_pipeline import small_llama as llama_with_vocabulary

    spec = llama_with_vocabulary(layers=4, vocab=65536)
    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=64, gpus=8, tp=2, pp=2, zero=3,
                            pp_schedule="gpipe", microbatches=2)
    from memtui.engine.trace import trace

    traced, estimated = trace(config, model=spec), estimate(config, model=spec)
    assert not any("modelled" in line for line in traced.traced + traced.modelled), traced.modelled
    assert traced.peak_phase == estimated.peak_phase == "backward"
    for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
        assert estimated_rank.tensor_peak_bytes == pytest.approx(traced_rank.tensor_peak_bytes, rel=1e-4)


def test_the_last_stage_keeps_the_models_fp32_logits_as_estimated():
    """--logits-upcast model under pipeline parallelism: the last stage's head returns fp32 logits, which its chunk
    state keeps until backward (a higher peak there than with the upcast in the loss); each rank as estimated."""
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    peaks = {}
    for upcast in ("loss", "model"):
        config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=256, pp=2, microbatches=2, gpus=2,
                                logits_upcast=upcast)
        traced, estimated = _traced(config), estimate(config, model=SPEC)
        for traced_rank, estimated_rank in zip(traced.budget.stages, estimated.stages, strict=True):
            assert estimated_rank.tensor_peak_bytes == pytest.approx(traced_rank.tensor_peak_bytes, rel=0.002)
        peaks[upcast] = traced.budget.stages[-1].tensor_peak_bytes - workspace
    assert peaks["model"] > peaks["loss"]


def test_gpipe_ranks_of_one_role_trace_alike_so_one_trace_serves_them():
    """ScheduleGPipe runs every rank alike: two middle ranks with as many layers (FSDP2 and DTensor on a (pp, dp,
    tp) mesh) make the same allocations, event for event, so trace_pipeline traces one of them; 1F1B's warm-up
    differs by rank, so each is traced."""
    from memtui.engine.trace.pipeline import _rank_role, trace_pipeline

    spec = small_llama(layers=4)
    config = TrainingConfig(model="llama-3.2-1b", batch_size=2, seq_len=64, pp=4, microbatches=2, gpus=16, tp=2,
                            zero=3, pp_schedule="gpipe")
    assert pipeline_refusal(config, spec) is None
    roles = [_rank_role(spec, config, rank) for rank in range(config.pp)]
    assert roles[1] == roles[2] and len(set(roles)) == 3
    every = trace_pipeline(spec, config, reuse=False)
    assert every[1].log == every[2].log and every[1].extras == every[2].extras
    assert every[1].log != every[0].log and every[1].log != every[3].log
    assert (every[2].rank, every[2].stages) == (2, [2])
    assert [_rank_role(spec, config.model_copy(update={"pp_schedule": "1f1b"}), rank) for rank in range(4)] == [None] * 4


@pytest.mark.parametrize("pp, layers, options", [(3, 6, {}), (3, 6, {"tp": 2}), (3, 6, {"zero": 3, "dp": 2, "tp": 2})],
                         ids=["pp", "pp-tp", "pp-tp-fsdp2"])
def test_deep_stages_traced_at_a_few_layers_and_extended_give_every_ranks_traced_figures(pp, layers, options):
    """Stages of 6 or 7 layers under 1F1B: each rank traced at 3 layers (4 for the first and last stage, whose outer
    layer is the model's first or last; under FSDP2 too, whose stages' outer layers differ in their own
    allocations only) and extended, once
    each kind of stage has rebuilt its step one layer deeper exactly, gives every rank's figures of the trace at
    every layer: tensor and reserved peaks, phases, top allocations, the per-GPU budget."""
    from memtui.engine.allocator import DEFAULT_CONFIG
    from memtui.engine.trace.assemble import assemble
    from memtui.engine.trace.pipeline import trace_pipeline

    spec = small_llama(layers=pp * layers)
    dp = options.pop("dp", 1)
    config = combined(pp=pp, microbatches=pp, batch_size=pp, gpus=pp * dp * options.get("tp", 1), **options)
    gpu = resolve_gpu(config.gpu)
    extended, every = trace_pipeline(spec, config), trace_pipeline(spec, config, reuse=False)
    assert len({trace.note for trace in extended}) == 1 and extended[0].note.startswith("decoder layers: a stage")
    assert [trace.layers for trace in extended] == [layers] * pp
    for mine, theirs in zip(extended, every, strict=True):
        assert mine.extras == theirs.extras
        figures = [assemble(config, config, spec, gpu, trace.log, trace.extras, notes=[], alloc_config=DEFAULT_CONFIG,
                            parallel=([], [])).as_json() for trace in (mine, theirs)]
        for result in figures:
            del result["seconds"]
        assert figures[0] == figures[1], mine.rank


def test_stages_under_ddp_or_interleaved_are_traced_at_every_layer():
    from memtui.engine.trace.pipeline import extension_refusal

    spec = small_llama(layers=24)
    assert extension_refusal(spec, combined(gpus=2)) is None
    assert extension_refusal(spec, combined(gpus=4, zero=3)) is None
    assert "DDP" in extension_refusal(spec, combined(gpus=4, zero=1))
    assert "interleaved" in extension_refusal(spec, combined(gpus=2, pp_schedule="interleaved-1f1b", microbatches=4,
                                                             batch_size=4))


def test_ranks_traced_two_at_a_time_and_sharing_sharding_decisions_trace_as_one_at_a_time(monkeypatch):
    """trace_pipeline makes its traces in this process and a forked one side by side, and DTensor's sharding
    decisions are made once across the ranks' worlds: every rank's log is the one traced in turn in one process
    (no fork: another thread running), and a middle rank after another propagates no op's sharding anew."""
    import threading

    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    from memtui.engine.trace import pipeline
    from memtui.engine.trace.pipeline import trace_pipeline

    config = combined(pp=4, microbatches=4, batch_size=4, gpus=16, tp=2, zero=3)
    propagated: list[int] = []  # per rank, traced in turn: the ops whose sharding was propagated anew
    original = ShardingPropagator.propagate_op_sharding_non_cached

    def counted(self, schema):
        propagated[-1] += 1
        return original(self, schema)

    spec = small_llama(layers=4)
    side_by_side = trace_pipeline(spec, config, reuse=False)
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    monkeypatch.setattr(ShardingPropagator, "propagate_op_sharding_non_cached", counted)
    trace_rank = pipeline._trace_rank

    def counting(*args, **kwargs):
        propagated.append(0)
        return trace_rank(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_trace_rank", counting)
    in_turn = trace_pipeline(spec, config, reuse=False)
    assert [trace.log for trace in side_by_side] == [trace.log for trace in in_turn]
    assert len(propagated) == 4 and 0 < propagated[1] < propagated[0] and propagated[2] == 0


def test_middle_ranks_composed_from_another_ranks_actions_are_their_traced_logs():
    """Under 1F1B every middle rank runs every micro-batch's forward and backward, in its own order: a rank's log
    at a few layers laid out from another's actions (each from the action in the same place, its references
    moved with it) is the rank's traced log, event by event; tp 2 and FSDP2 on a (pp, dp, tp) mesh, as the 405B
    configuration. A rank with an action in a place the source has none (rank 5's warm-up of three forwards ends
    where rank 3's does not) is traced."""
    from memtui.engine.trace.extend import same_log
    from memtui.engine.trace.pipeline import _sharding_decisions_across_worlds, _StageExtension, _trace_rank
    from memtui.engine.trace.schedule_compose import NotComposable, compose_log, one_f_one_b_order

    pp = 8
    spec = small_llama(layers=pp * 5)
    config = combined(pp=pp, microbatches=pp, batch_size=pp, seq_len=32, gpus=pp * 4, tp=2, zero=3)
    extension = _StageExtension(spec, config, None)
    assert (extension.source, extension.check, extension.composed) == (3, 1, {2, 4})
    with _sharding_decisions_across_worlds():
        traces = {rank: _trace_rank(spec, config, rank, lambda *_: None, depth=3) for rank in (1, 2, 3, 4, 5)}
    source = traces[3]
    order = [one_f_one_b_order(pp, pp, rank) for rank in range(pp)]
    for rank in (1, 2, 4):
        composed = compose_log(source.log, source.actions, order[3], order[rank], pp)
        assert same_log(composed, traces[rank].log), rank
        assert composed.events != source.log.events
    with pytest.raises(NotComposable):
        compose_log(source.log, source.actions, order[3], order[5], pp)


def test_trace_cli_runs_no_thread_beside_a_pipeline_trace(tmp_path, monkeypatch, capsys):
    """`memtui trace` redraws its spinner at each progress report, not on rich's refresh thread: the pipeline
    trace then finds no other thread and makes its traces two at a time in a forked process."""
    import json
    import threading

    from memtui.cli import main
    from memtui.engine.trace import pipeline

    seen: list[set[threading.Thread]] = []
    traced_in_two = pipeline._traced_in_two

    def counted(*args):
        seen.append(set(threading.enumerate()))
        return traced_in_two(*args)

    monkeypatch.setattr(pipeline, "_traced_in_two", counted)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SPEC.hf_config()))
    before = set(threading.enumerate())  # the test runner's own (pytest-xdist's worker has its channel's)
    code = main(["trace", "--model", str(path), "--batch-size", "2", "--seq-len", "64", "--pp", "2",
                 "--microbatches", "2", "--gpus", "2"])
    assert code == 0 and "pipeline parallel (traced)" in capsys.readouterr().out
    assert len(seen) == 1 and seen[0] <= before, seen  # the CLI started none
