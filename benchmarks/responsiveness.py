"""Key-to-screen latency of the app while a CPU live run trains beside it.

    uv run python benchmarks/responsiveness.py [--keys 150] [--pause 0.1] [--nice N]

Runs the app headless at 120x40 (Textual's run_test), types digits into the
Seq length field and times each from the key event to the first screen refresh
that shows it: first with nothing running, then while a live run of the
app's first model (automatic size, as `r` starts it, with many steps so it
trains throughout)
uses the CPU. Prints p50 / p95 / max per phase. --nice sets MEMTUI_WORKER_NICE
(the worker's niceness increment, default 10; 0 runs it at the app's priority)
to compare. The target from issue 10: p95 <= 100 ms on 2 cores. Headless, so
the terminal's own drawing is not included. Prints numbers; asserts nothing,
and it is no test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

FIELD = "#opt-seq_len"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def key_to_screen(app, box, key: str, character: str | None, timeout: float = 10.0) -> float:
    """Seconds from posting `key` to the refresh after the field's value changed."""
    from textual import events

    before = box.value
    began = time.perf_counter()
    app.post_message(events.Key(key, character))
    deadline = began + timeout
    while box.value == before:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{key!r} never reached the field")
        await asyncio.sleep(0.0005)
    shown = asyncio.get_running_loop().create_future()
    box.call_after_refresh(lambda: shown.done() or shown.set_result(time.perf_counter()))
    return await asyncio.wait_for(shown, timeout) - began


async def focus_at_end(pilot, box) -> None:
    """Focus the field with the cursor after its value (focus selects it all: a digit would replace it)."""
    box.focus()
    await pilot.pause(0.2)
    box.action_end()
    await pilot.pause(0.1)


async def type_digits(app, pilot, box, keys: int, pause: float) -> list[float]:
    """Alternate a digit and backspace at the end of the field (the value stays valid), timing each."""
    latencies = []
    for i in range(keys):
        if i % 2 == 0:
            latencies.append(await key_to_screen(app, box, "1", "1"))
        else:
            latencies.append(await key_to_screen(app, box, "backspace", None))
        await pilot.pause(pause)  # a person types a key every 100-200 ms
    return latencies


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    from memtui.engine.live.plan import LiveOptions
    from memtui.tui.app import MemtuiApp
    from memtui.tui.live import LivePanel

    app = MemtuiApp(gpu_detector=None)
    results: dict[str, list[float]] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        while app.result is None or not app.query(FIELD):
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        box = app.query_one(FIELD)
        await focus_at_end(pilot, box)
        results["idle"] = await type_digits(app, pilot, box, args.keys, args.pause)
        print(f"idle: {len(results['idle'])} keys timed; starting a live run", file=sys.stderr, flush=True)

        while app.result is None or app.result.stale:  # the last key's estimate, before `r` takes the config
            await pilot.pause(0.1)
        panel = app.query_one(LivePanel)
        panel.options = LiveOptions(device="cpu", steps=100_000, if_unsupported="skip")
        app.action_live_run()
        began = time.monotonic()
        while panel.step < 1:  # torch imported, model built, training
            if not panel.running or time.monotonic() - began > 180:
                raise RuntimeError(f"the live run did not start training: {panel.state}")
            await pilot.pause(0.2)
        print(f"training (step {panel.step}); timing keys", file=sys.stderr, flush=True)
        await focus_at_end(pilot, box)
        results["during a CPU run"] = await type_digits(app, pilot, box, args.keys, args.pause)
        results["steps trained"] = [float(panel.step)]
        panel.stop_run()
        while panel.running:
            await pilot.pause(0.1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=150, help="keys per phase (default 150)")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between keys (default 0.1)")
    parser.add_argument("--nice", type=int, help="MEMTUI_WORKER_NICE for the worker (default: memtui's, 10)")
    args = parser.parse_args()
    os.environ.setdefault("MEMTUI_NO_NVML", "1")  # a CPU run, whatever the machine has
    if args.nice is not None:
        os.environ["MEMTUI_WORKER_NICE"] = str(args.nice)
    results = asyncio.run(measure(args))
    steps = int(results.pop("steps trained")[0])
    print(f"key to screen, {args.keys} keys per phase, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"worker niceness +{os.environ.get('MEMTUI_WORKER_NICE', '10 (default)')}")
    for phase, latencies in results.items():
        ms = [1000 * value for value in latencies]
        print(f"  {phase:18} p50 {statistics.median(ms):7.1f} ms   p95 {percentile(ms, 0.95):7.1f} ms   "
              f"max {max(ms):7.1f} ms")
    print(f"  the run trained {steps} steps meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
