"""Derive a generic decoder's step program by tracing its real transformers module at a few sizes.

The model is built by transformers (the class AutoModelForCausalLM picks for its model_type) at 1 and 2
layers (2 and 3 when the whole step at 3 layers shows the first layer unlike the others), on fake tensors,
with the options applied as for any trace (memtui.engine.torchside.build), once per depth. The optimizer's
states are made from zero gradients; then one training step per (batch, sequence) point is traced with the
MemoryTracker, and the step is cut into segments at the decoder layers' boundaries:

    forward: before the layers, each layer, after them (final norm, head) | loss |
    backward: before the layers, each layer (from the last), after them | optimizer

A segment's candidate peaks are the events that are its peak at some point (the same ops run at every
size, so an event's place in the segment names it across sizes; where the ops differ, the peak alone).
Each candidate's components are fitted as exact forms in (b, s) over as many points as the basis has terms
(1, b, s, b*s; with s^2 and b*s^2 for eager attention). A segment outside the layers grows by a fixed amount
per layer (the difference between the two depths), and so do the first and the last layer's own segments.
One step at 3 layers and a larger size (3 x 1024) checks every segment at once; where it misses, that size
is traced at each depth too, which tells the forms in (b, s) (then the s^2 terms, or batch 1 apart) from
the growth with depth (then 2 and 3 layers). The program (memtui.engine.model.generic) keeps every
candidate as c0 + c1 * L per basis term and component.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import LinearLayer, ModelSpec
from memtui.engine.model.generic import (
    PROGRAM_OPTIONS,
    PROGRAM_VERSION,
    check_generic_options,
    load_program,
    load_structure,
    program_path,
    structure_path,
    with_structure,
    write_json,
)
from memtui.engine.model.specs import COMPONENT_NAMES, TrainingConfig

Progress = Callable[[str, float], None]
COMPONENTS = tuple(name for name in COMPONENT_NAMES if name != "overhead")
DEPTHS = (1, 2)  # traced first; (2, 3) when the model at 3 layers says the first layer is not like the others
DEEPER = (2, 3)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Sequence lengths are multiples of 256 so every per-token tensor is a whole number of 512-byte blocks and
# the allocator's rounding keeps the forms exact.
FLASH_POINTS = ((1, 256), (2, 256), (1, 512), (2, 512))
EAGER_POINTS = ((1, 256), (2, 256), (1, 512), (2, 512), (1, 768), (2, 768))
CHECK_POINT = (3, 1024)
# Relative error of a segment's peak at the check point: the forms are exact where one event is a segment's peak
# at every size and the ops do not change with the batch; batch 1 runs a few copies fewer than larger batches
# (views of a size-1 dimension), which some modules (Falcon's eager attention) make a fraction of a percent.
FIT_TOLERANCE = 0.01
EXACT = 0.002  # below this the forms are taken as exact; above, more sizes are traced
MANY_POINTS = ((2, 256), (3, 256), (2, 512), (3, 512), (2, 768), (3, 768))
MANY_CHECK = (4, 1024)
SINGLE_POINTS = ((1, 256), (1, 512), (1, 768))
SINGLE_CHECK = (1, 1024)


def basis_names(attention: str) -> tuple[str, ...]:
    return ("1", "b", "s", "bs", "ss", "bss") if attention == "eager" else ("1", "b", "s", "bs")


def basis_values(names: tuple[str, ...], b: int, s: int) -> list[float]:
    table = {"1": 1, "b": b, "s": s, "bs": b * s, "ss": s * s, "bss": b * s * s}
    return [float(table[name]) for name in names]


# ---- the module ------------------------------------------------------------------------------------------
def _causal_lm_class_name(model_type: str, source: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not name:
        raise InputError(f"{source}: model_type", f"unsupported architecture {model_type!r}: transformers "
                         f"{_transformers_version()} builds no causal LM of it; memtui models decoder-only "
                         "language models")
    return name


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def at_depth(spec: ModelSpec, layers: int) -> ModelSpec:
    """The spec with `layers` decoder layers (and per-layer lists in the config cut to match)."""
    config = dict(spec.config)
    original = spec.num_layers
    key = next((name for name in _LAYER_KEYS if name in config), "num_hidden_layers")
    config[key] = layers
    for name, value in list(config.items()):
        if isinstance(value, list) and len(value) == original and name != "architectures":
            config[name] = value[:layers]
    return spec.model_copy(update={"config": config, "num_layers": layers})


def decoder_layers(model, layers: int):
    """The ModuleList of decoder layers: the one of that length holding the most parameters."""
    from memtui.engine.torchside.compiled import decoder_layer_list

    return decoder_layer_list(model, layers)


def _layer_linears(layer) -> list[dict[str, Any]]:
    """The layer's nn.Linear modules, named by their last part (two parts where the last is not unique)."""
    import torch

    found = [(name, module) for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
    last = [name.rsplit(".", 1)[-1] for name, _ in found]
    linears = []
    for (name, module), short in zip(found, last):
        label = short if last.count(short) == 1 else ".".join(name.split(".")[-2:])
        linears.append(LinearLayer(name=label, in_features=module.in_features, out_features=module.out_features,
                                   bias=module.bias is not None).model_dump())
    return linears


def derive_structure(spec: ModelSpec) -> dict[str, Any]:
    """The class, the layer's linears and the parameter count per depth, from the module on the meta device."""
    from memtui.engine.torchside.build import hf_model_on_meta
    from memtui.engine.trace.fake_step import quiet_libraries

    model_type = spec.config.get("model_type", "")
    architecture = _causal_lm_class_name(model_type, spec.source or spec.id)
    counts = []
    linears: list[dict[str, Any]] = []
    with quiet_libraries():
        for depth in DEPTHS:
            shaped = at_depth(spec, depth).model_copy(update={"architecture": architecture})
            try:
                model = hf_model_on_meta(shaped)
            except (ValueError, TypeError, AttributeError, KeyError) as error:
                raise InputError(f"{spec.source or spec.id}: model_type", f"transformers cannot build {model_type!r} from this config: "
                                 f"{str(error).splitlines()[0][:160]}") from None
            counts.append(sum(p.numel() for p in model.parameters()))
            if not linears:
                linears = _layer_linears(decoder_layers(model, depth)[0])
            del model
    per_layer = counts[1] - counts[0]
    return {"version": PROGRAM_VERSION, "architecture": architecture, "linears": linears,
            "params": [counts[0] - per_layer, per_layer]}


# ---- tracing a few points ---------------------------------------------------------------------------------
class _Segments:
    """Layer boundaries as (event index, name, layer), beside the tracker's phase marks."""

    def __init__(self) -> None:
        self.tracker = None
        self.marks: list[tuple[int, str, int]] = []

    def mark(self, name: str, layer: int) -> None:
        if self.tracker is not None:
            self.marks.append((len(self.tracker.log.events), name, layer))


def _instrument(layers, segments: _Segments) -> None:
    """Forward: a mark as each layer starts and as the last ends. Backward: a mark as the gradient of the last
    layer's output arrives and as each layer's input gradient is made (tensor hooks; they allocate nothing)."""
    import torch

    count = len(layers)

    def pre(index):
        def hook(_module, args, kwargs):
            if segments.tracker is None or segments.tracker.phase != "forward":
                return  # checkpointing's recompute in backward runs the layer again
            segments.mark("f-layer", index)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _grad: segments.mark("b-after" if index == 0 else "b-layer", index - 1))
        return hook

    def post(index):
        def hook(_module, _args, output):
            if segments.tracker is None or segments.tracker.phase != "forward" or index != count - 1:
                return
            segments.mark("f-after", index)
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _grad: segments.mark("b-layer", index))
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(pre(index), with_kwargs=True)
        layer.register_forward_hook(post(index))


def _segment_series(log, phase_marks, layer_marks, layers: int) -> dict[tuple[str, int], dict]:
    """Each segment's live bytes by component after every event, keyed by (segment, slot): the slot is the
    layer's place in the order the step meets the layers (forward from the first, backward from the last)."""
    boundaries = sorted([(index, 0, phase, -1) for index, _step, phase in phase_marks]
                        + [(index, 1, name, layer) for index, name, layer in layer_marks])
    segments: dict[tuple[str, int], dict] = {}
    live = dict.fromkeys(COMPONENTS, 0)
    position = 0
    key = ("setup", -1)
    phase = "setup"
    for index, event in enumerate(log.events):
        while position < len(boundaries) and boundaries[position][0] <= index:
            _, _, name, layer = boundaries[position]
            position += 1
            if name in ("forward", "loss", "backward", "optimizer", "end", "inputs"):
                phase = name
                key = (name, -1)
            elif name.startswith("f-"):
                key = (name, layer if name == "f-layer" else -1)
            else:
                key = (name, layers - 1 - layer if name == "b-layer" else -1)
        alloc = log.allocations[event.alloc_id]
        if alloc.host:
            continue
        live[alloc.category] += event.delta
        segment = segments.setdefault(key, {"phase": phase, "series": []})
        segment["series"].append(tuple(live[name] for name in COMPONENTS))
    return segments


class _DepthTracer:
    """One model of a given depth, built once on fake tensors with its optimizer's states made, traced at any
    number of (b, s) points as they are asked for (the fallbacks ask for more sizes of a depth already traced)."""

    def __init__(self, spec: ModelSpec, config: TrainingConfig) -> None:
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from memtui.engine.torchside.build import build_model, build_optimizer, compute_dtype

        self.spec, self.config = spec, config
        self.segments = _Segments()
        self.gradients: set[int] = set()
        self.states: dict[str, int] = {}
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self._contexts(build=True):
            self.model = build_model(spec, config, device="cpu", quant_backend="replica")
            segments = self.segments
            _instrument(decoder_layers(self.model, spec.num_layers), segments)
            self.model.get_output_embeddings().register_forward_hook(
                lambda *_: segments.tracker.mark("loss") if segments.tracker is not None else None)
            for parameter in self.model.parameters():
                if parameter.requires_grad:
                    parameter.register_post_accumulate_grad_hook(self._grad_ready)
            optimizer_config = config
            if config.optimizer in ("sgd", "sgd-momentum") and config.optimizer_impl == "fused":
                optimizer_config = config.model_copy(update={"optimizer_impl": "foreach"})  # as fake_step does
            self.optimizer = build_optimizer(self.model, optimizer_config, device_type="cuda")
            self.scaler = None
            if config.precision == "16-mixed":
                self.scaler = torch.amp.GradScaler("cpu")
                self.scaler._maybe_opt_step = lambda optimizer, _state, *args, **kwargs: optimizer.step(*args,
                                                                                                          **kwargs)
            dtype = compute_dtype(config)
            self.autocast = ((lambda: _cuda_like_autocast(dtype)) if config.autocast
                             else contextlib.nullcontext)
            self._make_states()

    def _contexts(self, *, build: bool = False) -> contextlib.ExitStack:
        from memtui.engine.trace.cuda_autocast import cuda_autocast_policy
        from memtui.engine.trace.cuda_dropout import cuda_dropout
        from memtui.engine.trace.cuda_sdpa import cuda_sdpa
        from memtui.engine.trace.cuda_softmax import cuda_softmax
        from memtui.engine.trace.fake_step import quiet_libraries
        from memtui.engine.trace.hf_patches import real_run_decisions

        stack = contextlib.ExitStack()
        stack.enter_context(quiet_libraries())
        stack.enter_context(self.mode)
        if not build:
            stack.enter_context(cuda_sdpa() if self.config.attention == "flash" else contextlib.nullcontext())
            stack.enter_context(cuda_autocast_policy() if self.config.autocast else contextlib.nullcontext())
            stack.enter_context(cuda_dropout())
            stack.enter_context(cuda_softmax())
            stack.enter_context(real_run_decisions())
        return stack

    def _grad_ready(self, parameter) -> None:
        tracker = self.segments.tracker
        if tracker is not None:
            alloc_id = tracker.alloc_id_of(parameter.grad)
            if alloc_id is not None:
                self.gradients.add(alloc_id)

    def _make_states(self) -> None:
        """The optimizer's states as the first step makes them: from zero gradients, without a forward and a
        backward (GradScaler makes its scale in the step's backward: there, one whole untraced step)."""
        import torch

        from memtui.engine.torchside.build import training_step

        if self.scaler is not None:
            with self._contexts():
                ids = torch.randint(0, self.spec.vocab_size, CHECK_POINT)
                training_step(self.model, self.optimizer, ids, ids, autocast=self.autocast, scaler=self.scaler)
            return
        with self._contexts():
            for parameter in self.model.parameters():
                if parameter.requires_grad:
                    parameter.grad = torch.zeros_like(parameter)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def trace(self, points, report: Progress, done: float, share: float) -> list[dict]:
        """One traced step per (b, s): each segment's live bytes per component, and the largest allocation."""
        import torch

        from memtui.engine.torchside.build import training_step
        from memtui.engine.trace.fake_step import classify_by_owner, optimizer_state_tensors
        from memtui.engine.trace.tracker import MemoryTracker

        model, optimizer, scaler, segments = self.model, self.optimizer, self.scaler, self.segments
        results = []
        with self._contexts():
            for number, (batch, seq) in enumerate(points):
                report(f"{self.spec.num_layers}-layer step at batch {batch} x {seq}",
                       done + share * (number + 1) / (len(points) + 1))
                tracker = MemoryTracker()
                weights = set()
                for tensor in [*model.parameters(), *model.buffers()]:
                    alloc_id = tracker.track(tensor, "parameter")
                    if alloc_id is not None:
                        weights.add(alloc_id)
                extra = [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
                         if t is not None] if scaler is not None else []
                for state in optimizer_state_tensors(optimizer)[0] + extra:
                    tracker.track(state, "optimizer_state")
                self.gradients.clear()
                segments.tracker, segments.marks = tracker, []
                tracker.step = 2
                tracker.mark("inputs")
                with tracker:
                    ids = torch.randint(0, self.spec.vocab_size, (batch, seq))
                    training_step(model, optimizer, ids, ids, autocast=self.autocast, scaler=scaler,
                                  phase=tracker.mark)
                segments.tracker = None
                classify_by_owner(tracker, weights=weights, gradients=set(self.gradients), optimizer=optimizer,
                                  scaler=scaler)
                log = tracker.log
                peaks = _segment_series(log, log.phase_marks, segments.marks, self.spec.num_layers)
                step_sizes = [alloc.nbytes for alloc in log.allocations.values() if alloc.phase != "setup"]
                setup_sizes = [alloc.nbytes for alloc in log.allocations.values() if alloc.phase == "setup"]
                results.append({"b": batch, "s": seq, "peaks": peaks, "largest_step": max(step_sizes, default=0)})
                if not self.states:
                    device = [a for a in log.allocations.values() if not a.host]
                    self.states = {
                        "weights": sum(a.nbytes for a in device if a.category == "weights" and a.phase == "setup"),
                        "optimizer_states": sum(a.nbytes for a in device if a.category == "optimizer_states"),
                        "gradients": sum(a.nbytes for a in device if a.category == "gradients"),
                        "largest_setup": max(setup_sizes, default=0),
                        "params": sum(p.numel() for p in model.parameters()),
                        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    }
                tracker.detach_finalizers()
                del ids, log, tracker
        return results


def _cuda_like_autocast(dtype):
    from memtui.engine.trace.cuda_autocast import cuda_like_autocast

    return cuda_like_autocast(dtype)


# ---- fitting ------------------------------------------------------------------------------------------------
def _fit(names: tuple[str, ...], points: list[tuple[int, int]], values: list[float]) -> list[float]:
    import numpy as np

    matrix = np.array([basis_values(names, b, s) for b, s in points])
    coefficients, *_ = np.linalg.lstsq(matrix, np.array(values, dtype=float), rcond=None)
    return [float(round(c, 6)) for c in coefficients]


def _evaluate(coefficients: list[float], names: tuple[str, ...], b: int, s: int) -> float:
    return sum(c * v for c, v in zip(coefficients, basis_values(names, b, s)))


def _first_peak(series: list[tuple[int, ...]]) -> int:
    totals = [sum(values) for values in series]
    return totals.index(max(totals))


def _fitted_segments(runs_by_depth: dict[int, list[dict]], names: tuple[str, ...], *, checked: bool = True,
                     moment_runs: tuple[dict, ...] = ()) -> tuple[dict, float, str]:
    """Per depth, per (segment, slot, moment): the fitted forms of the components, and the worst relative error
    of a segment's peak at the check point (each depth's last run when `checked`). A segment's moments are the
    events that are its peak at some point (aligned by their place in the segment, which holds the same ops at
    every size and depth; `moment_runs` add their peaks); where the segments' lengths differ, its peak alone."""
    fitted: dict[int, dict] = {}
    worst, worst_segment = 0.0, ""
    by_name: dict[str, list[list]] = {}
    for depth, runs in runs_by_depth.items():
        keys = set(runs[0]["peaks"])
        if any(set(run["peaks"]) != keys for run in runs):
            raise InputError("model", f"the {depth}-layer step is not the same at every batch and sequence size; "
                             "the generic path cannot derive its forms")
        for key in keys:
            by_name.setdefault(key[0], []).extend(run["peaks"][key]["series"] for run in runs)
    for run in moment_runs:
        for key, segment in run["peaks"].items():
            by_name.setdefault(key[0], []).append(segment["series"])
    moments = {}
    for name, all_series in by_name.items():
        aligned = len({len(series) for series in all_series}) == 1
        moments[name] = sorted({_first_peak(series) for series in all_series}) if aligned else [None]
    for depth, runs in runs_by_depth.items():
        fit_runs, check = (runs[:-1], runs[-1]) if checked else (runs, None)
        points = [(run["b"], run["s"]) for run in fit_runs]
        fitted[depth] = {}
        for key in runs[0]["peaks"]:
            if key[0] in ("setup", "inputs", "end"):
                continue
            predicted_peak = 0.0
            for moment in moments[key[0]]:
                def at(run):
                    series = run["peaks"][key]["series"]
                    return series[_first_peak(series) if moment is None else moment]
                forms = {component: _fit(names, points, [at(run)[i] for run in fit_runs])
                         for i, component in enumerate(COMPONENTS)}
                fitted[depth][(key[0], key[1], moment)] = {"forms": forms, "phase": runs[0]["peaks"][key]["phase"]}
                if check is not None:
                    predicted = sum(_evaluate(forms[c], names, check["b"], check["s"]) for c in COMPONENTS)
                    predicted_peak = max(predicted_peak, predicted)
            if check is None:
                continue
            measured = max(sum(values) for values in check["peaks"][key]["series"])
            error = abs(predicted_peak - measured) / max(measured, 1)
            if error > worst:
                worst, worst_segment = error, key[0]
    return fitted, worst, worst_segment


def _extend(depths: tuple[int, int], fitted: dict[int, dict]) -> list[dict]:
    """Candidates c0 + c1 * L from the segments at two depths d and d + 1: each segment outside the layers, and
    the first and the last layer's, grows by what one more layer adds (the first and the last layer may differ
    from the ones between, e.g. where the first layer's input needs no gradient)."""
    low, high = depths
    candidates = []

    def line(at_low: dict, at_high: dict) -> dict:
        components = {}
        for name in COMPONENTS:
            slope = [b - a for a, b in zip(at_low["forms"][name], at_high["forms"][name])]
            components[name] = [[a - low * m for a, m in zip(at_low["forms"][name], slope)], slope]
        return components

    order = sorted(fitted[high], key=lambda key: (_ORDER.index(key[0]), key[1], -1 if key[2] is None else key[2]))
    for key in order:
        name, slot, moment = key
        phase = fitted[high][key]["phase"]
        if slot <= 0 and key in fitted[low]:
            candidates.append({"segment": name, "phase": phase, "min_layers": 1,
                               "components": line(fitted[low][key], fitted[high][key])})
        last_low, last_high = (name, low - 1, moment), (name, high - 1, moment)
        if slot == 0 and last_low in fitted[low] and last_high in fitted[high]:
            candidates.append({"segment": f"{name} (last)", "phase": phase, "min_layers": 2,
                               "components": line(fitted[low][last_low], fitted[high][last_high])})
    return candidates


def _predicted_peak(candidates: list[dict], names: tuple[str, ...], layers: int, b: int, s: int) -> float:
    values = basis_values(names, b, s)
    return max(sum((c + m * layers) * v for name in COMPONENTS
                   for c, m, v in zip(*candidate["components"][name], values))
               for candidate in candidates if layers >= candidate["min_layers"])


def _deeper_check(candidates: list[dict], names: tuple[str, ...], layers: int, run: dict) -> tuple[float, str]:
    """The worst relative error of the candidates' prediction for a step traced at `layers` (more than the fitted
    depths) and another size: each segment outside the layers and the first and the last layer's, and the step's
    peak. Where it is exact, the forms in (b, s) and their growth with depth are both confirmed by one trace."""
    values = basis_values(names, run["b"], run["s"])
    predicted: dict[str, float] = {}
    for candidate in candidates:
        if layers >= candidate["min_layers"]:
            total = sum((c + m * layers) * v for name in COMPONENTS
                        for c, m, v in zip(*candidate["components"][name], values))
            predicted[candidate["segment"]] = max(predicted.get(candidate["segment"], 0.0), total)
    worst, worst_segment, step_peak = 0.0, "", 0.0
    for (name, slot), segment in run["peaks"].items():
        measured = max(sum(values) for values in segment["series"])
        step_peak = max(step_peak, measured)
        label = name if slot <= 0 else f"{name} (last)" if slot == layers - 1 else None
        if name in ("setup", "inputs", "end") or label is None:
            continue
        error = abs(predicted.get(label, 0.0) - measured) / max(measured, 1)
        if error > worst:
            worst, worst_segment = error, name
    step_error = abs(max(predicted.values(), default=0.0) - step_peak) / max(step_peak, 1)
    return (step_error, "the step") if step_error > worst else (worst, worst_segment)


_ORDER = ("forward", "f-layer", "f-after", "loss", "backward", "b-layer", "b-after", "optimizer")


def derive_program(spec: ModelSpec, config: TrainingConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Trace, fit, extend and cache the program of this generic model and option set; returns it."""
    started = time.perf_counter()
    report = progress or (lambda _stage, _fraction: None)
    check_generic_options(config, spec)
    report("importing torch and transformers", 0.0)
    structure = load_structure(spec)
    if structure is None:
        report("building the module on the meta device", 0.05)
        structure = derive_structure(spec)
        write_json(structure_path(spec), structure)
    built = spec.model_copy(update={"architecture": structure["architecture"],
                                    "linears": tuple(LinearLayer(**linear) for linear in structure["linears"])})
    from memtui.engine.model.validation import resolve_lora_targets

    resolve_lora_targets(config, built)  # a target the layer does not have: one line, before any trace
    names = basis_names(config.attention)
    base_points = list(EAGER_POINTS if config.attention == "eager" else FLASH_POINTS)
    states: dict[int, dict[str, int]] = {}
    traced: dict[int, dict[tuple[int, int], dict]] = {}
    depths = DEPTHS

    tracers: dict[int, _DepthTracer] = {}

    def trace_at(depth: int, wanted: list[tuple[int, int]], done: float) -> None:
        missing = [point for point in wanted if point not in traced.setdefault(depth, {})]
        if missing:
            if depth not in tracers:
                tracers[depth] = _DepthTracer(at_depth(built, depth), config)
            runs = tracers[depth].trace(missing, report, done, 0.3)
            states[depth] = tracers[depth].states
            traced[depth].update({(run["b"], run["s"]): run for run in runs})

    def fit(fit_points: list[tuple[int, int]], check: tuple[int, int]) -> tuple[dict, float, str]:
        for number, depth in enumerate(depths):
            trace_at(depth, [*fit_points, check], 0.1 + 0.3 * number)
        return _fitted_segments({depth: [traced[depth][point] for point in [*fit_points, check]]
                                 for depth in depths}, names)

    def fit_all() -> tuple[dict, dict | None, float, str, list[tuple[int, int]]]:
        nonlocal names
        used = base_points if len(names) < len(basis_names("eager")) else list(EAGER_POINTS)
        fitted, worst, segment = fit(used, CHECK_POINT)
        if worst > EXACT and config.attention != "eager" and len(names) < len(basis_names("eager")):
            # A module that still materialises an s x s mask under SDPA (Falcon): two more sizes, the s^2 terms.
            report("the step has terms in s^2: two more sizes", 0.5)
            names, used = basis_names("eager"), list(EAGER_POINTS)
            fitted, worst, segment = fit(used, CHECK_POINT)
        single = None
        if worst > EXACT:
            # Batch 1 runs a few copies fewer than larger batches in some modules (views of a size-1 dimension):
            # forms for batch 1 alone, and for batches from 2.
            report("batch 1 differs: forms for it alone", 0.5)
            many, many_error, many_segment = fit(list(MANY_POINTS), MANY_CHECK)
            one, one_error, one_segment = fit(list(SINGLE_POINTS), SINGLE_CHECK)
            if max(many_error, one_error) < worst:
                fitted, single = many, one
                worst, segment = max((many_error, many_segment), (one_error, one_segment))
                used = [*MANY_POINTS, *SINGLE_POINTS]
        return fitted, single, worst, segment, used

    # The common case in fewest traces: the basis' own number of sizes at each depth, and one step at 3 layers
    # and a larger size that checks every segment's forms in (b, s) and their growth with depth at once.
    for number, depth in enumerate(depths):
        trace_at(depth, base_points, 0.05 + 0.3 * number)
    trace_at(DEEPER[-1], [CHECK_POINT], 0.65)
    deeper = traced[DEEPER[-1]][CHECK_POINT]
    fitted, _, _ = _fitted_segments({depth: [traced[depth][point] for point in base_points] for depth in depths},
                                    names, checked=False, moment_runs=(deeper,))
    candidates = _extend(depths, fitted)
    worst, segment = _deeper_check(candidates, names, DEEPER[-1], deeper)
    single, points = None, base_points
    if worst > EXACT:
        # Which it is (terms in s^2, batch 1 unlike the others, a first layer unlike the others): the check point
        # at each depth tells the forms in (b, s) from the growth with depth.
        report("the forms need more sizes or depths", 0.7)
        fitted, single, worst, segment, points = fit_all()
        measured = max(sum(values) for segment_series in deeper["peaks"].values()
                       for values in segment_series["series"])
        candidates = _extend(depths, fitted)
        depth_error = abs(_predicted_peak(candidates, names, DEEPER[-1], *CHECK_POINT) - measured) / max(measured, 1)
    else:
        depth_error = 0.0
    if depth_error > EXACT:
        report("the first layer differs from the others: 2 and 3 layers", 0.8)
        depths = DEEPER
        fitted, single, worst, segment, points = fit_all()
        candidates = _extend(depths, fitted)
    if worst > FIT_TOLERANCE:
        raise InputError("model", f"{spec.id}: the traced memory of segment {segment} is not a linear/quadratic "
                         f"form in batch and sequence (off by {100 * worst:.2f}% at the check point)")
    last = [traced[depths[-1]][point] for point in points]
    largest_step = _fit(names, [(run["b"], run["s"]) for run in last], [run["largest_step"] for run in last])
    low, high = depths

    def by_depth(name: str) -> list[float]:
        slope = states[high][name] - states[low][name]
        return [float(states[low][name] - low * slope), float(slope)]

    program = {
        "version": PROGRAM_VERSION,
        "model_type": spec.config.get("model_type"),
        "architecture": structure["architecture"],
        "options": {name: getattr(config, name) for name in PROGRAM_OPTIONS},
        "basis": list(names),
        "params": by_depth("params"),
        "trainable": by_depth("trainable"),
        "states": {name: by_depth(name) for name in ("weights", "gradients", "optimizer_states")},
        "largest_setup": max(states[low]["largest_setup"], states[high]["largest_setup"]),
        "largest_step": largest_step,
        "candidates": candidates,
        "candidates_batch_1": _extend(depths, single) if single is not None else None,
        "depths": list(depths),
        "fit_error": worst,
        "points": [list(point) for point in points],
        "seconds": round(time.perf_counter() - started, 2),
        "traced_steps": sum(len(runs) for runs in traced.values()),
    }
    write_json(program_path(spec, config), program)
    report("done", 1.0)
    return program


def structured_spec(spec: ModelSpec) -> ModelSpec:
    """A generic spec as the full trace needs it: the class to build and the layer's linears (LoRA targets)."""
    if load_structure(spec) is None:
        write_json(structure_path(spec), derive_structure(spec))
    return with_structure(spec)


def ensure_program(spec: ModelSpec, config: TrainingConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The cached program, derived first when absent (the only step of a generic estimate that needs torch)."""
    program = load_program(spec, config)
    if program is None or load_structure(spec) is None:
        program = derive_program(spec, config, progress)
    return program


def main(argv: list[str] | None = None) -> int:
    """`python -m memtui.engine.trace.generic CONFIG_JSON`: derive the program of the configuration's generic
    model, one JSON line per stage on stdout ({"stage", "fraction"}), then {"done": true} or {"error": "..."}.
    The planner runs it in a subprocess: it has no torch of its own."""
    import json
    import sys

    from memtui.engine.model.presets import resolve_model

    def say(message: dict[str, Any]) -> None:
        print(json.dumps(message), flush=True)

    try:
        config = TrainingConfig.model_validate_json((argv if argv is not None else sys.argv[1:])[0])
        ensure_program(resolve_model(config.model), config,
                       lambda stage, fraction: say({"stage": stage, "fraction": round(fraction, 3)}))
    except InputError as error:
        say({"error": str(error)})
        return 2
    say({"done": True})
    return 0


if __name__ == "__main__":
    from memtui.engine.process_exit import exit_process

    exit_process(main())  # the planner reads until end of file: no torch teardown before it
