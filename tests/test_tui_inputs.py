"""Typing into the planner's inputs: keys stay in the field; refusals speak the screen's words."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select

from memtui.tui.live import LivePanel
from tests.test_tui_app import WIDE, make_app, note, ready, row, set_select, settled, type_into

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("key", ["tp", "seq_len", "gpus"])
async def test_letters_typed_in_a_number_field_stay_there_and_run_no_command(key, tmp_path, monkeypatch):
    """q must not quit, e export, r start a live run, t flip the theme, p pin: a focused input keeps its keys."""
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        field = app.query_one(f"#opt-{key}", Input)
        field.focus()
        await pilot.pause()
        before, theme = field.value, app.theme
        for letter in "qertpf?R":
            await pilot.press(letter)
            await pilot.pause()
            assert not app._exit, letter
            assert field.value == before, letter
            assert app.focused is field, letter
            assert "digits only" in note(app, key), letter
        assert app.theme == theme
        assert app.last_export is None and list(tmp_path.iterdir()) == []
        assert app.planner.pinned is None
        assert not app.query_one(LivePanel).running and not app.query_one(LivePanel).display
        # Digits still go in, and the refusal gives way to the field's own description.
        await pilot.press("end", "0")
        await settled(pilot)
        assert field.value == before + "0"
        assert "digits only" not in note(app, key)


async def test_a_cross_field_refusal_shows_at_the_field_just_edited_in_the_screens_words():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        # TP 2 with GPU count 1: the error is Tensor par.'s, the field just edited.
        await type_into(pilot, "tp", "2")
        assert row(app, "tp").has_class("-invalid")
        text = note(app, "tp")
        assert "Tensor par. 2" in text and "GPU count is 1" in text and "--" not in text
        await type_into(pilot, "gpus", "2")
        assert not app.query(".option-row.-invalid")
        # GPU count back to 1: the refusal is Tensor par.'s, and shows at GPU count, just edited, too.
        await type_into(pilot, "gpus", "1")
        assert row(app, "tp").has_class("-invalid") and row(app, "gpus").has_class("-invalid")
        assert note(app, "gpus") == note(app, "tp")
        await type_into(pilot, "tp", "1")
        assert not app.query(".option-row.-invalid")
        # ZeRO 3 + offload of the weights, then ZeRO 2: the refusal is the offload's, shown at ZeRO stage too.
        await set_select(pilot, "zero", "3")
        await set_select(pilot, "offload", "optimizer+params")
        assert not app.result.stale
        await set_select(pilot, "zero", "2")
        assert row(app, "offload").has_class("-invalid") and row(app, "zero").has_class("-invalid")
        for key in ("offload", "zero"):
            assert "needs ZeRO stage 3" in note(app, key) and "--zero" not in note(app, key)
        # The line over the budget names the option as the screen does.
        assert "CPU offload: optimizer+params needs ZeRO stage 3" in str(app.query_one("#error-line").render())
        # An edit the refusal does not involve leaves it where it is.
        await set_select(pilot, "checkpointing", "full")
        assert not row(app, "checkpointing").has_class("-invalid")
        assert app.query_one("#opt-zero", Select).value == "2"
