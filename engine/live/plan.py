"""What a live run will train, what the estimator predicts for it, and whether it may start.

Pure Python (no torch): the parent calls `make_plan` with NVML/psutil's view of
the device to refuse early, and the worker calls it again with torch's view
(free memory after its own CUDA context, the runtime it actually loaded) and
runs exactly that plan. The prediction is for the scaled configuration as run,
so predicted and measured compare like for like.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import InputError
from memtui.engine.estimator import estimate
from memtui.engine.estimator.overhead import cublas_workspace_bytes
from memtui.engine.estimator.reserved import check_seq_lens, parse_seq_lens, with_reserved
from memtui.engine.live import sizing
from memtui.engine.live.devices import LocalDevice
from memtui.engine.model.presets import resolve_model
from memtui.engine.model.specs import Budget, TrainingConfig
from memtui.engine.units import GiB, format_gib

UNSUPPORTED_CHOICES = ("refuse", "skip")
DEFAULT_MAX_FRACTION = 0.25
# Before the worker has measured its own runtime: Python + torch + transformers resident on the CPU.
ASSUMED_CPU_RUNTIME_BYTES = 1 * GiB
MAX_CPU_RANKS = 4
# On CPU, a run is stopped (as an OOM) before tensors pass this share of the RAM available.
CPU_SAFETY_FRACTION = 0.8


@dataclass(frozen=True)
class LiveOptions:
    """The live run's own knobs; everything else comes from the TrainingConfig."""

    device: str = "auto"  # auto, cpu, cuda
    steps: int | None = None  # None: 3 on CPU, 10 on CUDA
    layers: int | None = None
    width: int | None = None  # target hidden size
    vocab: int | None = None
    seq_len: int | None = None  # None: the config's, capped on CPU
    batch_size: int | None = None  # None: the config's, capped on CPU
    max_fraction: float = DEFAULT_MAX_FRACTION
    force: bool = False
    if_unsupported: str = "refuse"  # refuse or skip an option this device cannot run
    capacity_bytes: int | None = None  # pretend the device holds only this much (OOM demos); CPU: tensors only
    hz: float = 20.0
    record_nvml: str | None = None
    breakdown: bool = True  # track every tensor for a per-component measurement (always on for CPU)
    seq_lens: str | None = None  # each step's length, as `memtui estimate --seq-lens` takes it (padded batches)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LiveOptions:
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError("--device", f"{self.device!r} is not a valid choice", "auto, cpu, cuda")
        if self.if_unsupported not in UNSUPPORTED_CHOICES:
            raise InputError("--if-unsupported", f"{self.if_unsupported!r} is not a valid choice", "refuse, skip")
        if not 0.0 < self.max_fraction <= 1.0:
            raise InputError("--max-fraction", f"must be in (0, 1], got {self.max_fraction}", "0.01..1")
        for name in ("steps", "layers", "width", "vocab", "seq_len", "batch_size", "capacity_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError("--" + name.replace("_", "-"), f"must be at least 1, got {value}")
        if self.hz < 1 or self.hz > 1000:
            raise InputError("--hz", f"must be between 1 and 1000, got {self.hz}", "1..1000")


@dataclass
class RunPlan:
    full_spec: ModelSpec
    spec: ModelSpec  # the scaled model
    requested: TrainingConfig
    config: TrainingConfig  # as run: scaled seq/batch, unsupported options dropped
    shape: sizing.Shape
    steps: int
    ranks: int
    device: LocalDevice
    budget: Budget
    predicted_tensor_peak: int
    predicted_device_peak: int
    predicted_components: dict[str, int]
    adjustments: dict[str, int]
    runtime_bytes: int
    target_bytes: int
    estimated_seconds: float
    changes: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    refusal: str = ""  # why the run may not start; "" when it may
    capacity_set: bool = False
    seq_lens: tuple[int, ...] = ()  # each step's length in the scaled run, when they vary

    @property
    def fit_bytes(self) -> int:
        """What is held against the target: the device peak, or on a CPU with --capacity the tensor peak."""
        if self.device.kind == "cpu" and self.capacity_set:
            return self.predicted_tensor_peak
        return self.predicted_device_peak

    @property
    def fits(self) -> bool:
        return self.fit_bytes <= self.target_bytes

    def set_cpu_runtime(self, runtime_bytes: int) -> None:
        """The CPU runtime as measured once the model is built (RSS less tensor bytes), before step 1.

        Like the CUDA context on a GPU, it is measured before the first training
        allocation: transformers' modelling code and the model's Python objects are
        only loaded by the build, after the first (pre-plan) measurement.
        """
        if self.device.kind != "cpu":
            return
        self.runtime_bytes = runtime_bytes
        self.predicted_device_peak = self.predicted_tensor_peak + runtime_bytes
        self.predicted_components["overhead"] = runtime_bytes
        self.adjustments["cpu_runtime_bytes"] = runtime_bytes

    def scaled_model_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "id": spec.id, "name": spec.name, "family": spec.family, "scaled_from": self.full_spec.id,
            "layers": spec.num_layers, "full_layers": self.full_spec.num_layers, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
            "params": spec.params, "seq_len": self.config.seq_len, "batch_size": self.config.batch_size,
            "ranks": self.ranks, "changes": self.changes, "config": self.config.model_dump(mode="json"),
            "seq_lens": list(self.seq_lens) or None,
        }

    def predicted_json(self) -> dict[str, Any]:
        return {
            "tensor_peak_bytes": self.predicted_tensor_peak,
            "device_peak_bytes": self.predicted_device_peak,
            "components": self.predicted_components,
            "peak_phase": self.budget.peak_phase,
            "estimator_tensor_peak_bytes": self.budget.tensor_peak_bytes,
            "estimator_device_peak_bytes": self.budget.device_peak_bytes,
            "reserved_peak_bytes": self.budget.reserved_peak_bytes,  # None: not replayed (CPU, or a note says why)
            "fragmentation_bytes": self.budget.fragmentation_bytes,
            "adjustments": self.adjustments,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "type": "plan", "scaled_model": self.scaled_model_json(), "steps": self.steps,
            "predicted": self.predicted_json(), "target_bytes": self.target_bytes, "fits": self.fits,
            "estimated_seconds": round(self.estimated_seconds, 2), "device": self.device.as_json(),
            "notices": self.notices, "refusal": self.refusal,
        }


def _cuda_only(config: TrainingConfig) -> list[tuple[str, dict[str, Any], str]]:
    """(flag, replacement, reason) for each option that needs CUDA."""
    found = []
    if config.quant != "none":
        found.append(("--quant", {"quant": "none", "kbit_prep": False},
                      f"{config.quant} weights need CUDA (bitsandbytes)"))
    if config.optimizer == "adamw-8bit":
        found.append(("--optimizer", {"optimizer": "adamw"}, "adamw-8bit needs CUDA (bitsandbytes)"))
    if config.float8 != "off":
        found.append(("--float8", {"float8": "off"}, "float8 matmuls (torch._scaled_mm) need a CUDA GPU of compute "
                      "capability 8.9 or later"))
    return found


def _not_built(config: TrainingConfig, device: LocalDevice) -> list[tuple[str, dict[str, Any], str]]:
    """Options whose implementation module is absent from this installation."""
    found = []
    needs = {"lion": "memtui.engine.torchside.optim", "galore-adamw": "memtui.engine.torchside.optim", "adamw-8bit": "memtui.engine.torchside.replicas"}
    module = needs.get(config.optimizer)
    if module and importlib.util.find_spec(module) is None:
        found.append(("--optimizer", {"optimizer": "adamw"}, f"{config.optimizer} is not available in this build ({module} missing)"))
    if (config.optimizer in ("paged-adamw-8bit", "paged-adamw") and device.kind == "cuda"
            and importlib.util.find_spec("bitsandbytes") is None):
        found.append(("--optimizer", {"optimizer": "adamw"}, f"{config.optimizer} needs bitsandbytes, not installed"))
    if config.master_weights and importlib.util.find_spec("memtui.engine.torchside.optim") is None:
        found.append(("--master-weights", {"master_weights": False}, "master weights are not available in this build"))
    if config.bnb_version == "legacy" and config.quant == "nf4" and device.kind == "cuda":
        installed = _bitsandbytes_version()
        if installed is None or installed >= (0, 43, 2):
            found.append(("--bnb-version", {"bnb_version": "current"},
                          f"legacy needs bitsandbytes before 0.43.2; {'none' if installed is None else '.'.join(map(str, installed))} "
                          "is installed, whose 4-bit matmul keeps no input"))
    if config.quant != "none" and importlib.util.find_spec("memtui.engine.torchside.replicas") is None:
        found.append(("--quant", {"quant": "none", "kbit_prep": False},
                      f"{config.quant} is not available in this build (memtui.engine.torchside.replicas missing)"))
    return found


def _bitsandbytes_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes release as numbers (0.42.0 -> (0, 42, 0)), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("bitsandbytes")
    except PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _not_live(config: TrainingConfig, device: LocalDevice, available_ranks: int) -> list[tuple[str, dict[str, Any], str]]:
    found = []
    if config.tp > 1 or config.pp > 1:
        found.append(("--tp", {"tp": 1, "pp": 1, "gpus": config.dp},
                      "tensor and pipeline parallelism are not run live (data-parallel ranks are)"))
    if config.offload != "none":
        found.append(("--offload", {"offload": "none"}, "offloading is not run live"))
    if config.shard_group:
        found.append(("--shard-group", {"shard_group": 0},
                      "hybrid sharding is not run live (the live ranks shard over all of them; memtui trace runs it)"))
    if config.float8 != "off" and device.kind == "cuda" and _capability(device) < (8, 9):
        found.append(("--float8", {"float8": "off"}, f"float8 matmuls (torch._scaled_mm) need compute capability 8.9 "
                      f"or later; this GPU's is {device.compute_capability}"))
    if config.dp > available_ranks:
        unit = "GPUs" if device.kind == "cuda" else "CPU processes"
        found.append(("--gpus", {"gpus": available_ranks * config.tp * config.pp},
                      f"{config.dp} data-parallel ranks asked, {available_ranks} local {unit} available"))
    return found


def _capability(device: LocalDevice) -> tuple[int, ...]:
    return tuple(int(part) for part in device.compute_capability.split(".")[:2])


def _apply_policy(config: TrainingConfig, device: LocalDevice, options: LiveOptions, available_ranks: int
                  ) -> tuple[TrainingConfig, list[str], str]:
    problems = []
    if device.kind == "cpu":
        problems += _cuda_only(config)
    problems += _not_built(config, device)
    problems += _not_live(config, device, available_ranks)
    if not problems:
        return config, [], ""
    if options.if_unsupported == "refuse":
        flag, _, reason = problems[0]
        return config, [], f"{flag}: {reason}; add --if-unsupported skip to run without it"
    update: dict[str, Any] = {}
    notices = []
    for _flag, replacement, reason in problems:
        update.update(replacement)
        notices.append(f"{reason}: the live run goes on without it (the prediction is for what runs)")
    data = config.model_dump()
    data.update(update)
    return TrainingConfig.model_validate(data), notices, ""


def _predicted(budget: Budget, device: LocalDevice, runtime_bytes: int) -> tuple[int, int, dict[str, int], dict[str, int]]:
    """(tensor peak, device peak, components, adjustments) comparable with what this device measures."""
    components = budget.per_gpu.model_dump()
    if device.kind == "cuda":
        return budget.tensor_peak_bytes, budget.device_peak_bytes, components, {}
    # The estimator models a CUDA step; a CPU run allocates no cuBLAS workspace and has no CUDA context.
    workspace = cublas_workspace_bytes(device.gpu_spec())
    # Nothing is paged on a CPU: a paged optimizer's states are ordinary memory there, constant through the step.
    tensor_peak = budget.tensor_peak_bytes - workspace + budget.paged_bytes
    components["temporary"] = max(0, components["temporary"] - workspace)
    components["optimizer_states"] += budget.paged_evicted_bytes
    components["overhead"] = runtime_bytes
    adjustments = {"cublas_workspace_bytes": -workspace, "cuda_overhead_bytes": -budget.per_gpu.overhead,
                   "cpu_runtime_bytes": runtime_bytes}
    if budget.paged_bytes:
        adjustments["paged_states_in_cpu_memory_bytes"] = budget.paged_bytes
    return tensor_peak, tensor_peak + runtime_bytes, components, adjustments


def available_ranks(device: LocalDevice, device_count: int | None) -> int:
    if device.kind == "cpu":
        return MAX_CPU_RANKS
    return max(1, device_count or 1)


def _activations_at_peak(config: TrainingConfig, full: ModelSpec) -> bool:
    """Whether the full-size configuration's peak holds activations (sizing keeps their share in the copy)."""
    try:
        return estimate(config, model=full).per_gpu.activations > 0
    except InputError:
        return False


def make_plan(
    requested: TrainingConfig, options: LiveOptions, device: LocalDevice, *, device_count: int | None = None,
    runtime_bytes: int | None = None, spec: ModelSpec | None = None,
) -> RunPlan:
    """Size, predict and check one live run; InputError for options that make no sense."""
    options.validate()
    full = spec or resolve_model(requested.model)
    if full.family == "generic":
        # The copy is narrower and shallower: a model of its own, whose program would need tracing at every size
        # the sizing loop tries.
        raise InputError("model", f"{full.id} is a generic model (traced layers): a live run of a scaled copy is not "
                         "supported for it yet; `memtui trace` measures its step exactly on fake tensors",
                         "a model of a replayed family (memtui presets)")
    runtime = runtime_bytes if runtime_bytes is not None else (ASSUMED_CPU_RUNTIME_BYTES if device.kind == "cpu" else 0)
    config, notices, refusal = _apply_policy(requested, device, options, available_ranks(device, device_count))
    if device.kind == "cpu" and config.activation_offload:
        notices.append("activation offload on the CPU: the copies to host memory and back are made within the same "
                       "memory, so the hook is a no-op in effect; the tracker counts the host copies apart, as "
                       "pinned memory on a GPU")
    if device.kind == "cpu" and config.compile:
        config = config.model_copy(update={"compile": False})
        notices.append("compile on the CPU: skipped, the run is eager (inductor's CPU code is not what a GPU runs, "
                       "and compiling takes minutes there); `memtui trace --compile` traces what compile saves")
    if device.kind == "cpu" and config.optimizer in ("paged-adamw-8bit", "paged-adamw"):
        notices.append(f"{config.optimizer} on the CPU: nothing is paged there, so its states are ordinary memory "
                       "(bitsandbytes' state layout, updated in place as its kernels do), counted in the tensor peak")
    defaults = sizing.CPU_DEFAULTS if device.kind == "cpu" else sizing.CUDA_DEFAULTS
    steps = options.steps or (3 if device.kind == "cpu" else 10)
    lengths = _step_lengths(options, config, full, device, steps)
    seq_len = options.seq_len or (max(lengths) if lengths else config.seq_len)
    batch_size = options.batch_size or config.batch_size
    shape = sizing.initial_shape(
        full, seq_len, batch_size, defaults, layers=options.layers, width=options.width, vocab=options.vocab,
        fixed_seq_len=options.seq_len is not None, fixed_batch_size=options.batch_size is not None,
        activations_at_peak=_activations_at_peak(config, full),
    )
    ranks = config.dp
    gpu = device.gpu_spec()
    if options.capacity_bytes is not None:
        target = options.capacity_bytes
    else:
        target = int(options.max_fraction * device.free_bytes)
    rate = defaults.flops_per_second * (1 if device.kind == "cuda" else max(1, _cpu_count() // 2))

    while True:
        scaled = sizing.scaled_spec(full, shape)
        # Lengths shrink with the sequence when the copy is scaled down; the longest step is the peak's.
        scaled_lengths = tuple(max(1, -(-length * shape.seq_len // max(lengths))) for length in lengths)
        run_config = config.model_copy(update={"seq_len": shape.seq_len, "batch_size": shape.batch_size})
        budget = estimate(run_config, model=scaled, gpu=gpu)
        tensor_peak, device_peak, components, adjustments = _predicted(budget, device, runtime)
        seconds = steps * sizing.step_flops(scaled, shape.seq_len, shape.batch_size) / rate
        held = tensor_peak if device.kind == "cpu" and options.capacity_bytes is not None else device_peak
        if held <= target and seconds <= defaults.time_budget_s:
            break
        next_shape = sizing.smaller(shape)
        if next_shape is None:
            break
        shape = next_shape
    if device.kind == "cuda":  # what max_memory_reserved will show: the run's steps replayed through the allocator
        # model (its `steps` count those after the first)
        budget = with_reserved(budget, run_config, scaled, gpu, seq_lens=scaled_lengths or None, steps=max(1, steps - 1))

    plan = RunPlan(
        full_spec=full, spec=scaled, requested=requested, config=run_config, shape=shape, steps=steps, ranks=ranks,
        device=device, budget=budget, predicted_tensor_peak=tensor_peak, predicted_device_peak=device_peak,
        predicted_components=components, adjustments=adjustments, runtime_bytes=runtime, target_bytes=target,
        estimated_seconds=seconds, changes=sizing.describe_changes(full, scaled, seq_len, batch_size, shape),
        notices=notices, refusal=refusal, capacity_set=options.capacity_bytes is not None, seq_lens=scaled_lengths,
    )
    if not plan.refusal and not plan.fits and not options.force:
        where = (f"the {format_gib(target)} capacity set" if options.capacity_bytes is not None
                 else f"{options.max_fraction:.0%} of the {format_gib(device.free_bytes)} free on {device.name}")
        plan.refusal = (f"the scaled run is predicted to need {format_gib(plan.fit_bytes)}, more than "
                        f"{where}; add --force to try anyway (an OOM is reported, not a crash)")
    return plan


def _step_lengths(options: LiveOptions, config: TrainingConfig, model: ModelSpec, device: LocalDevice,
                  steps: int) -> tuple[int, ...]:
    """Each step's length from --seq-lens (as estimate reads it: a list cycled, or uniform:MIN-MAX drawn), or ()."""
    if options.seq_lens is None:
        return ()
    lengths = parse_seq_lens(options.seq_lens, steps - 1)[:steps]
    check_seq_lens(lengths, config, model, device.gpu_spec())
    return lengths


def cpu_oom_limit(options: LiveOptions, available_now: int) -> int:
    """Tensor bytes at which a CPU run stops as an OOM.

    The capacity set (tensors only: the Python/torch runtime is not counted on a CPU),
    and never more than a safe share of the RAM available now, so a forced run cannot
    push the machine into swap.
    """
    safe = int(CPU_SAFETY_FRACTION * available_now)
    if options.capacity_bytes is not None:
        return min(options.capacity_bytes, safe)
    return safe


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def explain_size(plan: RunPlan, options: LiveOptions) -> list[str]:
    """What the copy's layers, width and steps resolved to, each with why (for the `R` form)."""
    full, scaled, shape = plan.full_spec, plan.spec, plan.shape
    defaults = sizing.CPU_DEFAULTS if plan.device.kind == "cpu" else sizing.CUDA_DEFAULTS
    where = f"{plan.device.kind.upper()} run"
    shrunk = f"halved until it fits {format_gib(plan.target_bytes)} and about {defaults.time_budget_s:.0f} s"
    lines = []
    if options.layers is not None:
        lines.append(f"Layers {scaled.num_layers}: as set (of {full.num_layers})")
    elif scaled.num_layers < min(full.num_layers, defaults.layers):
        lines.append(f"Layers {scaled.num_layers} of {full.num_layers}: automatic, {shrunk}")
    else:
        lines.append(f"Layers {scaled.num_layers} of {full.num_layers}: automatic, the {where}'s starting depth")
    heads = f"whole heads of {scaled.head_dim}, {sizing.group_size(full)} per key/value head"
    if options.width is not None:
        moved = "as set" if scaled.hidden_size == options.width else f"the nearest width made of {heads}"
        lines.append(f"Width {options.width} -> {scaled.hidden_size}: {moved}")
    elif scaled.hidden_size == full.hidden_size:
        lines.append(f"Width {scaled.hidden_size}: automatic, the full width")
    elif defaults.max_hidden is not None and shape.kv_heads == sizing.kv_for_width(full, defaults.max_hidden) and \
            scaled.hidden_size <= defaults.max_hidden:
        lines.append(f"Width {scaled.hidden_size} of {full.hidden_size}: automatic, at most {defaults.max_hidden} "
                     f"on a CPU ({heads})")
    else:
        lines.append(f"Width {scaled.hidden_size} of {full.hidden_size}: automatic, {shrunk}")
    lines.append(f"Steps {plan.steps}: " + ("as set" if options.steps is not None else f"automatic for a {where}"))
    return lines
