"""How fast memtui answers: estimate() latency and `memtui fit` query latency.

    uv run python benchmarks/speed.py [--configs N] [--repeat R] [--seed S] [--generic]

Configs are drawn (seeded) from every model and GPU preset crossed with the
options people change: precision, checkpointing, attention, optimizer and its
implementation, batch, sequence, GPUs and ZeRO, LoRA and QLoRA. Timings are
warm (each config is estimated once before it is timed) and per call; estimate()
memoises its work per option set, so the last row also times each config at
batch sizes and sequence lengths not asked before. Targets
from the issue: estimate median <= 100 microseconds, fit queries <= 10 ms.
`--generic` also times the first `memtui estimate` of each generic architecture
in tests/data/generic (a fresh process and an empty cache each: import, trace,
fit, answer, exit; target <= 10 s on 2 cores) and the second (the cache read).
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from memtui.engine.planning import fit  # noqa: E402
from memtui.engine.errors import InputError  # noqa: E402
from memtui.engine.estimator import estimate  # noqa: E402
from memtui.engine.model.presets import gpus, models, resolve_gpu, resolve_model  # noqa: E402
from memtui.engine.model.specs import TrainingConfig  # noqa: E402

OPTION_CHOICES = {
    "precision": ["32-true", "bf16-mixed", "16-mixed", "bf16-true"],
    "checkpointing": ["none", "selective", "full"],
    "attention": ["eager", "flash"],
    "optimizer": ["adamw", "adamw-8bit", "sgd-momentum", "adafactor", "lion"],
    "optimizer_impl": ["foreach", "fused", "for-loop"],
    "batch_size": [1, 2, 4, 8, 16],
    "seq_len": [512, 1024, 2048, 4096, 8192],
    "gpus": [1, 1, 2, 8],
    "zero": [0, 1, 2, 3],
}


def draw_configs(count: int, seed: int) -> list[TrainingConfig]:
    """`count` valid configs, every model and GPU preset represented."""
    rng = random.Random(seed)
    model_ids, gpu_ids = list(models()), list(gpus())
    configs: list[TrainingConfig] = []
    attempts = 0
    while len(configs) < count and attempts < count * 20:
        attempts += 1
        options = {name: rng.choice(values) for name, values in OPTION_CHOICES.items()}
        options["model"] = model_ids[len(configs) % len(model_ids)]
        options["gpu"] = gpu_ids[rng.randrange(len(gpu_ids))]
        adapters = rng.random()
        if adapters < 0.15:
            options.update(lora_rank=16, lora_targets="all-linear", precision="bf16-true")
        elif adapters < 0.3:
            options.update(lora_rank=16, lora_targets="all-linear", quant="nf4", precision="bf16-mixed")
        spec = resolve_model(options["model"])
        options["seq_len"] = min(options["seq_len"], spec.max_position_embeddings)
        try:
            config = TrainingConfig(**options)
            estimate(config)
        except (InputError, ValueError):
            continue
        configs.append(config)
    return configs


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def row(label: str, seconds: list[float], unit: str, extra: str = "") -> str:
    scale = 1e6 if unit == "us" else 1e3
    median, p90, worst = statistics.median(seconds) * scale, percentile(seconds, 0.9) * scale, max(seconds) * scale
    return f"  {label:<34} median {median:8.2f} {unit}   p90 {p90:8.2f} {unit}   max {worst:8.2f} {unit}  {extra}"


def time_estimates(configs: list[TrainingConfig], repeat: int, *, resolved: bool,
                   new_shape: bool = False) -> list[float]:
    """Per-call seconds: each config's median over `repeat` warm calls. `new_shape`: each call at a batch size and
    sequence length not asked before (the option set is warm, the step at that shape is not: what fit meets)."""
    per_config: list[float] = []
    for config in configs:
        kwargs = {"model": resolve_model(config.model), "gpu": resolve_gpu(config.gpu)} if resolved else {}
        estimate(config, **kwargs)  # warm
        calls = [config] * repeat
        if new_shape:
            calls = [config.model_copy(update={"batch_size": config.batch_size + 1 + i,
                                               "seq_len": max(config.seq_len - 1 - i, 1)}) for i in range(repeat)]
        samples = []
        for call in calls:
            start = time.perf_counter()
            estimate(call, **kwargs)
            samples.append(time.perf_counter() - start)
        per_config.append(statistics.median(samples))
    return per_config


def time_queries(configs: list[TrainingConfig]) -> dict[str, tuple[list[float], list[int], list[bool]]]:
    """Seconds and estimates per fit query, warm (each query run once before it is timed)."""
    queries = {
        "max_batch_size": lambda c, m, g: fit.max_batch_size(c, model=m, gpu=g),
        "max_seq_len": lambda c, m, g: fit.max_seq_len(c, model=m, gpu=g),
        "max_seq_len (multiple of 256)": lambda c, m, g: fit.max_seq_len(c, model=m, gpu=g, multiple_of=256),
        "min_gpus (ZeRO-3)": lambda c, m, g: fit.min_gpus(c, zero=3, model=m, gpu=g),
        "suggest": lambda c, m, g: fit.suggest(c, model=m, gpu=g),
    }
    results: dict[str, tuple[list[float], list[int], list[bool]]] = {name: ([], [], []) for name in queries}
    for config in configs:
        model, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
        for name, query in queries.items():
            query(config, model, gpu)  # warm
            start = time.perf_counter()
            answer = query(config, model, gpu)
            results[name][0].append(time.perf_counter() - start)
            results[name][1].append(answer.estimates)
            results[name][2].append(answer.fits)
    return results


GENERIC_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "generic"
GENERIC_MODELS = ("starcoder2", "granite", "cohere", "stablelm", "falcon")


def time_generic_first_estimates() -> None:
    """Wall seconds of `memtui estimate` on each generic model, first with an empty cache, then with its cache."""
    print("\nmemtui estimate on a generic model, wall seconds of the whole command (target: first <= 10 s)")
    for name in GENERIC_MODELS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "MEMTUI_CACHE_DIR": cache}
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "memtui", "estimate", "--model", str(GENERIC_DIR / f"{name}.json"),
                                "--json"], env=env, check=True, capture_output=True)
                seconds.append(time.perf_counter() - start)
        print(f"  {name:<12} first {seconds[0]:6.2f} s   cached {seconds[1]:6.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=300, help="configs to draw (default 300)")
    parser.add_argument("--repeat", type=int, default=20, help="timed estimate() calls per config (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generic", action="store_true",
                        help="also time the first estimate of each generic architecture (about a minute)")
    args = parser.parse_args()

    print(f"memtui speed: Python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.platform(terse=True)}")
    start = time.perf_counter()
    configs = draw_configs(args.configs, args.seed)
    print(f"{len(configs)} configs over {len({c.model for c in configs})} models and "
          f"{len({c.gpu for c in configs})} GPUs (drawn in {time.perf_counter() - start:.1f} s)")

    print("\nestimate() per call (target: median <= 100 us)")
    print(row("estimate(config)", time_estimates(configs, args.repeat, resolved=False), "us", "as the CLI calls it"))
    print(row("estimate(config, model=, gpu=)", time_estimates(configs, args.repeat, resolved=True), "us",
              "presets resolved once, as fit does"))
    print(row("  at a new batch and sequence", time_estimates(configs, args.repeat, resolved=True, new_shape=True),
              "us", "the option set seen, the step at that shape not"))

    print("\nfit queries per call (target: <= 10 ms)")
    for name, (seconds, estimates, answered) in time_queries(configs).items():
        share = 100 * sum(answered) / len(answered)
        print(row(name, seconds, "ms", f"estimates: median {statistics.median(estimates):.0f}, max {max(estimates)}; "
                                       f"something fits: {share:.0f}%"))
    if args.generic:
        time_generic_first_estimates()
    return 0


if __name__ == "__main__":
    sys.exit(main())
