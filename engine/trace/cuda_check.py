"""`memtui trace --device cuda`: the same two steps with real tensors on the GPU, measured by torch.

The fake trace is exact for what it runs; this is the check against the real
thing: torch.cuda.max_memory_allocated over the two steps (what the trace's
tensor peak predicts) and max_memory_reserved, beside NVML's used memory when
it can be read. bitsandbytes runs for real here (nf4/int8, 8-bit AdamW).
"""

from __future__ import annotations

import contextlib

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.errors import InputError
from memtui.engine.model.specs import TrainingConfig

STEPS = 2


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def measure_on_cuda(spec: ModelSpec, config: TrainingConfig) -> dict:
    """Run two real steps on cuda:0; bytes measured by the caching allocator."""
    import torch

    from memtui.engine.torchside.build import build_model, build_optimizer, compute_dtype, training_step

    if not torch.cuda.is_available():
        raise InputError("--device", "cuda was asked for but torch sees no CUDA device", "cpu (the default), or cuda on a GPU machine")
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    model = build_model(spec, config, device=device, quant_backend="auto")
    optimizer = build_optimizer(model, config, device_type="cuda")
    scaler = torch.amp.GradScaler("cuda") if config.precision == "16-mixed" else None
    dtype = compute_dtype(config)

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if config.autocast else contextlib.nullcontext()

    if config.attention == "flash":
        model.config._attn_implementation = model.config._attn_implementation or "sdpa"
    input_ids = torch.randint(0, spec.vocab_size, (config.batch_size, config.seq_len), device=device)
    oom = None
    try:
        for _ in range(STEPS):
            training_step(model, optimizer, input_ids, input_ids, autocast=autocast, scaler=scaler)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as error:  # a result, not a crash
        oom = str(error).splitlines()[0]
    result = {
        "device": torch.cuda.get_device_name(device),
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) - baseline,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        "oom": oom,
    }
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        result["nvml_used"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        pynvml.nvmlShutdown()
    del model, optimizer
    torch.cuda.empty_cache()
    return result
