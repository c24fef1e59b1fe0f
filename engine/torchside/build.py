"""Build the real architecture with the training options applied, for traces and live runs.

One place decides what "bf16-mixed + LoRA r=16 + full checkpointing" means in
code, so the tracer (fake tensors, CPU) and the live worker (real tensors, CUDA
or CPU) train exactly the same thing, and the estimator models exactly that:

- the model comes from transformers' own class for the family, built from the
  preset's config.json (no weights are downloaded);
- precision: `-true` builds the model in that dtype; `-mixed` keeps fp32
  weights and runs forward and loss under autocast; `16-mixed` adds a GradScaler;
- attention: "flash" is transformers' `sdpa` implementation, "eager" its eager one;
- checkpointing: "full" is transformers' activation checkpointing of every
  decoder layer (non-reentrant); "selective" is the same per-layer checkpoint
  with PyTorch's selective activation checkpointing policy (SELECTIVE_SAVE_OPS):
  matmul and fused-attention outputs are kept, the pointwise ops are recomputed;
  "selective-op" is torchtitan's op-level policy (torchtitan_op_policy): every other mm kept;
- LoRA: peft, with --lora-dropout, every other weight frozen; adapters in fp32 (peft's
  autocast_adapter_dtype=True) or, with --lora-dtype compute, in the dtype of the layers they adapt;
  `lm_head` among the targets adapts the output head too (peft's target_modules);
- quant: bitsandbytes on CUDA; elsewhere memtui's replicas (memtui.engine.torchside.replicas)
  that allocate exactly what bitsandbytes allocates (--bnb-version legacy: as before 0.43.2); --kbit-prep then runs peft's
  prepare_model_for_kbit_training (checkpointing stays what --checkpointing says);
- the training step drops the model output before backward (as HF's Trainer does),
  so the logits are not kept alive through backward.

torch and transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from memtui.engine.estimator.sim.families import fused_linear_chunk_rows
from memtui.engine.model.architectures import EAGER_ONLY_FAMILIES, ModelSpec
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import HEAD_TARGET, adapts_head, resolve_lora_targets

if TYPE_CHECKING:
    import torch

PhaseHook = Callable[[str], None]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def compute_dtype(config: TrainingConfig):
    """The dtype matmuls run in."""
    import torch

    if config.precision == "32-true":
        return torch.float32
    return torch.float16 if config.precision.startswith("16") else torch.bfloat16


def parameter_dtype(config: TrainingConfig):
    """The dtype the (unquantized) weights are stored in."""
    import torch

    if config.precision in ("16-true", "bf16-true"):
        return compute_dtype(config)
    return torch.float32


def hf_config(spec: ModelSpec, config: TrainingConfig | None = None, **overrides: Any):
    """The transformers config object for a spec, with our training choices set."""
    from transformers import AutoConfig

    values = spec.hf_config()
    values.update(overrides)
    values.pop("architectures", None)
    values["use_cache"] = False
    model_type = values.pop("model_type")
    hf = AutoConfig.for_model(model_type, **values)
    attention = "sdpa" if config is not None and config.attention == "flash" else "eager"
    if spec.family in _SOFTCAP_FAMILIES or spec.family in EAGER_ONLY_FAMILIES:
        attention = "eager"  # transformers refuses SDPA here; see _use_fused_attention and EAGER_ONLY_FAMILIES
    hf._attn_implementation = attention
    return hf


# Families whose attention applies a logit softcap, which SDPA cannot; on CUDA they train
# with FlashAttention-2, which applies the softcap inside the fused kernel.
_SOFTCAP_FAMILIES = {"gemma2"}


def _use_fused_attention(model) -> None:
    """Run a softcap family through SDPA: the memory of FlashAttention-2's fused kernel.

    The softcap itself is skipped (FlashAttention-2 applies it inside the kernel, at no
    memory cost); the memory of the step is what a FlashAttention-2 run allocates.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def fused(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("softcap", None)
        kwargs.pop("sliding_window", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["memtui_fused"] = fused
    for submodule in model.modules():
        sub_config = getattr(submodule, "config", None)
        if sub_config is not None and hasattr(sub_config, "_attn_implementation"):
            sub_config._attn_implementation = "memtui_fused"


def _causal_lm_class(spec: ModelSpec):
    import transformers

    return getattr(transformers, spec.architecture)


def hf_model_on_meta(spec: ModelSpec, **overrides: Any):
    """The architecture on the meta device: shapes only, instant, for counting."""
    import torch

    with torch.device("meta"):
        return _causal_lm_class(spec)(hf_config(spec, **overrides))


def build_model(spec: ModelSpec, config: TrainingConfig, *, device: str | torch.device = "cpu", quant_backend: str = "auto"):
    """The model, on `device`, with precision, attention, checkpointing, quantization and LoRA applied.

    quant_backend: "bitsandbytes" (CUDA), "replica" (memtui's allocation-exact stand-in)
    or "auto" (bitsandbytes when the device is CUDA).
    """
    import torch

    if config.modeling == "litgpt":  # LitGPT's GPT and LoRA layers (validation limits the options)
        from memtui.engine.torchside.litgpt import build_litgpt

        model = build_litgpt(spec, config, parameter_dtype(config), device)
        model.memtui_loss = (config.loss, config.loss_chunks, config.loss_dtype)
        return model
    cls = _causal_lm_class(spec)
    hf = hf_config(spec, config)
    dtype = parameter_dtype(config)
    if config.quant != "none" and config.precision != "32-true":
        # The frozen, unquantized parts of a quantized base (embeddings, norms, head) are 16-bit.
        dtype = compute_dtype(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    if config.attention == "flash" and spec.family in _SOFTCAP_FAMILIES:
        _use_fused_attention(model)

    if config.checkpointing != "none":
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(selective_checkpoint_kwargs(config.checkpointing) if config.checkpointing != "full" else None)
    model.memtui_checkpointing = config.checkpointing  # under --compile (torchside/compiled.py partition_layers)

    if config.quant != "none":
        from memtui.engine.torchside.replicas import quantize_linears

        backend = quant_backend
        if backend == "auto":
            backend = "bitsandbytes" if torch.device(device).type == "cuda" else "replica"
        quantize_linears(model, spec, quant=config.quant, compute_dtype=compute_dtype(config), backend=backend,
                         legacy=config.bnb_version == "legacy")
    if config.kbit_prep:
        prepare_for_kbit_training(model)
    if config.float8 != "off":
        from memtui.engine.torchside.float8 import convert_to_float8

        convert_to_float8(model)

    if config.uses_lora:
        model = apply_lora(model, spec, config)
    # training_step reads how to compute the loss from the model: its callers need not know.
    model.memtui_loss = (config.loss, config.loss_chunks, config.loss_dtype)
    if config.logits_upcast == "model":
        upcast_logits(model)
    model.memtui_eager_loss = config.eager_loss  # under --compile (torchside/compiled.py compiled_losses)
    if config.activation_offload:
        from memtui.engine.torchside.offload import offload_decoder_activations

        model.memtui_offload = offload_decoder_activations(model, torch.device(device).type)
    return model


def prepare_for_kbit_training(model) -> None:
    """peft's prepare_model_for_kbit_training: every 16-bit parameter that is not 4-bit (norms, embeddings,
    head, biases; int8 weights are not 16-bit) becomes fp32. Its checkpointing (and the input require-grads
    that goes with it) is left to --checkpointing, as TRL and Axolotl pass their gradient_checkpointing."""
    from peft import prepare_model_for_kbit_training

    with swappable_fake_parameters():
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_lora(model, spec: ModelSpec, config: TrainingConfig):
    from peft import LoraConfig, get_peft_model

    targets = list(resolve_lora_targets(config, model=spec))
    if adapts_head(config):
        targets.append(HEAD_TARGET)  # peft matches the output head by its module name
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=spec.family == "gpt2" and config.quant == "none",  # quantized: Linear4bit/8bitLt, not Conv1D
        task_type="CAUSAL_LM",
    )
    if config.quant != "none":
        from memtui.engine.torchside.replicas import lora_wrappers

        wrappers = lora_wrappers()
        if wrappers and any(type(module) in wrappers for module in model.modules()):
            lora._register_custom_module(wrappers)
    with swappable_fake_parameters():
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=config.lora_dtype == "fp32")
        if config.lora_dtype == "compute":
            # peft moves each adapter to its base layer's dtype (a 4-bit layer's compute dtype), but leaves it in
            # its creation dtype (fp32) on an int8 layer, which has neither: there, the compute dtype.
            dtype = torch_dtype(config.adapter_dtype)
            for module in peft_model.modules():
                base = module.get_base_layer() if hasattr(module, "lora_A") else None
                if base is not None and not base.weight.dtype.is_floating_point and not hasattr(base, "compute_dtype"):
                    module.lora_A.to(dtype)
                    module.lora_B.to(dtype)
    return peft_model


@contextlib.contextmanager
def swappable_fake_parameters() -> Iterator[None]:
    """Let Module.to() work on fake parameters (peft moves every adapter it creates).

    Module._apply swaps fake parameters in place, and torch refuses to swap a
    tensor something holds a weak reference to; the fake mode's own conversion
    memo holds one. We drop that memo entry just before the swap: it only
    caches real-to-fake conversions, which a trace never reuses.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap(first, second):
        for tensor in (first, second):
            if isinstance(tensor, FakeTensor):
                memo = tensor.fake_mode.fake_tensor_converter.meta_converter.tensor_memo
                for key in [key for key, value in list(memo.items()) if value is tensor]:
                    del memo[key]
        return original(first, second)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


# What selective checkpointing keeps: the ops torchtitan's op-level policy saves (torchtitan 0.2.2,
# torchtitan/distributed/activation_checkpoint.py, SelectiveAC: the partitioner's compute-intensive ops
# and every SDPA kernel) as they occur in a decoder layer here: the projections (mm, addmm; grouped for
# MoE experts) and the fused attention kernels. Two differences, both for a plain reason: every matmul is
# kept (torchtitan recomputes every second one, so backward would rerun GEMMs), and bmm is not (eager
# attention's s x s scores are then recomputed, as in Megatron's selective recomputation, instead of kept).
# What is recomputed in backward is the cheap pointwise work: norms, RoPE, activations, casts, softmax.
SELECTIVE_SAVE_OPS = (
    "mm", "addmm", "_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def selective_checkpoint_kwargs(policy: str = "selective") -> dict[str, Any]:
    """torch.utils.checkpoint arguments for selective activation checkpointing: SELECTIVE_SAVE_OPS, or with
    policy "selective-op" torchtitan's op-level policy (torchtitan_op_policy).

    create_selective_checkpoint_contexts stores the outputs of the ops the policy saves during the forward
    and hands them back to the recompute, which reruns only the rest of the layer.
    """
    import torch
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if policy == "selective-op":
        save_ops = torchtitan_save_ops()
        return {"use_reentrant": False,
                "context_fn": lambda: create_selective_checkpoint_contexts(torchtitan_op_policy(save_ops))}
    saved = [getattr(torch.ops.aten, name).default for name in SELECTIVE_SAVE_OPS if hasattr(torch.ops.aten, name)]
    return {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, saved)}


def torchtitan_save_ops() -> set:
    """The ops torchtitan's SelectiveAC saves (torchtitan/distributed/activation_checkpoint.py,
    _get_default_save_ops, at b5bcd76, 2026-08): the partitioner's compute-intensive ops (mm, addmm, bmm, the
    flash and memory-efficient SDPA kernels, ...), the other SDPA kernels, max, linear, topk, and the
    reduce-scatter and all-to-all collectives; plus the CPU flash kernel a trace runs in place of CUDA's."""
    import torch
    from torch._functorch.partitioners import get_default_op_list

    aten = torch.ops.aten
    ops = {op.default for op in get_default_op_list().compute_intensive_ops}
    named = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
             "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_flash_attention_for_cpu",
             "max", "linear", "topk")
    ops |= {getattr(aten, name).default for name in named if hasattr(aten, name)}
    functional = getattr(torch.ops, "_c10d_functional", None)
    for name in ("reduce_scatter_tensor", "all_to_all_single"):
        if functional is not None and hasattr(functional, name):
            ops.add(getattr(functional, name).default)
    return ops


def torchtitan_op_policy(save_ops: set):
    """torchtitan's SelectiveAC policy for one checkpointed region: save the outputs of `save_ops`, except every
    second mm (counted in the forward and in the recompute alike), and any copy from CUDA to the CPU."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    mm_ops = (aten.mm.default, aten.linear.default)
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs):
        if (func == aten._to_copy.default and "cuda" in str(args[0].device)
                and str(kwargs.get("device", "")) == "cpu"):
            return CheckpointPolicy.MUST_SAVE
        mode = "recompute" if ctx.is_recompute else "forward"
        if func in mm_ops:
            counts[mode] += 1
        if func in save_ops and not (func in mm_ops and counts[mode] % 2 == 0):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model, config: TrainingConfig, *, device_type: str = "cuda"):
    """The optimizer over the trainable parameters, with the implementation asked for; with
    optimizer_in_backward, one per parameter stepped in backward (OptimizerInBackward)."""
    if config.optimizer_in_backward:
        return OptimizerInBackward(
            {parameter: _optimizer_over([parameter], model, config, device_type)
             for parameter in trainable_parameters(model)})
    return _optimizer_over(trainable_parameters(model), model, config, device_type)


class OptimizerInBackward:
    """torchtune's optimizer_in_bwd: one optimizer per parameter, stepped by a post-accumulate-grad hook the
    moment its gradient is whole, the gradient freed right after; so a full set of gradients never exists.
    step() and zero_grad() have nothing left to do; `state` and `param_groups` gather every inner optimizer's."""

    def __init__(self, optimizers: dict) -> None:
        self.optimizers = optimizers
        for parameter in optimizers:
            parameter.register_post_accumulate_grad_hook(self._step_one)

    def _step_one(self, parameter) -> None:
        optimizer = self.optimizers[parameter]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict:
        return {key: value for optimizer in self.optimizers.values() for key, value in optimizer.state.items()}

    @property
    def param_groups(self) -> list:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _optimizer_over(params: list, model, config: TrainingConfig, device_type: str):
    import torch

    impl = config.optimizer_impl
    flags: dict[str, Any] = {"foreach": impl == "foreach"}
    if impl == "fused":
        flags = {"fused": True}
    name = config.optimizer
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)
    elif name == "sgd":
        optimizer = torch.optim.SGD(params, lr=1e-3, **flags)
    elif name == "sgd-momentum":
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **flags)
    elif name == "adafactor":
        optimizer = torch.optim.Adafactor(params, lr=1e-2, foreach=impl == "foreach")
    elif name == "lion":
        from memtui.engine.torchside.optim import Lion

        optimizer = Lion(params, lr=1e-4, weight_decay=0.01, foreach=impl == "foreach")
    elif name == "galore-adamw":
        from memtui.engine.torchside.optim import galore_adamw

        optimizer = galore_adamw(model, rank=config.galore_rank, foreach=impl == "foreach", fused=impl == "fused")
    elif name == "adamw-8bit":
        from memtui.engine.torchside.replicas import adamw_8bit

        optimizer = adamw_8bit(params, device_type=device_type)
    elif name in ("paged-adamw-8bit", "paged-adamw"):
        from memtui.engine.torchside.optim import paged_adamw

        optimizer = paged_adamw(params, optim_bits=8 if name == "paged-adamw-8bit" else 32, device_type=device_type,
                                paged=device_type == "cuda")
    else:  # pragma: no cover - TrainingConfig validates the name
        raise ValueError(name)
    if config.master_weights:
        from memtui.engine.torchside.optim import MasterWeights

        optimizer = MasterWeights(optimizer)
    return optimizer


@contextlib.contextmanager
def autocast_for(config: TrainingConfig, device_type: str) -> Iterator[None]:
    """torch.autocast for the -mixed precisions, nothing otherwise."""
    import torch

    if not config.autocast:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=compute_dtype(config)):
        yield


def synthetic_batch(spec: ModelSpec, config: TrainingConfig, *, device: str | torch.device = "cpu", seed: int = 0):
    """Random token ids (the content does not change memory) and labels equal to them."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (config.batch_size, config.seq_len), generator=generator)
    ids = ids.to(device)
    return ids, ids


def training_step(
    model,
    optimizer,
    input_ids,
    labels,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler=None,
    phase: PhaseHook | None = None,
    micro_batches: int = 1,
) -> float | None:
    """One step: `micro_batches` forwards with loss and backwards, the optimizer step, zero_grad(set_to_none=True).

    Gradient accumulation: every micro-batch's loss is divided by their count and its gradients are added to the
    ones already there; DDP skips the all-reduce (`no_sync`) on all but the last, FSDP2 reduce-scatters each and
    accumulates the shards (its default). An optimizer stepped in backward (`OptimizerInBackward`) has already
    stepped and freed every gradient when backward returns. Returns the last micro-batch's loss as a float when the
    tensors are real, None under fake tensors.
    """
    mark = phase or (lambda _name: None)
    value = None
    for index in range(micro_batches):
        last = index == micro_batches - 1
        no_sync = getattr(model, "no_sync", None)
        syncing = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        kept: list = []  # what the training loop keeps referenced through backward (LitGPT's `logits`)
        with syncing:
            mark("forward")
            with autocast():
                loss = causal_lm_loss(model, input_ids, labels, phase=mark, kept=kept)
            if micro_batches > 1:
                loss = loss / micro_batches
            mark("backward")
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        value = _loss_value(loss)
        if value is not None:
            value *= micro_batches
        del loss, kept
    mark("optimizer")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("end")
    return value


def _loss_value(loss) -> float | None:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(loss, FakeTensor):
        return None
    return float(loss.detach())


# ---- the head and the loss (--loss) -------------------------------------------------------------------
IGNORE_INDEX = -100


def causal_lm_loss(model, input_ids, labels, *, phase: PhaseHook | None = None, kept: list | None = None):
    """The forward and the loss as --loss and --loss-dtype say (`model.memtui_loss`, set by build_model).

    standard: transformers' own (the head's logits, upcast to fp32 in the loss). chunked:
    torchtune's chunked output and CEWithChunkedOutputLoss, or with --loss-dtype compute LitGPT's
    chunked head and chunked_cross_entropy (its logits appended to `kept`, which the caller holds through
    backward as LitGPT's loop does). fused-linear: Liger's fused linear cross-entropy, its kernel on CUDA
    when installed, else `FusedLinearCrossEntropy`.
    """
    mode, chunks, dtype = getattr(model, "memtui_loss", ("standard", 1, "fp32"))
    if mode == "standard":
        return model(input_ids=input_ids, labels=labels).loss
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = getattr(causal, causal.base_model_prefix)(input_ids=input_ids).last_hidden_state
    head = causal.get_output_embeddings()
    if mode == "chunked" and dtype == "compute":
        return litgpt_chunked_loss(hidden, head, labels, chunks, [] if kept is None else kept)
    if mode == "chunked":
        return chunked_output_loss(hidden, head, labels, chunks,
                                   getattr(model, "memtui_cross_entropy", compute_cross_entropy))
    if phase is not None:
        phase("loss")  # the tracer marks the loss phase when the head runs; this head is never called
    return fused_linear_loss(hidden, head.weight, labels)


def upcast_logits(model) -> None:
    """torchtune's TransformerDecoder: `self.output(h).float()` (torchtune/modules/transformer.py, at 1814feb17), so
    the model returns fp32 logits and the head's own output is a temporary. The head's forward hook returns the
    cast in its place; transformers' loss then finds them fp32 (its `logits.float()` returns them as they are)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal.get_output_embeddings().register_forward_hook(lambda _module, _args, output: output.float())


def shifted_labels(labels):
    """transformers' ForCausalLMLoss shift: pad one ignored label at the end, drop the first."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def compute_cross_entropy(logits, labels):
    """torchtune's CEWithChunkedOutputLoss.compute_cross_entropy: one chunk's upcast and cross-entropy (sum), the
    part of the loss torchtune's recipes compile (training.compile_loss)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_output_loss(hidden, head, labels, chunks: int, cross_entropy=compute_cross_entropy):
    """torchtune: the model returns the head's output per sequence chunk (compute dtype, all alive
    together); CEWithChunkedOutputLoss upcasts one chunk at a time inside cross-entropy (sum).
    `cross_entropy`: compute_cross_entropy, compiled under --compile."""
    targets = shifted_labels(labels)
    logits = [head(part) for part in hidden.chunk(chunks, dim=1)]
    return chunked_logits_loss(logits, targets, chunks, cross_entropy)


def chunked_logits_loss(logits: list, targets, chunks: int, cross_entropy=compute_cross_entropy):
    """CEWithChunkedOutputLoss on the model's chunked logits and the shifted labels: each chunk upcast inside its
    cross-entropy (sum), over the labels that count. `logits` is emptied once every chunk's loss is taken (the
    recipe lets go of the model's output then)."""
    total = None
    for logit, target in zip(logits, targets.chunk(chunks, dim=1)):
        chunk_loss = cross_entropy(logit.reshape(-1, logit.size(-1)), target.reshape(-1))
        total = chunk_loss if total is None else total + chunk_loss
    logits.clear()
    return total / (targets != IGNORE_INDEX).sum()


def litgpt_chunked_loss(hidden, head, labels, chunks: int, kept: list):
    """LitGPT's fine-tuning step (litgpt/finetune/lora.py fit, litgpt/utils.py chunked_cross_entropy):
    the model returns the head's output per sequence chunk (lm_head_chunk_size), in the compute dtype and
    never soft-capped (litgpt/lora.py GPT.forward returns the chunks before capping); the loop slices the
    last chunk for the shift and keeps the list (`kept` here) through backward; the loss takes each chunk
    as it is (no fp32 upcast), reduction none, and sums the concatenated per-token losses."""
    import torch
    import torch.nn.functional as F

    logits = [head(part) for part in hidden.chunk(chunks, dim=1)]
    logits[-1] = logits[-1][..., :-1, :]
    kept.append(logits)
    targets = labels[..., 1:]
    logit_chunks = [chunk.reshape(-1, chunk.size(-1)) for chunk in logits]
    target_chunks = [chunk.reshape(-1) for chunk in targets.split(logits[0].size(1), dim=1)]
    loss_chunks = [F.cross_entropy(logit, target, ignore_index=IGNORE_INDEX, reduction="none")
                   for logit, target in zip(logit_chunks, target_chunks)]
    non_masked = (targets != IGNORE_INDEX).sum()
    return torch.cat(loss_chunks).sum() / non_masked.maximum(torch.ones_like(non_masked))


def fused_linear_loss(hidden, weight, labels):
    targets = shifted_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.size(-1))
    if flat.is_cuda:
        with contextlib.suppress(ImportError):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(weight, flat, targets)
        with contextlib.suppress(ImportError):
            from cut_cross_entropy import linear_cross_entropy

            return linear_cross_entropy(flat, weight, targets, ignore_index=IGNORE_INDEX)
    return _fused_linear_function().apply(flat, weight, targets)


@functools.cache
def _fused_linear_function():
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """Liger's chunked forward in plain torch, allocating what its kernel allocates.

        Forward computes the loss and both gradients: per chunk of rows the logits (compute dtype),
        turned in place into d loss / d logits, then grad_input's rows and grad_weight += chunk.
        Backward hands the saved gradients on (scaled when the upstream gradient is not 1).
        """

        @staticmethod
        def forward(ctx, flat, weight, targets):
            rows, width = flat.shape
            vocab = weight.shape[0]
            chunk = fused_linear_chunk_rows(rows, vocab, width)
            grad_input = torch.zeros_like(flat)
            grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
            loss_rows = torch.zeros(rows, dtype=torch.float32, device=flat.device)
            valid = targets != IGNORE_INDEX
            count = valid.sum()
            for start in range(0, rows, chunk):
                end = min(start + chunk, rows)
                part = flat[start:end]
                logits = part @ weight.t()  # chunk x vocab
                target = targets[start:end]
                keep = valid[start:end]
                safe = target.clamp(min=0).unsqueeze(1)
                picked = logits.gather(1, safe).float().squeeze(1)
                top = logits.amax(dim=1, keepdim=True)
                logits.sub_(top).exp_()  # in place, as Liger's kernel writes the gradient over the logits
                norm = logits.sum(dim=1, keepdim=True, dtype=torch.float32)
                loss_rows[start:end] = torch.where(keep, norm.log().squeeze(1) + top.float().squeeze(1) - picked, 0.0)
                logits.div_(norm).scatter_add_(1, safe, torch.full_like(safe, -1, dtype=logits.dtype))
                logits.mul_((keep.unsqueeze(1) / count).to(logits.dtype))
                grad_input[start:end] = logits @ weight
                if grad_weight is not None:
                    torch.addmm(grad_weight, logits.t().to(part.dtype), part, out=grad_weight)
                del logits
            loss = loss_rows.sum() / count
            ctx.save_for_backward(grad_input, grad_weight)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            grad_input, grad_weight = ctx.saved_tensors
            if torch.ne(grad_output, torch.tensor(1.0, device=grad_output.device)):
                grad_input.mul_(grad_output)
                if grad_weight is not None:
                    grad_weight.mul_(grad_output)
            return grad_input, grad_weight, None

    return FusedLinearCrossEntropy
