"""Run two training steps under FakeTensorMode with the MemoryTracker watching."""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.torchside.build import build_model, build_optimizer, compute_dtype, training_step
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.trace.cuda_autocast import cuda_autocast_policy, cuda_like_autocast
from memtui.engine.trace.cuda_dropout import cuda_dropout
from memtui.engine.trace.cuda_sdpa import cuda_sdpa
from memtui.engine.trace.cuda_softmax import cuda_softmax
from memtui.engine.trace.hf_patches import real_run_decisions
from memtui.engine.trace.tracker import MemoryLog, MemoryTracker, classify

STEPS = 2
# Gradient accumulation: micro-batches traced per step. From the second on each is the same (the full gradients
# alive, the new ones added in place), so the rest of a longer accumulation would only repeat them.
TRACED_MICRO_BATCHES = 4


def traced_micro_batches(config: TrainingConfig) -> int:
    return min(config.grad_accum, TRACED_MICRO_BATCHES)


@dataclass
class StepExtras:
    params: int = 0
    trainable_params: int = 0
    weights_replaced: list[str] = field(default_factory=list)
    compile_untraced: str = ""  # --compile: why the step was traced eagerly ("" when it was compiled)


def optimizer_state_tensors(optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(device state tensors, host-side step counters) of an optimizer or a wrapper of one."""
    device_states: list[torch.Tensor] = []
    host_states: list[torch.Tensor] = []
    fused = any(group.get("fused") for group in optimizer.param_groups)
    capturable = any(group.get("capturable") for group in optimizer.param_groups)
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            # torch.optim keeps `step` on the CPU unless the optimizer is fused or capturable.
            if key == "step" and value.dim() == 0 and not (fused or capturable):
                host_states.append(value)
            else:
                device_states.append(value)
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer keeps this rank's states in `optim`
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        inner_device, inner_host = optimizer_state_tensors(inner)
        device_states += inner_device
        host_states += inner_host
    extra = getattr(optimizer, "memtui_state_tensors", None)
    if extra is not None:
        inner_device, inner_host = extra()
        device_states += inner_device
        host_states += inner_host
    return device_states, host_states


def watch_model(tracker: MemoryTracker, model, gradients: set[int], owners: dict[int, int] | None = None,
                grad_layers: dict[int, int | None] | None = None) -> set[int]:
    """Register the weights (made before the tracker watched); add each gradient's allocation to
    `gradients` as backward makes it. Returns the weights' allocation ids. Layer tagging: `owners` (id(parameter
    or buffer) -> decoder layer) tags the weights, and each gradient's layer is recorded in `grad_layers` (alloc id -> layer)."""
    owners = owners or {}
    for parameter in model.parameters():
        tracker.track(parameter, "parameter", layer=owners.get(id(parameter)))
    for buffer in model.buffers():
        tracker.track(buffer, "buffer", layer=owners.get(id(buffer)))
    weight_ids = set(tracker.log.allocations)

    def grad_ready(parameter: torch.Tensor) -> None:
        alloc_id = tracker.alloc_id_of(parameter.grad)
        if alloc_id is not None:
            gradients.add(alloc_id)
            if grad_layers is not None:
                grad_layers[alloc_id] = owners.get(id(parameter))

    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(grad_ready)
    return weight_ids


def classify_by_owner(tracker: MemoryTracker, *, weights: set[int], gradients: set[int], optimizer, scaler) -> None:
    """Label the log's allocations: weights, gradients, the optimizer's states (GradScaler's scale and
    growth tracker among them: they live on the device) and host-side step counters; the rest by phase."""
    device_states, host_states = optimizer_state_tensors(optimizer) if optimizer is not None else ([], [])
    if scaler is not None:
        device_states += [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
                          if t is not None]
    optimizer_ids = {tracker.alloc_id_of(t) for t in device_states} - {None}
    host_ids = {tracker.alloc_id_of(t) for t in host_states} - {None}
    classify(tracker.log, weights=weights, gradients=gradients, optimizer=optimizer_ids, host=host_ids)


def tag_optimizer_states(tracker: MemoryTracker, optimizer, owners: dict[int, int]) -> None:
    """Layer tagging: each optimizer state (step counters too) belongs to its parameter's decoder layer."""
    for inner in (optimizer, getattr(optimizer, "optim", None)):
        for parameter, state in getattr(inner, "state", {}).items():
            layer = owners.get(id(parameter))
            for value in state.values() if layer is not None else ():
                alloc_id = tracker.alloc_id_of(value) if isinstance(value, torch.Tensor) else None
                if alloc_id is not None:
                    tracker.log.allocations[alloc_id].layer = layer


@contextlib.contextmanager
def quiet_libraries():
    """transformers and peft warn about things that are intended here (the tracer's and the live run's builds)."""
    previous = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(previous)


def final_norm(model):
    """The decoder's final norm (Llama's `norm`, GPT-2's `ln_f`), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("norm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def run_fake_steps(spec: ModelSpec, config: TrainingConfig, report=None, *, fake: bool = True,
                   parallel=None, layer_tags: bool = False) -> tuple[MemoryLog, StepExtras]:
    """Build the model and run two steps; `fake=False` runs real CPU tensors (for tests). `parallel`: the
    data-parallel wrapping of one rank (memtui.engine.trace.parallel.DataParallel), or None for one GPU.
    `layer_tags`: tag every event and allocation with its decoder layer (memtui.engine.trace.extend)."""
    report = report or (lambda _stage, _fraction: None)
    extras = StepExtras()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    tracker = MemoryTracker()
    gradients: set[int] = set()
    with quiet_libraries(), mode:
        report("building the model", 0.05)
        model = build_model(spec, config, device="cpu", quant_backend="replica")
        head = model.get_output_embeddings()
        # The loss phase starts at the final norm, as the estimator's head_fwd segment does: the norm, the head's
        # input all-gather under TP, its logits and its autocast weight copy belong to the loss, not the forward.
        (final_norm(model) or head).register_forward_pre_hook(lambda *_: tracker.mark("loss"), prepend=True)
        if config.compile:
            from memtui.engine.torchside.compiled import partition_layers, untraced_compile

            extras.compile_untraced = untraced_compile(config, parallel=parallel is not None)
            if not extras.compile_untraced:
                partition_layers(model, spec.num_layers, tracker.untracked)
        if parallel is not None:
            model = parallel.wrap(model, tracker)
        owners: dict[int, int] = {}
        grad_layers: dict[int, int | None] = {}
        tagging = contextlib.nullcontext()
        if layer_tags:
            from memtui.engine.torchside.compiled import decoder_layer_list
            from memtui.engine.trace.extend import layer_tagging, parameter_layers

            decoder = decoder_layer_list(model, spec.num_layers)
            owners = parameter_layers(decoder)
            tagging = layer_tagging(tracker, decoder)
        weight_ids = watch_model(tracker, model, gradients, owners, grad_layers)
        extras.params = sum(p.numel() for p in model.parameters())
        extras.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

        optimizer_config = config
        if fake and config.optimizer in ("sgd", "sgd-momentum") and config.optimizer_impl == "fused":
            # Fused SGD has no fake kernel: FakeTensorMode would run it on real zero-filled copies of every
            # parameter. Its foreach twin updates in place too, allocating exactly the same (nothing).
            optimizer_config = config.model_copy(update={"optimizer_impl": "foreach"})
        optimizer = build_optimizer(model, optimizer_config, device_type="cuda")
        if parallel is not None:
            optimizer = parallel.shard_optimizer(model, optimizer)
        for state in optimizer_state_tensors(optimizer)[0]:
            tracker.track(state, "optimizer_state")  # made with the optimizer (master copies), before the step
        if layer_tags:
            tag_optimizer_states(tracker, optimizer, owners)
        scaler = None
        if config.precision == "16-mixed":
            scaler = torch.amp.GradScaler("cpu")
            if fake:
                # Whether to skip the step depends on found_inf's value, which fake tensors do not have;
                # a healthy step (no inf) is the one that allocates, so always take it.
                scaler._maybe_opt_step = lambda optimizer, _state, *args, **kwargs: optimizer.step(*args, **kwargs)
        elif hasattr(parallel, "loss_scaler"):
            scaler = parallel.loss_scaler()  # DeepSpeed's fp16 engine scales the loss itself

        autocast_dtype = compute_dtype(config)

        def autocast():
            return cuda_like_autocast(autocast_dtype) if config.autocast else contextlib.nullcontext()

        tracker.mark("inputs")
        attention = cuda_sdpa() if config.attention == "flash" else contextlib.nullcontext()
        policy = cuda_autocast_policy() if config.autocast else contextlib.nullcontext()
        sharding = parallel.watching(tracker) if parallel is not None else contextlib.nullcontext()
        with attention, policy, cuda_dropout(), cuda_softmax(), real_run_decisions(), sharding, tagging, tracker:
            input_ids = torch.randint(0, spec.vocab_size, (config.batch_size, config.seq_len))
            labels = input_ids
            for step in range(1, STEPS + 1):
                tracker.step = step
                report(f"step {step} of {STEPS}", 0.1 + 0.85 * (step - 1) / STEPS)
                training_step(model, optimizer, input_ids, labels, autocast=autocast, scaler=scaler, phase=tracker.mark,
                              micro_batches=traced_micro_batches(config))

        classify_by_owner(tracker, weights=weight_ids, gradients=gradients, optimizer=optimizer, scaler=scaler)
        if layer_tags:
            from memtui.engine.trace.extend import tag_owned

            tag_owned(tracker.log, grad_layers)
            tag_optimizer_states(tracker, optimizer, owners)
        if parallel is not None:
            parallel.relabel(tracker.log)
        extras.weights_replaced = list(getattr(model, "memtui_replaced", []))
        tracker.detach_finalizers()
        del input_ids, labels
    return tracker.log, extras
