"""--compile: each decoder layer through AOTAutograd and inductor's min-cut partitioner, traced on fake tensors.

What the trace holds it to: the partitioner's choice of what a layer saves for backward (matmul and attention
outputs and inputs; norms, RoPE, SiLU recomputed), inductor's fusion (a pointwise intermediate is no allocation
unless something must read it from memory), checkpointing around the compiled layer, and the same log on real
CPU tensors as on fake ones."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.architectures import model_spec_from_config
from memtui.engine.model.presets import resolve_gpu, resolve_model
from memtui.engine.model.specs import TrainingConfig
from tests.test_cli import run_cli
from tests.test_trace import tiny_llama

BF16 = dict(model="llama-3.2-1b", precision="bf16-true", seq_len=256, batch_size=1)


def _activations_at_backward(layers: int, **options) -> int:
    """Bytes of activations alive when the second step's backward starts."""
    from memtui.engine.trace.fake_step import run_fake_steps

    log, _ = run_fake_steps(tiny_llama(layers), TrainingConfig(**{**BF16, **options}))
    start = next(index for index, step, phase in log.phase_marks if step == 2 and phase == "backward")
    live = 0
    for event in log.events[:start]:
        if log.allocations[event.alloc_id].category == "activations":
            live += event.delta
    return live


def _per_layer(**options) -> int:
    return _activations_at_backward(3, **options) - _activations_at_backward(2, **options)


def test_a_compiled_layer_saves_what_the_partitioner_chooses():
    # tiny_llama: hidden 64, 4 heads and 2 KV heads of 16, intermediate 176; 256 tokens, bf16.
    tokens, hidden, q, kv, heads, mlp = 256, 64, 64, 32, 4, 176
    saved = (
        2 * tokens * 4  # each RMSNorm's rsqrt (fp32, one per token): the norms themselves are recomputed
        + tokens * hidden * 2  # the attention norm's output: q, k and v projections' input
        + tokens * q * 2 + tokens * kv * 2  # q and k after RoPE (the attention kernel's inputs)
        + tokens * kv * 2  # v
        + tokens * q * 2 + heads * tokens * 4  # the attention output and its logsumexp (fp32)
        + tokens * hidden * 2  # o_proj's output (the residual add is recomputed from it)
        + tokens * hidden * 2  # the MLP norm's output
        + 3 * tokens * mlp * 2  # gate and up projections' outputs, and SiLU(gate) * up (down_proj's input)
        + tokens * hidden * 2  # the layer's output: the next layer's input
    )
    assert _per_layer(compile=True) == saved
    assert _per_layer() > saved * 1.4  # eager also keeps the norms' fp32 copies, RoPE's and SiLU's intermediates


def test_checkpointing_runs_around_the_compiled_layer():
    # Full checkpointing keeps each layer's input only, compiled or not.
    assert _per_layer(compile=True, checkpointing="full") == _per_layer(checkpointing="full") == 256 * 64 * 2


def test_fused_intermediates_are_not_allocations():
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from memtui.engine.torchside.compiled import fused_nodes

    def function(x, weight):
        return torch.mm(x.sin().cos(), weight).exp() + 1

    graph = make_fx(function)(torch.randn(4, 4), torch.randn(4, 4))
    fused = {node.target.__name__.split(".")[0] for node in fused_nodes(graph)}
    # sin is fused into cos; cos must exist in memory for the matmul; exp is fused into the add, the output.
    assert fused == {"sin", "exp"}


def test_a_buffer_read_by_a_fused_kernel_lives_until_that_kernel_runs():
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from memtui.engine.torchside.compiled import fused_runner
    from memtui.engine.trace.tracker import MemoryTracker

    def function(x, weight, small):
        wide = torch.mm(x, weight)  # 64 x 256 fp32: 64 KiB
        narrow = wide.exp()[:, :4] * 2  # fused into one kernel that reads `wide` and writes the matmul's input
        return (torch.mm(narrow, small),)

    inputs = [torch.randn(64, 64), torch.randn(64, 256), torch.randn(4, 4)]
    graph = make_fx(function)(*inputs)
    tracker = MemoryTracker()
    with tracker:
        result = fused_runner(graph, tracker.untracked)(list(inputs))
    live = peak = 0
    for event in tracker.log.events:
        live += event.delta
        peak = max(peak, live)
    # `wide` is freed only once the kernel reading it has written `narrow` (64 x 4 fp32): both alive together.
    assert peak == 64 * 256 * 4 + 64 * 4 * 4
    assert result[0].shape == (64, 4)


def test_the_same_log_on_real_cpu_tensors():
    from memtui.engine.trace.analysis import summarize
    from memtui.engine.trace.fake_step import run_fake_steps

    config = TrainingConfig(**{**BF16, "seq_len": 64, "precision": "32-true"}, compile=True)
    fake, _ = run_fake_steps(tiny_llama(), config)
    real, _ = run_fake_steps(tiny_llama(), config, fake=False)
    assert summarize(fake).peak_bytes == summarize(real).peak_bytes


def test_the_estimate_says_what_it_models(capsys):
    code, out, _ = run_cli(capsys, "estimate", "--model", "llama-3.2-1b", "--compile", "--gpus", "2", "--zero", "3")
    assert code == 0 and "the same min-cut and fusion rules" in " ".join(out.split())
    plain = estimate(TrainingConfig(model="llama-3.2-1b"))
    compiled = estimate(TrainingConfig(model="llama-3.2-1b", compile=True))
    assert compiled.tensor_peak_bytes < plain.tensor_peak_bytes
    # What it cannot compile yet it gives eager figures for, and says why.
    quantized = dict(model="llama-3.2-1b", quant="nf4", lora_rank=8)
    eager, noted = estimate(TrainingConfig(**quantized)), estimate(TrainingConfig(**quantized, compile=True))
    assert noted.tensor_peak_bytes == eager.tensor_peak_bytes
    assert any("does not model it for nf4 layers" in note for note in noted.notes)


def _estimated_per_layer(layers: int = 3, **options) -> float:
    """The estimator's bytes one middle layer keeps for backward (its output included: the next layer's input)."""
    from memtui.engine.estimator.sim.core import lf_eval
    from memtui.engine.estimator.sim.program import compile_step, dims_for, options_for

    spec = tiny_llama(layers)
    config = TrainingConfig(**{**BF16, **options})
    tokens, seq = config.batch_size * config.seq_len, config.seq_len
    program = compile_step(dims_for(spec), options_for(config, spec), layers)
    return lf_eval(program.layer_saved, (1, tokens, tokens * seq, seq, seq * seq))


def test_the_estimator_saves_what_the_partitioner_chooses():
    # The same per-layer figure the trace is held to above (test_a_compiled_layer_saves_what_the_partitioner_chooses).
    tokens, hidden, q, kv, heads, mlp = 256, 64, 64, 32, 4, 176
    saved = (2 * tokens * 4 + tokens * hidden * 2 + tokens * q * 2 + tokens * kv * 2 + tokens * kv * 2
             + tokens * q * 2 + heads * tokens * 4 + tokens * hidden * 2 + tokens * hidden * 2 + 3 * tokens * mlp * 2
             + tokens * hidden * 2)
    assert _estimated_per_layer(compile=True) == saved
    assert _estimated_per_layer(compile=True, checkpointing="full") == tokens * hidden * 2


def test_torchtitans_selective_checkpoint_is_compiled_into_the_layer():
    # torchtitan compiles each checkpoint-wrapped block: the op-level policy tags the graph's nodes MUST_SAVE (the
    # 1st, 3rd, ... mm, attention) or PREFER_RECOMPUTE, and the partitioner saves only what backward reads of the
    # former, recomputing the rest from the layer's input. Eager checkpointing around the compiled layer would also
    # keep down_proj's output, which its policy stores though backward never reads it.
    tokens, hidden, q, kv, heads, mlp = 256, 64, 64, 32, 4, 176
    saved = (
        tokens * q * 2  # q_proj's output (the 1st mm); k_proj's (2nd) is recomputed
        + tokens * kv * 2  # v_proj's (3rd); o_proj's (4th) is recomputed
        + tokens * q * 2 + heads * tokens * 4  # the attention output and its logsumexp
        + tokens * mlp * 2  # gate_proj's (5th); up_proj's (6th) recomputed, down_proj's (7th) not read by backward
        + tokens * hidden * 2  # the layer's input (a graph input): the norms, RoPE and SiLU are recomputed from it
    )
    assert _per_layer(compile=True, checkpointing="selective-op") == saved
    assert _estimated_per_layer(compile=True, checkpointing="selective-op") == saved


def small(model_id: str, layers: int = 3, **dims):
    """A preset's architecture at width 256 (tensors large enough that 512-byte rounding is noise), 3 layers."""
    config = copy.deepcopy(resolve_model(model_id).hf_config())
    config.update({**dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, num_hidden_layers=layers, vocab_size=2048), **dims})
    return model_spec_from_config(config, model_id=f"small-{model_id}", source="test")


COMPILED = [
    ("llama-3.2-1b", dict(precision="bf16-true"), {}),
    ("llama-3.2-1b", dict(precision="bf16-mixed", checkpointing="full"), {}),
    ("llama-3.2-1b", dict(precision="bf16-true", lora_rank=8, lora_targets="all-linear"), {}),
    # A small vocabulary and a wide MLP: the step peaks inside the last layer's backward (its temporaries count).
    ("llama-3.2-1b", dict(precision="bf16-mixed"), dict(vocab_size=256, intermediate_size=2048)),
    # torchtitan's op-level selective checkpoint compiled into each layer, the peak inside the last layer's backward
    # (where the recomputed matmuls' outputs and inputs are buffers of their own)
    ("llama-3.2-1b", dict(precision="bf16-mixed", checkpointing="selective-op"),
     dict(vocab_size=256, intermediate_size=2048)),
    # ... and under FSDP2 casting to bf16, as torchtitan runs it (fully_shard around each compiled block)
    ("llama-3.2-1b", dict(precision="bf16-mixed", checkpointing="selective-op", gpus=2, zero=3,
                          fsdp_param_dtype="compute"), {}),
    ("qwen2.5-0.5b", dict(precision="bf16-true"), {}),
    ("gemma-2-9b", dict(precision="bf16-mixed"), {}),
    ("phi-3-mini", dict(precision="bf16-true"), dict(pad_token_id=0)),
    # Past a (shortened) sliding window, and two sequences, no GQA as in Phi-3-mini, a small vocabulary (the layers
    # decide the peak): compiled, the rotary cat of an empty pass-through part is decomposed away and SDPA's output
    # needs no copy (the estimates that copied it: +2.4% and +2.2%).
    ("phi-3-mini", dict(precision="bf16-true"),
     dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=256, sliding_window=256, num_key_value_heads=4)),
    ("phi-3-mini", dict(precision="bf16-mixed", batch_size=2),
     dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=256, num_key_value_heads=4)),
    ("mixtral-8x7b", dict(precision="bf16-true"), dict(num_local_experts=4)),
    # The step peaks where a gather's gradient is scattered back (index_put into zeros, beside its values).
    ("qwen3-30b-a3b", dict(precision="bf16-mixed"), dict(num_experts=8, moe_intermediate_size=352)),
    # A large vocabulary: the step peaks in the compiled loss (torchtune's per chunk, transformers' whole), with and
    # without checkpointing; a batch of 2 copies each chunk's labels.
    ("llama-3.2-1b", dict(precision="bf16-true", loss="chunked"), dict(vocab_size=32000)),
    ("qwen2.5-0.5b", dict(precision="bf16-mixed", loss="chunked", checkpointing="full", batch_size=2),
     dict(vocab_size=32000)),
    ("llama-3.2-1b", dict(precision="bf16-mixed", checkpointing="full"), dict(vocab_size=32000)),
    ("mixtral-8x7b", dict(precision="bf16-true", loss="chunked"), dict(num_local_experts=4, vocab_size=32000)),
    # Eager attention compiled with the layer (its scores, softmax and dropout in the graph).
    ("llama-3.2-1b", dict(precision="bf16-true", attention="eager"), {}),
    ("qwen2.5-0.5b", dict(precision="bf16-mixed", attention="eager", lora_rank=8), {}),
    # Gemma-2's eager attention, its scores softcapped: the partitioner saves the scores, the mask and the softmax's
    # row max and sum (tanh and the fp32 probabilities recomputed); the full-attention layers save the other mask.
    ("gemma-2-9b", dict(precision="bf16-mixed", attention="eager"), {}),
    # Gemma 3 with a full-attention layer among sliding-window ones: it saves the other mask (the estimate that freed
    # it with the forward: -1.5%).
    ("gemma-3-1b", dict(precision="bf16-mixed", attention="eager"),
     dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # torchtune's model hands the compiled loss fp32 logits (--logits-upcast model), which it saves.
    ("llama-3.2-1b", dict(precision="bf16-mixed", checkpointing="full", logits_upcast="model"), dict(vocab_size=32000)),
]


@pytest.mark.parametrize(("model_id", "options", "dims"), COMPILED,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_the_estimate_follows_the_compiled_trace(model_id, options, dims):
    from memtui.engine.trace.runner import trace

    spec = small(model_id, **dims)
    config = TrainingConfig(**{**dict(model=model_id, gpu="h100-80gb", batch_size=1, seq_len=512, compile=True),
                               **options})
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - traced) / traced < 0.002, (estimated, traced)


def test_the_compiled_loss_saves_the_logits_and_two_values_per_row():
    """torchtune's compute_cross_entropy as the partitioner splits it: the bf16 logits (its input), the labels and
    fp32 amax and log-sum-exp per row are saved, not the fp32 log-probabilities; backward writes a bf16 gradient."""
    import torch

    from memtui.engine.torchside.build import compute_cross_entropy
    from memtui.engine.torchside.compiled import PartitionedLayers
    from memtui.engine.trace.tracker import MemoryTracker

    rows, vocab = 64, 512
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    tracker = MemoryTracker()
    compiled = PartitionedLayers(tracker.untracked)
    with tracker:
        loss = compiled.function(compute_cross_entropy)(logits, labels)
        loss.backward()
    (_, forward), (_, backward) = compiled.graphs
    outputs = next(node for node in forward.graph.nodes if node.op == "output").args[0]
    saved = sorted((tuple(node.meta["val"].shape), node.meta["val"].dtype) for node in outputs[1:])
    assert saved == sorted([((rows, vocab), torch.bfloat16), ((rows,), torch.int64),
                            ((rows, 1), torch.float32), ((rows, 1), torch.float32)])
    grad = next(node for node in backward.graph.nodes if node.op == "output").args[0][0]
    assert grad.meta["val"].dtype == torch.bfloat16
    # The step allocated the loss and the two row values in forward, the bf16 gradient in backward: nothing of
    # the vocabulary's width in fp32 (fused).
    sizes = sorted(tracker.log.allocations[event.alloc_id].nbytes for event in tracker.log.events if event.delta > 0)
    assert max(sizes) == rows * vocab * 2
    assert torch.allclose(loss, compute_cross_entropy(logits, labels))


@pytest.mark.parametrize(("loss", "compiled"), [
    (dict(), "ForCausalLMLoss"),  # transformers' loss, upcast inside: torchtitan's whole cross-entropy
    (dict(loss="chunked"), "compute_cross_entropy"),  # torchtune's compile_loss: each chunk's upcast and CE
    (dict(loss="chunked", loss_dtype="compute"), None),  # LitGPT's chunked loss: not compiled
    (dict(loss="fused-linear"), None),  # Liger's kernel
])
def test_which_loss_is_compiled(loss, compiled):
    from memtui.engine.torchside.build import build_model
    from memtui.engine.torchside.compiled import compiled_losses

    config = TrainingConfig(**{**BF16, "seq_len": 64}, compile=True, **loss)
    model = build_model(tiny_llama(), config, device="meta")
    seen: list[str] = []
    compiled_losses(model, lambda function: seen.append(function.__name__) or function)
    assert seen == ([compiled] if compiled else [])


def test_an_eager_loss_beside_compiled_layers_follows_the_trace():
    """--eager-loss (torchtitan without "loss" in compile.components, torchtune's full-finetune recipes with a whole
    loss): the layers compiled, the loss eager, its fp32 log-probabilities kept for backward (a higher peak than the
    compiled loss); the estimate equals the trace either way."""
    from memtui.engine.estimator import estimate
    from memtui.engine.trace.runner import trace

    spec = small("llama-3.2-1b", vocab_size=32000)
    peaks = {}
    for eager_loss in (False, True):
        config = TrainingConfig(model="llama-3.2-1b", gpu="h100-80gb", batch_size=1, seq_len=512, compile=True,
                                precision="bf16-true", logits_upcast="model", eager_loss=eager_loss)
        result = trace(config, model=spec)
        traced = result.traced_tensor_peak_bytes
        estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
        assert abs(estimated - traced) / traced < 0.002, (eager_loss, estimated, traced)
        assert any(line.startswith("torch.compile of each decoder layer" + ("" if eager_loss else " and of the loss"))
                   for line in result.traced), result.traced
        peaks[eager_loss] = traced
    assert peaks[True] - peaks[False] > 0.99 * 512 * 32000 * 4  # about the fp32 log-probabilities, saved


def test_what_the_trace_compiles():
    from memtui.engine.torchside.compiled import untraced_compile

    assert untraced_compile(TrainingConfig(model="gpt2", compile=True), parallel=False) == ""
    assert "parallelism" in untraced_compile(TrainingConfig(model="gpt2", compile=True, gpus=2), parallel=True)
    assert untraced_compile(TrainingConfig(model="llama-3.2-1b", compile=True, gpus=2, zero=3,
                                           checkpointing="selective-op"), parallel=True) == ""
    assert "selective" in untraced_compile(TrainingConfig(model="gpt2", compile=True, checkpointing="selective"),
                                           parallel=False)
    assert "nf4" in untraced_compile(TrainingConfig(model="gpt2", compile=True, quant="nf4", lora_rank=8),
                                     parallel=False)


def test_a_cpu_live_run_skips_compile_with_a_notice():
    from memtui.engine.live.plan import LiveOptions, make_plan
    from tests.test_live_plan import CPU

    plan = make_plan(TrainingConfig(model="gpt2", compile=True), LiveOptions(device="cpu"), CPU)
    assert not plan.config.compile
    assert any("compile on the CPU: skipped" in notice for notice in plan.notices)


def test_gpt2_eager_attention_compiled_saves_the_softmax_output_not_the_mask():
    """GPT-2's eager attention in a compiled layer: the partitioner weighs each tensor by its distance to backward
    (1.1 per node; softmax decomposes into five), so it saves the softmax's output rather than the scores and the
    (b, 1, s, s) mask (the estimate kept the mask alive until backward: +0.39% at 2 layers)."""
    from memtui.engine.trace.generic import at_depth
    from memtui.engine.trace.runner import trace

    spec = at_depth(resolve_model("gpt2"), 2)
    config = TrainingConfig(model="gpt2", gpu="h100-80gb", precision="bf16-true", attention="eager", batch_size=2,
                            seq_len=1024, compile=True)
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - traced) / traced < 0.0005, (estimated, traced)


@pytest.mark.parametrize("softcap", [True, False], ids=["softcapped", "plain"])
def test_a_recomputed_softmax_saves_its_row_max_and_sum(softcap):
    """Eager attention in a compiled layer: the scores (a bmm's output) and the mask are saved, the fp32 softmax is
    recomputed from them in backward, and with it the row max and sum of its decomposition (amax, exp, sum, div),
    reductions the partitioner never recomputes: two fp32 values per row, as the trace saves them (amax, sum_1)."""
    from memtui.engine.estimator.sim.compiled import compiled_layer
    from memtui.engine.estimator.sim.core import Sim, lf_eval, per_token, per_token_seq
    from memtui.engine.estimator.sim.families import eager_attention
    from memtui.engine.estimator.sim.program import dims_for, options_for

    spec = small("gemma-2-9b")
    config = TrainingConfig(model="gemma-2-9b", precision="bf16-true", attention="eager", seq_len=512, compile=True)
    d, opts = dims_for(spec), options_for(config, spec)
    assert opts.compiled and opts.attention_softcap
    opts = dataclasses.replace(opts, attention_softcap=softcap)
    sim = Sim()
    q = sim.new(per_token(d.q_dim), "bf16", name="q", requires_grad=True)
    k = sim.new(per_token(d.kv_dim), "bf16", name="k", requires_grad=True)
    v = sim.new(per_token(d.kv_dim), "bf16", name="v", requires_grad=True)
    sim.causal_mask = mask = sim.new(per_token_seq(1), "bf16", name="mask")
    compiled_layer(sim, lambda graph, x: eager_attention(graph, x, k, v, d, opts), q)
    saved = sim.nodes[-1].saved
    names = [tensor.name for tensor in saved]
    assert any(tensor is mask for tensor in saved)
    assert "compiled bmm" in names and "compiled softmax" not in names
    stats = [t for t in saved if t.name in ("compiled softmax amax", "compiled softmax sum")]
    assert [t.name for t in stats] == ["compiled softmax amax", "compiled softmax sum"]
    assert {lf_eval(t.nbytes, (1, 512, 512 * 512, 512, 512 * 512)) for t in stats} == {d.heads * 512 * 4}
