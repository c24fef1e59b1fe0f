"""The worker's run: set up the device, plan, build, train N steps, measure, summarise.

Runs inside `python -m memtui.engine.live.worker`; imports torch when `execute()` starts.
The model, optimizer, batch and step come from memtui.engine.torchside.build, so the live run
trains what the tracer traces. On the CPU the step runs under CUDA's autocast
policy and SDPA path (as the tracer does), so the tensors it allocates are the
ones a CUDA step allocates, and the MemoryTracker measures them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memtui.engine.estimator.overhead import cuda_context_bytes
from memtui.engine.live.compare import build_summary
from memtui.engine.live.devices import LocalDevice, cpu_device, visible_cuda_index
from memtui.engine.live.plan import LiveOptions, RunPlan, cpu_oom_limit, make_plan
from memtui.engine.live.protocol import Cancelled, Summary
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.telemetry.host import ProcessRss, available_memory_bytes
from memtui.engine.telemetry.nvml import Nvml
from memtui.engine.telemetry.recording import NvmlRecorder
from memtui.engine.telemetry.sampler import Sampler, nvml_source

PEAK_FIELDS = ("allocated", "allocated_peak", "reserved", "nvml_used", "nvml_process", "rss")


class Peaks:
    """Running maxima of the sampled fields."""

    def __init__(self) -> None:
        self.values: dict[str, int | None] = dict.fromkeys(PEAK_FIELDS)

    def update(self, sample: dict[str, Any]) -> None:
        for name in PEAK_FIELDS:
            value = sample.get(name)
            if value is not None and (self.values[name] is None or value > self.values[name]):
                self.values[name] = value

    def __getitem__(self, name: str) -> int | None:
        return self.values[name]


@dataclass
class _RunParts:
    """What the run builds, kept together so an OOM part-way leaves the built part measurable."""

    model: Any = None
    optimizer: Any = None
    scaler: Any = None
    probe: Any = None  # measure.LayerProbe
    input_ids: Any = None
    labels: Any = None
    layers: list = field(default_factory=list)
    weight_ids: set[int] = field(default_factory=set)
    gradients: set[int] = field(default_factory=set)
    oom_at: int | None = None  # bytes, where the run refused before allocating them

    def release(self) -> None:
        self.model = self.optimizer = self.input_ids = self.labels = None


class TrainingRun:
    def __init__(self, request: dict[str, Any], out: Callable[[dict[str, Any]], None], state: Any, started: float) -> None:
        self.config = TrainingConfig.model_validate(request["config"])
        self.options = LiveOptions.from_json(request.get("options") or {})
        self.kind = request.get("device", "cpu")
        self.out = out
        self.state = state
        self.started = started
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.peaks = Peaks()
        self.rss = ProcessRss()
        self.sampler = Sampler([state.fields, lambda: {"rss": self.rss.read()}], self._emit_sample,
                               hz=self.options.hz, started=started)
        if self.rank == 0:
            self.sampler.start()
        self._sampling = self.rank == 0
        self.plan: RunPlan | None = None
        self.tracker: Any = None
        self.counters: Any = None
        self.nvml: Nvml | None = None
        self.recorder: NvmlRecorder | None = None
        self.device_json: dict[str, Any] = {"kind": self.kind}
        self.torch_device: Any = None
        self.steps_completed = 0
        self.runtime_bytes: int | None = None
        self.context_bytes: int | None = None
        self.nvml_baseline_used: int | None = None
        self.train_started: float | None = None
        self.distributed = False

    # ---- stream helpers ---------------------------------------------------------------------
    def t(self) -> float:
        return round(time.monotonic() - self.started, 4)

    def _emit_sample(self, sample: dict[str, Any]) -> None:
        self.peaks.update(sample)
        self.out(sample)

    def stop_sampling(self) -> None:
        if self._sampling:
            self._sampling = False
            self.sampler.stop(final=True)

    def _mark(self, phase: str) -> None:
        if self.state.cancelled:
            raise Cancelled
        self.state.phase = phase
        if self.tracker is not None:
            self.tracker.mark(phase)
        self.out({"type": "phase", "t": self.t(), "step": self.state.step, "phase": phase,
                  "allocated": self._live_bytes()})

    def _live_bytes(self) -> int | None:
        if self.kind == "cpu" and self.tracker is not None:
            return self.tracker.live_bytes
        if self.counters is not None:
            return self.counters.allocated()
        return None

    # ---- the run ----------------------------------------------------------------------------
    def execute(self) -> int:
        self.state.phase = "importing torch"
        import torch

        from memtui.engine.trace.fake_step import quiet_libraries  # noqa: PLC0415 - torch is imported from here on

        with quiet_libraries():
            import memtui.engine.torchside.build  # noqa: F401 - imports transformers: part of the runtime measured below
            import memtui.engine.trace.hf_patches  # noqa: F401
        if self.kind == "cuda" and not torch.cuda.is_available():
            # NVML could not tell (no driver, WSL): torch is the last word, and this is the user's choice to fix.
            self.stop_sampling()
            self.out({"type": "refused", "reason": "--device: cuda was asked for but torch sees no CUDA device "
                                                   "here (allowed: auto, cpu)"})
            return 2
        if self.world > 1:
            self._init_distributed(torch)
        local, device_count = self._setup_device(torch)
        self.plan = make_plan(self.config, self.options, local, device_count=device_count,
                              runtime_bytes=self.runtime_bytes if self.kind == "cpu" else None)
        self.out(self.plan.as_json())
        if self.plan.refusal:
            self.stop_sampling()
            self.out({"type": "refused", "reason": self.plan.refusal})
            return 2
        for notice in self.plan.notices:
            self.out({"type": "notice", "level": "warning", "text": notice})
        if self.plan.steps < 2:
            self.out({"type": "notice", "level": "info",
                      "text": "the prediction is for a steady-state step (the 2nd on); one step has no optimizer states yet"})
        return self._train(torch)

    def _init_distributed(self, torch) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.kind == "cuda" else "gloo"
        if self.kind == "cuda":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend)
        self.distributed = True

    def _setup_device(self, torch) -> tuple[LocalDevice, int | None]:
        self.state.phase = "device"
        if self.kind == "cpu":
            self.torch_device = torch.device("cpu")
            self.runtime_bytes = self.rss.read() or 0
            local = cpu_device()
            self.device_json = {**local.as_json(), "runtime_bytes": self.runtime_bytes, "context_bytes": None,
                                "nvml": {"available": False, "reason": "CPU run"}, "world_size": self.world}
            self.out({"type": "device", **self.device_json})
            return local, None
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device here (use --device cpu)")
        index = self.local_rank
        device = torch.device("cuda", index)
        uuid = _torch_uuid(torch, index)
        nvml = Nvml(uuid=uuid) if uuid else Nvml(index=visible_cuda_index(index))
        if not nvml.open() and uuid:
            nvml = Nvml(index=visible_cuda_index(index))
            nvml.open()
        self.nvml = nvml
        before = nvml.read()
        torch.cuda.set_device(device)
        torch.cuda.synchronize(device)  # creates the CUDA context; no tensor is allocated yet
        after = nvml.read()
        pid = os.getpid()
        context = after.process_used([pid])
        context_source = "NVML process memory"
        if context is None and before.used is not None and after.used is not None:
            context, context_source = after.used - before.used, "NVML device used, before and after"
        self.context_bytes = context
        self.nvml_baseline_used = before.used
        free, total = torch.cuda.mem_get_info(device)
        props = torch.cuda.get_device_properties(device)
        info = nvml.device()
        local = LocalDevice(
            kind="cuda", name=props.name, memory_bytes=int(total), free_bytes=int(free),
            compute_capability=f"{props.major}.{props.minor}", bf16=bool(torch.cuda.is_bf16_supported()),
            index=index, driver_version=info.driver_version if info else None, nvml=nvml.available,
            nvml_reason=nvml.reason,
        )
        from memtui.engine.live.measure import CudaCounters

        self.counters = CudaCounters(device)
        self.torch_device = device
        if self.options.capacity_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.options.capacity_bytes / total), device)
        record = None
        if self.options.record_nvml and nvml.available and self.rank == 0:
            self.recorder = NvmlRecorder(self.options.record_nvml, device=info, pids=[pid], started=self.started,
                                         hz=self.options.hz, source=f"memtui run on {props.name}")
            record = self.recorder.record
        self.sampler.sources.append(nvml_source(nvml, lambda: [pid], record))
        self.sampler.sources.append(self.counters.read)
        self.device_json = {
            **local.as_json(), "context_bytes": context, "context_source": context_source if context is not None else None,
            "runtime_bytes": None, "world_size": self.world, "cuda": torch.version.cuda, "torch": torch.__version__,
            "nvml": {"available": nvml.available, "reason": nvml.reason, **(info.as_json() if info else {})},
        }
        self.out({"type": "device", **self.device_json})
        return local, torch.cuda.device_count()

    def _train(self, torch) -> int:
        """Build, instrument, train the planned steps, measure; an OOM anywhere is a result, not a failure."""
        plan = self.plan
        assert plan is not None
        if self.kind == "cpu" or self.options.breakdown:
            limit = cpu_oom_limit(self.options, available_memory_bytes()) if self.kind == "cpu" else None
            from memtui.engine.live.measure import LiveTracker

            self.tracker = LiveTracker(limit)
        parts = _RunParts()
        result, oom = "completed", None
        self.train_started = time.monotonic()
        try:
            self._build(torch, parts)
            self._loop(torch, parts)
        except torch.OutOfMemoryError as error:
            result, oom = "oom", self._oom_report(torch, error, parts)
            if self.tracker is not None:
                self.tracker.detach_finalizers()
        seconds = time.monotonic() - self.train_started
        if parts.probe is not None:
            parts.probe.remove()
        self.state.phase = "done" if result == "completed" else "oom"
        self.stop_sampling()
        self.out(self._summary(torch, parts, result=result, oom=oom, seconds=seconds))
        parts.release()
        if self.kind != "cpu":
            torch.cuda.empty_cache()
        return 0

    # ---- build and instrument ------------------------------------------------------------------
    def _build(self, torch, parts: _RunParts) -> None:
        """The model and its optimizer as the tracer builds them, each watched by the tracker as it appears."""
        from memtui.engine.live.measure import LayerProbe, decoder_layers
        from memtui.engine.torchside.build import build_model, build_optimizer
        from memtui.engine.trace.fake_step import quiet_libraries

        plan, cpu, tracker = self.plan, self.kind == "cpu", self.tracker
        config, spec, device = plan.config, plan.spec, self.torch_device
        self.state.phase = "building"
        weights = plan.predicted_components.get("weights", 0)
        if tracker is not None and tracker.limit_bytes is not None and weights > tracker.limit_bytes:
            # The build allocates every weight before the tracker sees one: do not let it swap the machine.
            parts.oom_at = weights
            raise torch.OutOfMemoryError(f"memtui: the weights alone ({weights} bytes predicted) exceed this "
                                         f"run's limit of {tracker.limit_bytes} bytes")
        torch.manual_seed(0)
        with quiet_libraries():
            parts.model = build_model(spec, config, device=device, quant_backend="auto")
        parts.layers = decoder_layers(parts.model, spec.num_layers)
        if config.compile and not cpu:
            from memtui.engine.torchside.compiled import inductor_layers

            inductor_layers(parts.model, spec.num_layers)  # torch.compile per layer, as torchtune and torchtitan do
        if self.distributed:
            from memtui.engine.live.distributed import wrap

            parts.model = wrap(parts.model, parts.layers, config, device)
        self._instrument_model(parts)
        core = getattr(parts.model, "module", parts.model)  # DDP keeps the model as .module
        core.get_output_embeddings().register_forward_hook(lambda *_: self._mark("loss"))
        parts.optimizer = build_optimizer(parts.model, config, device_type="cpu" if cpu else "cuda")
        if self.distributed and config.zero == 1:
            from memtui.engine.torchside.sharding import zero_redundancy

            parts.optimizer = zero_redundancy(parts.optimizer)
        self._instrument_optimizer(parts)
        parts.scaler = torch.amp.GradScaler("cpu" if cpu else "cuda") if config.precision == "16-mixed" else None
        parts.probe = LayerProbe(parts.layers, lambda: self._live_bytes() or 0, lambda: self.state.phase)

    def _instrument_model(self, parts: _RunParts) -> None:
        """The tracker learns the weights (made before it watched); on a CPU it is the sampler's allocator
        counter, and the runtime (RSS less tensors, measured now) completes the device-peak prediction."""
        tracker = self.tracker
        if tracker is None:
            return
        from memtui.engine.trace.fake_step import watch_model

        parts.weight_ids = watch_model(tracker, parts.model, parts.gradients)
        if self.kind != "cpu":
            return  # on CUDA torch's counters are the allocator's
        self.sampler.sources.append(lambda: {"allocated": tracker.live_bytes, "allocated_peak": tracker.take_window_peak()})
        rss = self.rss.read()
        if rss is not None:
            self.runtime_bytes = max(0, rss - tracker.live_bytes)
            self.plan.set_cpu_runtime(self.runtime_bytes)
            self.out(self.plan.as_json())  # the device-peak prediction, with the runtime measured now

    def _instrument_optimizer(self, parts: _RunParts) -> None:
        """States made when the optimizer is built (master weights' fp32 copies), before the tracker watched."""
        if self.tracker is None:
            return
        from memtui.engine.trace.fake_step import optimizer_state_tensors

        for state in optimizer_state_tensors(parts.optimizer)[0]:
            self.tracker.track(state, "optimizer_state")

    # ---- the loop ------------------------------------------------------------------------------
    def _step_contexts(self, torch) -> tuple[Callable[[], Any], list[Any]]:
        """(autocast factory, the contexts the loop runs under): on a CPU, CUDA's policies where they differ."""
        from memtui.engine.live.measure import cpu_dropout, cpu_flash_sdpa
        from memtui.engine.trace.parallel import fsdp_storage_resizes
        from memtui.engine.torchside.build import compute_dtype
        from memtui.engine.trace.cuda_autocast import cuda_autocast_policy, cuda_like_autocast
        from memtui.engine.trace.hf_patches import real_run_decisions

        config, cpu, tracker = self.plan.config, self.kind == "cpu", self.tracker
        dtype = compute_dtype(config)

        def autocast():
            if not config.autocast:
                return contextlib.nullcontext()
            return cuda_like_autocast(dtype) if cpu else torch.autocast("cuda", dtype=dtype)

        contexts = [
            # Through backward too, as the trace: a checkpointed layer's recompute casts as its forward did.
            cuda_autocast_policy() if cpu and config.autocast else contextlib.nullcontext(),
            cpu_flash_sdpa() if cpu and config.attention == "flash" else contextlib.nullcontext(),
            cpu_dropout() if cpu else contextlib.nullcontext(),
            fsdp_storage_resizes(tracker) if tracker is not None and self.distributed and config.zero >= 2
            else contextlib.nullcontext(),
            real_run_decisions(),
            tracker if tracker is not None else contextlib.nullcontext(),
        ]
        return autocast, contexts

    def _loop(self, torch, parts: _RunParts) -> None:
        from memtui.engine.torchside.build import synthetic_batch, training_step

        plan, tracker = self.plan, self.tracker
        autocast, contexts = self._step_contexts(torch)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            if tracker is not None:
                tracker.mark("inputs")
            parts.input_ids, parts.labels = synthetic_batch(plan.spec, plan.config, device=self.torch_device)
            for step in range(1, plan.steps + 1):
                self.state.step = parts.probe.step = step
                if tracker is not None:
                    tracker.step = step
                if plan.seq_lens:  # padded batches of varied length: a new batch each step, as a data loader gives
                    parts.input_ids = parts.labels = None
                    length = plan.seq_lens[(step - 1) % len(plan.seq_lens)]
                    parts.input_ids, parts.labels = synthetic_batch(
                        plan.spec, plan.config.model_copy(update={"seq_len": length}), device=self.torch_device,
                        seed=step)
                began = time.monotonic()
                loss = training_step(parts.model, parts.optimizer, parts.input_ids, parts.labels, autocast=autocast,
                                     scaler=parts.scaler, phase=self._mark, micro_batches=plan.config.grad_accum)
                if self.kind != "cpu":
                    torch.cuda.synchronize(self.torch_device)
                self.steps_completed = step
                self.out({"type": "step", "t": self.t(), "step": step, "steps": plan.steps, "loss": _finite(loss),
                          "seconds": round(time.monotonic() - began, 4), "allocated": self._live_bytes()})
            if tracker is not None:
                tracker.detach_finalizers()

    # ---- measure -------------------------------------------------------------------------------
    def _oom_report(self, torch, error: BaseException, parts: _RunParts) -> dict[str, Any]:
        if self.kind == "cpu" and self.tracker is not None:
            at = self.tracker.live_bytes
        else:
            at = torch.cuda.max_memory_allocated(self.torch_device)
        return {"at_bytes": int(parts.oom_at or at), "after_step": self.steps_completed, "phase": self.state.phase,
                "message": str(error).splitlines()[0][:300]}

    def _summary(self, torch, parts: _RunParts, *, result: str, oom: dict[str, Any] | None,
                 seconds: float) -> dict[str, Any]:
        from memtui.engine.live.measure import layer_state_bytes

        plan = self.plan
        measured = self._measured(torch, parts.optimizer, parts.scaler, parts.weight_ids, parts.gradients)
        per_layer = None
        if result == "completed" and parts.layers:
            retained = parts.probe.per_layer_bytes()
            if retained is not None:
                states = layer_state_bytes(parts.layers[len(parts.layers) // 2], parts.optimizer)
                per_layer = retained + states["weights"] + states["optimizer_states"]
        measured["per_layer_bytes"] = per_layer
        parts.input_ids = parts.labels = None
        context_delta = 0
        if self.context_bytes is not None:
            context_delta = self.context_bytes - cuda_context_bytes(plan.device.gpu_spec())
        notes = []
        if self.kind == "cpu":
            notes.append("CPU run: tensor bytes measured by the dispatch tracker (rounded as CUDA's allocator rounds); "
                         "the device figure is the process RSS, which includes the Python/torch runtime")
        return build_summary(plan, measured, result=result, steps_completed=self.steps_completed, seconds=seconds,
                             device=self.device_json, oom=oom, notes=notes, measured_per_layer=per_layer,
                             context_delta=context_delta)

    def _measured(self, torch, optimizer, scaler, weight_ids: set[int], gradients: set[int]) -> dict[str, Any]:
        cpu = self.kind == "cpu"
        tracker = self.tracker
        measured: dict[str, Any] = {
            "label": "CPU RSS" if cpu else ("NVML" if self.nvml and self.nvml.available else "torch reserved + context"),
            "samples": self.sampler.count,
            "rss_peak_bytes": self.peaks["rss"],
            "nvml_used_peak_bytes": self.peaks["nvml_used"],
            "nvml_process_peak_bytes": self.peaks["nvml_process"],
            "runtime_bytes": self.runtime_bytes,
            "context_bytes": self.context_bytes,
            "components": None, "peak_phase": None, "peak_step": None,
        }
        if tracker is not None:
            from memtui.engine.trace.analysis import summarize
            from memtui.engine.trace.fake_step import classify_by_owner

            classify_by_owner(tracker, weights=weight_ids, gradients=gradients, optimizer=optimizer, scaler=scaler)
            analysis = summarize(tracker.log)
            _dump_peak(analysis, self.rank)
            measured.update(components=analysis.breakdown, peak_phase=analysis.peak_phase, peak_step=analysis.peak_step,
                            tracked_tensor_peak_bytes=analysis.peak_bytes)
        if cpu:
            measured["tensor_peak_bytes"] = measured["tracked_tensor_peak_bytes"]
            measured["allocated_peak_bytes"] = tracker.peak_bytes
            measured["reserved_peak_bytes"] = None
            measured["device_peak_bytes"] = self.peaks["rss"]
            measured["device_peak_source"] = "process RSS (psutil)"
            return measured
        device = self.torch_device
        measured["tensor_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        measured["allocated_peak_bytes"] = measured["tensor_peak_bytes"]
        measured["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(device))
        if self.peaks["nvml_process"] is not None:
            measured["device_peak_bytes"] = self.peaks["nvml_process"]
            measured["device_peak_source"] = "NVML, this process"
        elif self.peaks["nvml_used"] is not None and self.nvml_baseline_used is not None:
            measured["device_peak_bytes"] = self.peaks["nvml_used"] - self.nvml_baseline_used
            measured["device_peak_source"] = "NVML device used, less what was used before the run"
        else:
            measured["device_peak_bytes"] = measured["reserved_peak_bytes"] + (self.context_bytes or 0)
            measured["device_peak_source"] = "torch reserved peak + CUDA context"
        return measured

    # ---- endings -----------------------------------------------------------------------------
    def finish_cancelled(self) -> None:
        self.stop_sampling()
        plan = self.plan
        tracker = self.tracker
        tensor_peak = tracker.peak_bytes if tracker is not None and self.kind == "cpu" else (
            self.counters.peak_seen if self.counters is not None else None)
        device_peak = self.peaks["rss"] if self.kind == "cpu" else (self.peaks["nvml_process"] or self.peaks["nvml_used"])
        # A stopped run measured part of a step: its figures are partial, compared with nothing.
        summary = Summary(
            result="cancelled", steps=plan.steps if plan else None, steps_completed=self.steps_completed,
            seconds=round(time.monotonic() - (self.train_started or self.started), 3),
            predicted=plan.predicted_json() if plan else None,
            measured={"tensor_peak_bytes": tensor_peak, "device_peak_bytes": device_peak,
                      "samples": self.sampler.count, "label": "CPU RSS" if self.kind == "cpu" else "NVML"},
            scaled_model=plan.scaled_model_json() if plan else None,
            device=self.device_json, notes=["cancelled before the end"],
        )
        self.out(summary.message())

    def close(self) -> None:
        self.stop_sampling()
        if self.recorder is not None:
            self.recorder.close()
        if self.nvml is not None:
            self.nvml.close()
        if self.distributed:
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                dist.destroy_process_group()


def _dump_peak(analysis: Any, rank: int) -> None:
    """MEMTUI_DUMP_PEAK=path: write the tensors live at the measured peak (a developer's view of why)."""
    path = os.environ.get("MEMTUI_DUMP_PEAK")
    if not path or rank != 0:
        return
    import json

    from memtui.engine.trace.analysis import allocations_at_event

    with open(path, "w", encoding="utf-8") as file:
        json.dump({"peak_bytes": analysis.peak_bytes, "step": analysis.peak_step, "phase": analysis.peak_phase,
                   "live": allocations_at_event(analysis.log, analysis.peak_event)}, file, indent=1)




def _finite(value: float | None) -> float | None:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return round(value, 5)


def _torch_uuid(torch, index: int) -> str | None:
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"

