"""Eager attention as CUDA lays it out and allocates it, and fp32 parameters under --master-weights.

- matmul reshapes (b, heads, s, d) to (b * heads, s, d): a copy unless the tensor is head-major (Phi-3's RoPE ends
  in a cat) or there is one sequence; the simulator follows the strides, so with one sequence Phi-3 saves q, k and
  the whole qkv output (v is a view of it), not copies of q, k and v.
- softmax(x, dtype=float32) of an fp16 tensor is one kernel on CUDA (half_to_float): the trace stands in for it
  (engine/trace/cuda_softmax.py), and bf16 keeps the cast in front.
- MasterWeights copies 16-bit parameters only: peft's fp32 adapters are their own masters.
"""

from __future__ import annotations

import pytest

from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.model.presets import resolve_gpu
from memtui.engine.model.specs import TrainingConfig
from tests.test_compile import small


def _softmax_allocations(dtype):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtui.engine.trace.cuda_softmax import cuda_softmax
    from memtui.engine.trace.tracker import MemoryTracker

    with FakeTensorMode():
        scores = torch.randn(2, 4, 64, 64, dtype=dtype, requires_grad=True)
        tracker = MemoryTracker()
        with cuda_softmax(), tracker:
            probs = torch.nn.functional.softmax(scores * 1, dim=-1, dtype=torch.float32)
            torch.autograd.grad(probs, scores, torch.ones_like(probs))
    return [(allocation.op.split(".")[0], str(allocation.dtype).removeprefix("torch."))
            for allocation in tracker.log.allocations.values()]


def test_an_fp16_softmax_to_fp32_is_one_kernel_as_on_cuda():
    # forward: the fp32 output alone, no fp32 copy of the scores; backward: the fp16 gradient, written directly
    assert _softmax_allocations(__import__("torch").float16) == [
        ("mul", "float16"), ("_softmax", "float32"), ("ones_like", "float32"), ("_softmax_backward_data", "float16"),
        ("mul", "float16")]


def test_a_bf16_softmax_to_fp32_casts_first_as_on_cuda():
    assert _softmax_allocations(__import__("torch").bfloat16) == [
        ("mul", "bfloat16"), ("_to_copy", "float32"), ("_softmax", "float32"), ("ones_like", "float32"),
        ("_softmax_backward_data", "float32"), ("_to_copy", "bfloat16"), ("mul", "bfloat16")]


def test_real_cpu_tensors_keep_the_cpu_softmax():
    import torch

    from memtui.engine.trace.cuda_softmax import cuda_softmax

    scores = torch.randn(2, 8, dtype=torch.float16)
    with cuda_softmax():  # CPU's kernel has no half_to_float
        probs = torch.softmax(scores, -1, dtype=torch.float32)
    assert probs.dtype == torch.float32 and torch.allclose(probs, torch.softmax(scores.float(), -1))


def _traced_and_estimated(model_id: str, dims: dict, **options) -> tuple[int, int]:
    from memtui.engine.trace.runner import trace

    spec = small(model_id, layers=2, **dims)
    config = TrainingConfig(**{**dict(model=model_id, gpu="h100-80gb", batch_size=1, seq_len=256), **options})
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    return traced, estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))


PHI3 = dict(num_key_value_heads=4, pad_token_id=0)  # Phi-3-mini's own: as many key/value heads as heads


@pytest.mark.parametrize(("model_id", "dims", "options"), [
    # the gaps this closes: Phi-3 eager with LoRA (q, k, v saved as laid out), and with fp32 master weights
    ("phi-3-mini", PHI3, dict(precision="16-true", lora_rank=16, lora_targets="all-linear")),
    ("phi-3-mini", PHI3, dict(precision="16-true", lora_rank=16, lora_targets="all-linear", master_weights=True)),
    # two sequences: v (a view of qkv) is copied by the reshape
    ("phi-3-mini", PHI3, dict(precision="bf16-mixed", lora_rank=16, lora_targets="qkv_proj", batch_size=2)),
    # fp16 softmax (half_to_float) with and without autocast, GPT-2's under autocast's dtype
    ("llama-3.2-1b", dict(num_key_value_heads=4), dict(precision="16-true", lora_rank=8)),
    ("gpt2", {}, dict(precision="16-mixed", lora_rank=8, lora_targets="all-linear")),
], ids=["phi3-lora", "phi3-lora-masters", "phi3-batch2", "llama-fp16", "gpt2-16-mixed"])
def test_eager_attention_follows_the_trace(model_id, dims, options):
    traced, estimated = _traced_and_estimated(model_id, dims, attention="eager", **options)
    assert abs(estimated - traced) / traced < 0.0005, (estimated, traced)


def test_fp32_adapters_are_their_own_masters():
    lora = dict(model="phi-3-mini", precision="bf16-true", lora_rank=16, lora_targets="all-linear")
    plain, masters = estimate(TrainingConfig(**lora)), estimate(TrainingConfig(**lora, master_weights=True))
    assert masters.model_states.optimizer_states == plain.model_states.optimizer_states
    # adapters in the model's dtype get fp32 masters, and fp32 states: 4 + 2 * 2 bytes per trainable parameter more
    compute = dict(lora, lora_dtype="compute")
    plain, masters = estimate(TrainingConfig(**compute)), estimate(TrainingConfig(**compute, master_weights=True))
    extra = masters.model_states.optimizer_states - plain.model_states.optimizer_states
    assert extra == 8 * plain.model.trainable_params


@pytest.mark.parametrize(("vocab", "options"), [
    (2048, dict(precision="bf16-mixed")),  # a small vocabulary: the layers decide the peak
    (2048, dict(precision="bf16-true")),  # addmm's backward: the input's gradient before the weight's
    (None, dict(precision="bf16-true", lora_rank=8, lora_targets="all-linear")),
], ids=["bf16-mixed", "bf16-true", "bf16-true-lora"])
def test_compiled_gpt2_layers_follow_the_trace(vocab, options):
    """GPT-2's layers under --compile (Conv1D as addmm, the fused c_attn split, GELU-tanh, LayerNorm with bias,
    dropout's masks): the min-cut and fusion rules of the Llama-layout layers, no eager upper bound."""
    from memtui.engine.model.validation import unmodelled_compile
    from memtui.engine.trace.runner import trace

    spec = _gpt2(layers=2, vocab=vocab)
    config = TrainingConfig(model="gpt2", gpu="h100-80gb", batch_size=2, seq_len=512, compile=True, **options)
    assert unmodelled_compile(config, spec) == ""
    traced = trace(config, model=spec).traced_tensor_peak_bytes
    estimated = estimate(config, model=spec).tensor_peak_bytes - cublas_workspace_bytes(resolve_gpu("h100-80gb"))
    assert abs(estimated - traced) / traced < 0.002, (estimated, traced)
    eager = estimate(config.model_copy(update={"compile": False}), model=spec).tensor_peak_bytes
    assert eager - estimated > 0.05 * traced  # compiled: less kept for backward than eager's upper bound


def _gpt2(layers: int, vocab: int | None):
    import copy

    from memtui.engine.model.architectures import model_spec_from_config
    from memtui.engine.model.presets import resolve_model

    config = copy.deepcopy(resolve_model("gpt2").hf_config())
    config.update(n_layer=layers, **({"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0} if vocab else {}))
    return model_spec_from_config(config, model_id="small-gpt2", source="test")
