"""Measured memory, sampled off the UI thread: NVML on NVIDIA GPUs, psutil and tensor bytes elsewhere.

- `nvml`: guarded NVML readings (any failure is N/A, never an exception);
- `host`: process RSS and available RAM through psutil;
- `sampler`: a thread that reads sources at a fixed rate (>= 20 Hz) and emits samples;
- `series`: the aggregation every front end renders (peaks kept when downsampling);
- `recording`: record an NVML stream to JSON lines and replay it through the same code.

Nothing here imports torch.
"""
