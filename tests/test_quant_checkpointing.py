"""Quantized bases and checkpointing policies: the build does what transformers, bitsandbytes and torchtitan do,
and the estimate follows the trace."""

from __future__ import annotations

import pytest

from memtui.engine.model.specs import TrainingConfig
from tests.test_trace import assert_estimate_matches_trace

GPT2_QLORA = dict(model="gpt2", quant="nf4", precision="bf16-mixed", lora_rank=8, lora_targets="c_attn", seq_len=128)


def test_gpt2_quantized_estimate_matches_trace():
    """GPT-2's nf4 base under autocast: once 31% apart (the estimate counted fp32 unquantized weights)."""
    assert_estimate_matches_trace(GPT2_QLORA, 0.002)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_the_build_quantizes_gpt2s_conv1d_layers_and_keeps_the_rest_in_the_compute_dtype(quant):
    """transformers' replace_with_bnb_linear converts Conv1D as well as nn.Linear; the unquantized weights are
    in from_pretrained's dtype, which memtui takes to be the compute dtype."""
    import torch

    from memtui.engine.model.presets import resolve_model
    from memtui.engine.torchside.build import build_model
    from memtui.engine.torchside.replicas import Int8LinearReplica, Nf4LinearReplica

    with torch.device("meta"):
        model = build_model(resolve_model("gpt2"), TrainingConfig(**dict(GPT2_QLORA, quant=quant)),
                            device="meta", quant_backend="replica")
    replica = Nf4LinearReplica if quant == "nf4" else Int8LinearReplica
    block = model.base_model.model.transformer.h[0]
    layers = [block.attn.c_attn.base_layer, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    assert all(isinstance(layer, replica) for layer in layers)
    assert (layers[0].in_features, layers[0].out_features) == (768, 2304)
    unquantized = {p.dtype for name, p in model.named_parameters() if "lora_" not in name and p.dtype.is_floating_point}
    assert unquantized == {torch.bfloat16}


def test_int8_under_autocast_with_selective_checkpointing_traces_and_the_estimate_follows():
    """The recompute in backward asked torch.is_autocast_enabled() after the trace had stopped answering it for
    CUDA: peft's int8 LoRA layer then cast its input, an op the forward never ran, and selective checkpointing
    refused it ("_to_copy ... not found in storage")."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.model.presets import resolve_gpu
    from memtui.engine.trace.runner import trace
    from tests.test_trace import tiny_llama

    spec = tiny_llama(layers=4)
    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", quant="int8", lora_rank=4, lora_targets="all-linear",
                            precision="bf16-mixed", checkpointing="selective", batch_size=4, seq_len=512)
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - traced) / traced < 0.002, (estimated, traced)


def test_fp16_adapters_under_a_grad_scaler_are_refused_in_one_line(capsys):
    """16-mixed's GradScaler cannot unscale fp16 gradients: a trace of it died with a traceback."""
    from tests.test_cli import run_cli

    code, _, err = run_cli(capsys, "estimate", "--model", "qwen2.5-0.5b", "--quant", "nf4", "--lora-rank", "8",
                           "--precision", "16-mixed", "--lora-dtype", "compute")
    assert code == 2 and err.count("\n") == 1 and "--lora-dtype" in err and "bf16-mixed" in err, err


@pytest.mark.parametrize("options", [dict(attention="flash", precision="bf16-mixed", lora_rank=4, lora_targets="all-linear"),
                                     dict(attention="eager", precision="bf16-true")], ids=["flash-lora", "eager"])
def test_torchtitans_op_level_policy_keeps_less_than_selective_and_the_estimate_follows(options):
    """--checkpointing selective-op: torchtitan's SelectiveAC (every other mm recomputed), traced through
    torch's selective checkpointing with torchtitan's policy function, and estimated op by op."""
    from memtui.engine.estimator import estimate
    from memtui.engine.estimator.overhead import cublas_workspace_bytes
    from memtui.engine.model.presets import resolve_gpu
    from memtui.engine.trace.runner import trace
    from tests.test_trace import tiny_llama

    spec = tiny_llama(layers=4)
    workspace = cublas_workspace_bytes(resolve_gpu("h100-80gb"))

    def loss_phase(budget) -> int:
        return next(point.bytes for point in budget.timeline if point.phase == "loss")

    config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", batch_size=4, seq_len=256,
                            checkpointing="selective-op", **options)
    result = trace(config, model=spec)
    estimated = estimate(config, model=spec)
    traced = result.traced_tensor_peak_bytes
    assert abs(estimated.tensor_peak_bytes - workspace - traced) / traced < 0.002, (estimated.tensor_peak_bytes, traced)
    kept = loss_phase(result.budget)
    assert abs(loss_phase(estimated) - workspace - kept) / kept < 0.002
    selective = estimate(config.model_copy(update={"checkpointing": "selective"}), model=spec)
    full = estimate(config.model_copy(update={"checkpointing": "full"}), model=spec)
    assert loss_phase(full) < loss_phase(estimated)
    if options["attention"] == "flash":  # half the matmul outputs recomputed
        assert loss_phase(estimated) < loss_phase(selective)
    else:  # torchtitan also keeps eager attention's bmm outputs, the s x s scores, which selective recomputes
        assert loss_phase(estimated) > loss_phase(selective)


def test_a_torchtitan_toml_with_op_level_selective_checkpointing_maps_to_selective_op(tmp_path):
    from memtui.engine.model.framework_configs import read_framework_config

    path = tmp_path / "llama3_8b.toml"
    path.write_text('[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 1\nseq_len = 2048\n'
                    '[parallelism]\ndata_parallel_shard_degree = 1\n'
                    '[activation_checkpoint]\nmode = "selective"\nselective_ac_option = "op"\n')
    assert read_framework_config(path).options["checkpointing"] == "selective-op"


@pytest.mark.parametrize(("model", "flags", "field"), [("mixtral-8x7b", [], "--checkpointing"),
                                                      ("llama-3.1-8b", ["--tp", "2", "--gpus", "2"], "--checkpointing")])
def test_selective_op_where_it_is_not_modelled_is_refused_in_one_line(capsys, model, flags, field):
    from tests.test_cli import run_cli

    code, _, err = run_cli(capsys, "estimate", "--model", model, "--checkpointing", "selective-op", *flags)
    assert code == 2 and err.count("\n") == 1 and field in err, err
