"""The planner's per-stage table under pipeline parallelism, driven through the inputs at an explicit size."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select

from memtui.engine.estimator import estimate
from memtui.engine.model.specs import COMPONENT_NAMES, TrainingConfig
from memtui.engine.units import gib_number
from memtui.tui.app import MemtuiApp
from memtui.tui.widgets.stages import StageTable

pytestmark = pytest.mark.anyio


async def ready(pilot) -> None:
    for _ in range(200):
        if pilot.app.query("#opt-model") and pilot.app.focused is not None:
            break
        await pilot.pause()
    await pilot.pause()


async def enter(pilot, key: str, text: str) -> None:
    """A number in a field, as typing it ends (the field posts the same Changed)."""
    pilot.app.query_one(f"#opt-{key}", Input).value = text
    await pilot.pause()


async def test_pipeline_stages_show_estimates_stages_and_hide_without_pp():
    # Room for four ranks already (the inputs' own refusals are tested elsewhere); pp and its schedule are set here.
    app = MemtuiApp(gpu_detector=None, options={"gpus": 4, "batch_size": 8, "microbatches": 8})
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        table = app.query_one(StageTable)
        assert not table.display  # pp 1: nothing to split
        assert app.query_one("#opt-microbatches", Input).value == "8"  # the registry's PP inputs are there

        await enter(pilot, "pp", "4")
        app.query_one("#opt-pp_schedule", Select).value = "interleaved-1f1b"
        await pilot.pause()

        expected_config = TrainingConfig(gpus=4, batch_size=8, microbatches=8, pp=4, pp_schedule="interleaved-1f1b")
        assert not app.result.stale and app.result.config == expected_config
        expected = estimate(expected_config)
        assert table.display and len(expected.stages) == 4
        lines = table.render().plain.splitlines()
        assert lines[0].startswith("Pipeline ranks at their tensor peaks, GiB · interleaved-1f1b")
        assert lines[1].split() == ["rank", "stages", "layers", "weights", "grads", "optimizer", "activations", "peak"]
        rows = lines[2:2 + len(expected.stages)]
        binding = max(expected.stages, key=lambda stage: stage.tensor_peak_bytes)
        for line, stage in zip(rows, expected.stages, strict=True):
            shown = line.split()
            role = [part for part, held in (("emb", stage.embedding), ("head", stage.head)) if held]
            figures = [gib_number(getattr(stage.per_gpu, name)) for name in COMPONENT_NAMES[:4]]
            assert shown[:len(role) + 1] == [str(stage.rank), *role]
            assert shown[len(role) + 1:] == [",".join(map(str, stage.stages)), str(stage.layers), *figures,
                                             gib_number(stage.tensor_peak_bytes), *(["◀"] if stage is binding else [])]
        assert binding.tensor_peak_bytes == app.result.budget.tensor_peak_bytes  # the budget is the binding rank's

        await enter(pilot, "pp", "1")
        assert not app.result.stale and app.result.config.pp == 1
        assert not table.display
