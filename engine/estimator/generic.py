"""The budget of a generic decoder from its cached step program (memtui.engine.model.generic), no torch.

The program's candidates are the step's segments at depth L, each c0 + c1 * L per basis term of (b, s);
the peak is the largest (the first of equals, as the step meets them), its components are the peak's.
Overhead follows the trace's own accounting (memtui.engine.trace.assemble): cuBLAS workspaces, the CUDA
context and the allocator's slack over the largest block.
"""

from __future__ import annotations

from memtui.engine.errors import DerivationNeeded, InputError
from memtui.engine.estimator.budget import make_budget
from memtui.engine.estimator.overhead import cublas_workspace_bytes, cuda_context_bytes, reserved_from_allocated
from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.generic import METHOD, check_generic_options, load_program, per_depth, with_structure
from memtui.engine.model.specs import Budget, Components, GpuSpec, ModelStates, TimelinePoint, TrainingConfig
from memtui.engine.model.validation import check_config

_COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "temporary")
_PHASES = ("forward", "loss", "backward", "optimizer")


def _terms(basis: list[str], b: int, s: int) -> list[int]:
    table = {"1": 1, "b": b, "s": s, "bs": b * s, "ss": s * s, "bss": b * s * s}
    return [table[name] for name in basis]


def _at(pair: list[list[float]], terms: list[int], layers: int) -> float:
    constant, slope = pair
    return sum((c + m * layers) * t for c, m, t in zip(constant, slope, terms))


_COMPILED: dict[int, tuple[list, list[tuple[dict, list[float], list[float]]]]] = {}


def _totals(candidates: list) -> list[tuple[dict, list[float], list[float]]]:
    """Each candidate with its total's form (the components summed), memoised per loaded program."""
    hit = _COMPILED.get(id(candidates))
    if hit is not None and hit[0] is candidates:
        return hit[1]
    compiled = []
    for candidate in candidates:
        forms = [candidate["components"][name] for name in _COMPONENTS]
        constant = [sum(values) for values in zip(*(form[0] for form in forms))]
        slope = [sum(values) for values in zip(*(form[1] for form in forms))]
        compiled.append((candidate, constant, slope))
    if len(_COMPILED) > 64:
        _COMPILED.clear()
    _COMPILED[id(candidates)] = (candidates, compiled)  # holding the list keeps its id from being reused
    return compiled


def _fit_note(program: dict) -> list[str]:
    note = (f"{program['architecture']}: its {program['model_type']} layers traced at 1 and 2 layers and extended to "
            "the model's depth (generic path)")
    if program["fit_error"] > 0.001:  # exact forms miss by nothing; say so when these do not
        note += f"; its forms missed the traced check point by {100 * program['fit_error']:.2f}%"
    return [note]


def generic_estimate(config: TrainingConfig, model: ModelSpec, gpu: GpuSpec) -> Budget:
    """The budget of a generic model whose program is cached; InputError naming the model when it is not."""
    check_generic_options(config, model)
    program = load_program(model, config)
    if program is None:
        raise DerivationNeeded("model", f"{model.id} is a generic model whose step is not derived yet for these "
                               "options; `memtui estimate` traces it once (torch, seconds)")
    structured = with_structure(model)  # its linears (LoRA targets) and the built module's parameter count
    notes = check_config(config, structured, gpu)
    layers = model.num_layers
    terms = _terms(program["basis"], config.batch_size, config.seq_len)
    peak, peak_total = None, -1.0
    phase_peaks: dict[str, float] = {}
    # Some modules run batch 1 differently (fewer copies): then it has candidates of its own.
    single = program.get("candidates_batch_1") if config.batch_size == 1 else None
    for candidate, constant, slope in _totals(single or program["candidates"]):
        if layers < candidate["min_layers"]:
            continue
        total = _at([constant, slope], terms, layers)
        if total > peak_total:
            peak, peak_total = candidate, total
        phase = candidate["phase"]
        phase_peaks[phase] = max(phase_peaks.get(phase, 0.0), total)
    if peak is None:
        raise InputError("model", f"the cached program of {model.id} has no step; delete its cache file")
    components = {name: int(round(_at(peak["components"][name], terms, layers))) for name in _COMPONENTS}
    states = ModelStates(**{name: per_depth(program["states"][name], layers) for name in program["states"]})

    workspace = cublas_workspace_bytes(gpu)
    traced_peak = sum(components.values())
    tensor_peak = traced_peak + workspace
    largest = max(program["largest_setup"], int(sum(c * t for c, t in zip(program["largest_step"], terms))))
    overhead = cuda_context_bytes(gpu) + reserved_from_allocated(tensor_peak, largest) - tensor_peak + workspace
    steady = states.weights + states.optimizer_states
    timeline = [TimelinePoint(phase="start", bytes=steady)]
    timeline += [TimelinePoint(phase=phase, bytes=int(round(phase_peaks[phase]))) for phase in _PHASES
                 if phase in phase_peaks]
    timeline.append(TimelinePoint(phase="end", bytes=steady))
    return make_budget(
        config, structured, gpu,
        trainable_params=per_depth(program["trainable"], layers),
        model_states=states,
        per_gpu=Components(overhead=overhead, **components),
        tensor_peak_bytes=tensor_peak,
        device_peak_bytes=traced_peak + overhead,
        peak_phase=peak["phase"],
        timeline=timeline,
        notes=[*notes, *_fit_note(program)],
        method=METHOD,
    )
