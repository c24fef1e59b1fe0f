"""Live runs: train a scaled-down copy of the configuration for real and measure it.

- `protocol`: the JSON-lines messages a worker streams (sample, phase, step, summary, ...);
- `devices`: the local device a run can use (CPU RAM, or a CUDA GPU through NVML);
- `sizing`: the scaled-down model (fewer layers, narrower width) that fits and finishes fast;
- `plan`: sizing + prediction + the fit check, pure Python, shared by the parent and the worker;
- `lock`: one live run per machine;
- `process`: start, stream and stop a worker (its own process group, dies with its parent);
- `worker`: `python -m memtui.engine.live.worker`, the process that trains and measures;
- `train`, `measure`: the worker's run and what it measures with torch;
- `distributed`: DDP, ZeRO-1 and FSDP2 wrappers under torchrun (NCCL, or gloo on a CPU);
- `compare`: predicted vs measured, and the full-size model calibrated from the run.

Only `worker` (and what it imports at run time) touches torch.
"""
