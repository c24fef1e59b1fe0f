"""The planner screen, driven the way a person drives it: keys, the palette, the mouse, at explicit sizes."""

from __future__ import annotations

import json
import shutil

import pytest
from textual import events
from textual.widgets import Checkbox, Input, OptionList, Select

from memtui.cli import main
from memtui.engine.estimator import estimate
from memtui.engine.planning.export import budget_json
from memtui.engine.planning.fit import suggest
from memtui.engine.telemetry.local_gpu import local_gpu_from_reading
from memtui.engine.model import presets
from memtui.engine.model.options import label
from memtui.engine.model.presets import presets_dir
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.units import format_gib
from memtui.tui.app import MemtuiApp
from memtui.tui.explain import EXPLAINERS, OVERVIEW
from memtui.tui.live import LivePanel
from memtui.tui.option_specs import OPTION_SPECS
from memtui.tui.planner import LOCAL_GPU
from memtui.tui.screens.explain_screen import ExplainScreen
from memtui.tui.widgets.budget import ComponentTable, FitHint, PinSummary, TimelineChart, VerdictBanner
from memtui.tui.widgets.ladder_view import LadderView
from memtui.tui.widgets.memory_bar import MemoryBar
from memtui.tui.widgets.options_panel import OptionRow

pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (asyncio backend)

WIDE = (120, 40)
NARROW = (80, 24)


def make_app(**kwargs) -> MemtuiApp:
    kwargs.setdefault("gpu_detector", None)  # deterministic: never ask this machine's NVML
    return MemtuiApp(**kwargs)


async def ready(pilot) -> None:
    """Wait until the lazily mounted inputs are there and focused, and the ladder is built."""
    for _ in range(100):
        if pilot.app.query("#opt-model") and pilot.app.focused is not None:
            break
        await pilot.pause()
    await settled(pilot)


async def settled(pilot) -> None:
    """Wait for the ladder of the current options (built in a worker when it is new)."""
    for _ in range(500):
        result = pilot.app.result
        if result.stale or result.ladder is not None:
            break
        await pilot.pause(0.01)
    await pilot.pause()


def rendered(widget) -> str:
    return widget.render().plain


def row(app, key) -> OptionRow:
    return app.query_one(f"#row-{key}", OptionRow)


def note(app, key) -> str:
    return str(row(app, key).query_one(".option-note").render())


async def type_into(pilot, key: str, text: str) -> None:
    field = pilot.app.query_one(f"#opt-{key}", Input)
    field.focus()
    await pilot.pause()
    await pilot.press("ctrl+a", "ctrl+k", *text)
    await settled(pilot)


async def paste_into(pilot, key: str, text: str) -> None:
    """Paste into a field (what a person does with a long path), then Enter."""
    field = pilot.app.query_one(f"#opt-{key}", Input)
    field.focus()
    await pilot.press("ctrl+a", "ctrl+k")
    field.post_message(events.Paste(text))
    await pilot.pause()
    await pilot.press("enter")
    await settled(pilot)


async def set_select(pilot, key: str, value: str) -> None:
    """Change a picker's value the quick way (the widget posts the same Changed a person's pick does)."""
    pilot.app.query_one(f"#opt-{key}", Select).value = value
    await settled(pilot)


async def choose(pilot, key: str, value: str) -> None:
    """Pick a value from a Select with the keyboard: open it, walk to the value, Enter."""
    select = pilot.app.query_one(f"#opt-{key}", Select)
    select.focus()
    await pilot.press("enter")
    overlay = select.query_one(OptionList)
    target = next(index for index, option in enumerate(overlay.options) if option.id == value or
                  str(select._options[index][1]) == value)
    step = "down" if target > (overlay.highlighted or 0) else "up"
    for _ in range(abs(target - (overlay.highlighted or 0))):
        await pilot.press(step)
    await pilot.press("enter")
    await settled(pilot)


async def test_opens_with_verdict_bar_table_timeline_and_ladder():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        expected = estimate(TrainingConfig())
        assert app.result.budget == expected
        verdict = app.query_one(VerdictBanner)
        assert verdict.has_class("-over") and "DOES NOT FIT" in rendered(verdict)
        assert f"over by {-expected.headroom_bytes / 2**30:.2f} GiB" in rendered(verdict)
        bar = rendered(app.query_one(MemoryBar))
        assert "GPU 79.65 GiB ▼" in bar and "optimizer 59.8" in bar
        table = rendered(app.query_one(ComponentTable))
        assert "Optimizer states" in table and f"{expected.per_gpu.optimizer_states / 2**30:.2f}" in table
        assert "Bytes per parameter" in table and "16.00" in table
        timeline = rendered(app.query_one(TimelineChart))
        assert all(point.phase in timeline for point in expected.timeline) and "◀" in timeline
        ladder = app.query_one(LadderView)
        assert ladder.option_list.option_count == len(app.result.ladder.steps) == 3
        assert app.focused is app.query_one("#opt-model")
        assert app.screen.has_class("-wide")


async def test_choosing_an_option_with_the_keyboard_changes_the_budget():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        before = app.result.budget
        bar_before = rendered(app.query_one(MemoryBar))
        await choose(pilot, "precision", "bf16-true")
        assert app.planner.options["precision"] == "bf16-true"
        after = app.result.budget
        assert after == estimate(TrainingConfig(precision="bf16-true"))
        assert after.device_peak_bytes < before.device_peak_bytes
        assert after.bytes_per_param == 8.0
        assert rendered(app.query_one(MemoryBar)) != bar_before
        assert "8.00" in rendered(app.query_one(ComponentTable))


async def test_every_choice_of_every_picker_gives_a_budget_or_an_inline_reason():
    """Nothing crashes: each value of each picker (and each GPU) is either estimated or refused beside a field."""
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        defaults = dict(app.planner.options)
        pickers = [(spec.key, spec.choices) for spec in OPTION_SPECS.values() if spec.kind == "select"]
        pickers.append(("gpu", tuple(presets.gpus())))
        for key, choices in pickers:
            for choice in choices:
                await set_select(pilot, key, choice)
                assert str(app.planner.options[key]) == choice, (key, choice)
                result = app.result
                if result.stale:
                    invalid = app.query(".option-row.-invalid")
                    assert invalid, (key, choice)
                    assert any(result.error.reason(label) in note(app, row.spec.key) for row in invalid), (key, choice)
                else:
                    assert result.config.model_dump()[key] == app.planner.options[key]
                    assert result.budget == estimate(result.config, gpu=result.gpu)
            await set_select(pilot, key, str(defaults[key]))
            assert not app.result.stale, key


async def test_an_invalid_number_is_refused_inline_and_the_last_budget_stays():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        good = app.result.budget
        await type_into(pilot, "batch_size", "0")
        assert row(app, "batch_size").has_class("-invalid")
        assert "must be at least 1, got 0" in note(app, "batch_size")
        assert app.query_one(VerdictBanner).has_class("-stale")
        assert "STALE" in rendered(app.query_one(VerdictBanner))
        assert app.result.budget == good  # the last good budget is still drawn
        await type_into(pilot, "batch_size", "8")
        assert not row(app, "batch_size").has_class("-invalid")
        assert note(app, "batch_size") == row(app, "batch_size").spec.summary
        assert app.result.budget.per_gpu.activations > good.per_gpu.activations or (
            app.result.budget.device_peak_bytes > good.device_peak_bytes)


async def test_a_burst_of_keys_stays_in_order():
    """Over SSH several keys arrive in one packet: a backspace must not be overtaken by the digits after it."""
    app = make_app()
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        field = app.query_one("#opt-lora_rank", Input)
        field.focus()
        await pilot.pause()
        for key, character in (("end", None), ("backspace", None), ("1", "1"), ("6", "6"), ("left", None),
                               ("backspace", None), ("3", "3")):
            app.post_message(events.Key(key, character))  # what the driver does, without waiting in between
        await pilot.pause()
        assert field.value == "36" and app.planner.options["lora_rank"] == 36


def ladder_shown_for(app):
    """The configuration the savings ladder on screen was built for (its last rung is that configuration)."""
    view = app.query_one(LadderView)
    return view.ladder.final.config if view.ladder is not None else None


async def wait_for_workers(pilot) -> None:
    for _ in range(500):
        if not [worker for worker in pilot.app.workers if worker.is_running]:
            break
        await pilot.pause(0.01)
    await pilot.pause()


async def test_after_fast_typing_the_budget_and_the_ladder_show_one_configuration():
    """Keys arrive faster than the ladder builds; whatever is on screen then, the ladder shows the budget's
    configuration or is marked as not (yet) being it, and an input's error makes both STALE."""
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        view = app.query_one(LadderView)
        title = view.query_one("#ladder-title")
        unmarked_mismatches = []

        async def type_fast(key: str, text: str) -> None:
            app.query_one(f"#opt-{key}", Input).focus()
            await pilot.pause()
            for name in ("ctrl+a", "ctrl+k", *text):
                app.post_message(events.Key(name, name if name.isdigit() else None))
            for _ in range(100):
                await pilot.pause(0.01)
                shown, current = ladder_shown_for(app), app.result.config
                if shown != current and not view.has_class("-pending"):
                    unmarked_mismatches.append((key, shown, current))
            await wait_for_workers(pilot)

        await type_fast("batch_size", "9999")  # every prefix a valid configuration
        assert app.result.config.batch_size == 9999 and ladder_shown_for(app) == app.result.config
        assert not str(title.render()).startswith("STALE")
        await type_fast("lora_rank", "9999")  # up to 999 a rank; 9999 exceeds Llama's 1024
        assert app.query_one("#opt-lora_rank", Input).value == "9999" and app.result.stale
        assert app.result.config.lora_rank == 999  # the last valid budget...
        assert ladder_shown_for(app) == app.result.config  # ...and its ladder, not the one from before typing
        assert not view.has_class("-pending") and unmarked_mismatches == []
        assert str(title.render()).startswith("STALE") and "STALE" in rendered(app.query_one(VerdictBanner))


async def test_an_impossible_combination_is_named_beside_its_field():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await paste_into(pilot, "lora_targets", "all-linear")
        await type_into(pilot, "lora_rank", "99999")
        assert row(app, "lora_rank").has_class("-invalid")
        assert "exceeds the smallest adapted dimension" in note(app, "lora_rank")
        await type_into(pilot, "lora_rank", "16")
        assert not row(app, "lora_rank").has_class("-invalid")
        await type_into(pilot, "gpus", "3")
        await type_into(pilot, "tp", "3")
        assert "attention heads" in note(app, "tp")
        assert not app.query(".option-row.-invalid").exclude("#row-tp")


async def test_palette_switches_the_model_and_the_gpu():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"3.1 70B")
        await palette_listed(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert app.planner.options["model"] == "llama-3.1-70b"
        assert app.query_one("#opt-model", Select).value == "llama-3.1-70b"
        assert app.result.budget.model.id == "llama-3.1-70b"
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"4090")
        await palette_listed(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one("#opt-gpu", Select).value == "rtx-4090"
        assert app.result.budget.gpu.memory_bytes == 25757220864
        assert "GeForce RTX 4090" in app.sub_title


async def palette_listed(pilot) -> None:
    """Wait until the command palette lists the matches of what was typed: it searches in a worker, and adds
    what it found when the search ends (a fixed 0.3 s wait before)."""
    from textual.command import CommandList, CommandPalette

    await pilot.pause()  # the last key's Input.Changed handled: its search started
    for _ in range(300):
        screen = pilot.app.screen
        searching = [worker for worker in pilot.app.workers
                     if worker.group == CommandPalette._GATHER_COMMANDS_GROUP and not worker.is_finished]
        if isinstance(screen, CommandPalette) and not searching and screen.query_one(CommandList).option_count:
            break
        await pilot.pause(0.01)


async def palette(pilot, query: str) -> None:
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*query)
    await palette_listed(pilot)
    await pilot.press("enter")
    await pilot.pause()


async def test_the_palette_has_the_apps_actions_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
    app = make_app(options={"model": "llama-3.1-8b", "gpu": "t4"})
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await palette(pilot, "export")
        assert app.last_export is not None and app.last_export.json.parent == tmp_path
        await palette(pilot, "pin")
        assert app.planner.pinned is not None
        # The theme command is `t`'s switch, both ways, not a picker of themes `t` never comes back from.
        await palette(pilot, "theme")
        assert app.theme == "textual-light"
        await palette(pilot, "theme")
        assert app.theme == "textual-dark"
        await fit_found(pilot)
        before = app.result.budget.fits
        await palette(pilot, "make it fit")
        await settled(pilot)
        assert not before and app.result.budget.fits
        await palette(pilot, "explain")
        assert isinstance(app.screen, ExplainScreen)
        await pilot.press("escape")
        await pilot.pause()
        started = []
        monkeypatch.setattr(type(app.query_one(LivePanel)), "start_run", lambda panel, config: started.append(config))
        await palette(pilot, "live run")
        assert started == [app.result.config]


async def test_palette_applies_a_recipe_and_the_inputs_follow():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"qlora 24")
        await palette_listed(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one("#opt-quant", Select).value == "nf4"
        assert app.query_one("#opt-lora_rank", Input).value == "16"
        assert app.query_one("#opt-checkpointing", Select).value == "full"
        assert app.result.config.quant == "nf4" and app.result.config.gpu == "rtx-4090"
        assert not app.result.stale


async def test_explain_the_focused_option_with_question_mark_or_f1():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        app.query_one("#opt-precision").focus()
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, ExplainScreen)
        assert app.screen.markdown.startswith("# Precision")
        assert "## What it costs" in app.screen.markdown and "## When to use it" in app.screen.markdown
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ExplainScreen)
        # A number field keeps "?" (refused: digits only), so F1 is the way there.
        app.query_one("#opt-seq_len").focus()
        await pilot.press("question_mark")
        await pilot.pause()
        assert not isinstance(app.screen, ExplainScreen) and "digits only" in note(app, "seq_len")
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen.markdown.startswith("# Sequence length")
        await pilot.press("escape")
        # In a text field "?" is text, so F1 is the way.
        app.query_one("#opt-lora_targets").focus()
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen.markdown.startswith("# LoRA targets")


async def test_f1_explains_the_focused_option_and_every_option_has_an_explainer():
    # Every option names an explainer with text; F1 on a focused input opens its option's (one input of each kind
    # is pressed, and the stack's: a Markdown screen per option would cost the suite most of a minute).
    for spec in OPTION_SPECS.values():
        assert EXPLAINERS[spec.explainer].markdown().strip(), spec.key
    pressed, seen = [], set()
    for spec in OPTION_SPECS.values():
        if spec.kind not in seen or spec.key == "stack":
            seen.add(spec.kind)
            pressed.append(spec)
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        for spec in pressed:
            app.query_one(f"#opt-{spec.key}").focus()
            await pilot.press("f1")
            await pilot.pause()
            assert isinstance(app.screen, ExplainScreen), spec.key
            # The stack's explainer goes on with the chosen stack's cited defaults (tests/test_stacks.py).
            assert app.screen.markdown.startswith(EXPLAINERS[spec.explainer].markdown())
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, ExplainScreen)
        # Nothing focused that has an explainer: the overview of the screen and its keys.
        app.set_focus(None)
        await pilot.press("question_mark")
        assert app.screen.markdown == OVERVIEW


async def test_the_model_picker_searches_as_you_type():
    app = make_app()
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        assert app.focused is app.query_one("#opt-model", Select)
        await pilot.press("enter", *"mistral")
        await pilot.press("enter")
        await pilot.pause()
        assert app.planner.options["model"] == "mistral-7b" == app.result.budget.model.id


async def test_the_budget_draws_at_once_and_a_new_ladder_follows_from_a_worker(monkeypatch, tmp_path):
    import threading

    import memtui.engine.planning.ladder

    release = threading.Event()
    real = memtui.engine.planning.ladder.savings_ladder

    def slow(config, **kwargs):
        # Only the worker waits: the export builds its ladder on the UI thread, which waited the 10 s out before.
        if threading.current_thread() is not threading.main_thread():
            release.wait(10)
        return real(config, **kwargs)

    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        view = app.query_one(LadderView)
        before = [str(option.prompt) for option in view.option_list.options]
        monkeypatch.setattr(memtui.engine.planning.ladder, "savings_ladder", slow)
        app.query_one("#opt-precision", Select).value = "bf16-true"
        await pilot.pause()
        result = app.result
        assert result.budget == estimate(TrainingConfig(precision="bf16-true")) and result.ladder is None
        assert view.has_class("-pending") and [str(o.prompt) for o in view.option_list.options] == before
        release.set()
        await settled(pilot)
        assert app.result.ladder == real(app.result.config) and not view.has_class("-pending")
        assert view.highlighted_step().keys == ("precision",)  # the rung of the option just changed
        # Back to a configuration seen before: its ladder is known, no worker needed.
        release.clear()
        app.query_one("#opt-precision", Select).value = "bf16-mixed"
        await pilot.pause()
        assert app.result.ladder is not None and not view.has_class("-pending")
        assert [str(option.prompt) for option in view.option_list.options] == before
        # An export that comes before the worker builds the ladder itself.
        monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
        app.query_one("#opt-checkpointing", Select).value = "full"
        await pilot.pause()
        assert app.result.ladder is None
        await pilot.press("e")
        await pilot.pause()
        assert "full activation checkpointing" in app.last_export.markdown.read_text()
        release.set()


async def test_ladder_rows_say_why_each_step_helped():
    app = make_app(options={"model": "llama-3.1-8b"})
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        app.apply_preset("recipe", "qlora-24gb")
        await settled(pilot)
        ladder = app.query_one(LadderView)
        keys = [step.keys[0] for step in ladder.ladder.steps]
        assert keys == ["baseline", "precision", "lora_rank", "quant", "attention", "checkpointing"]
        ladder.option_list.focus()
        ladder.option_list.highlighted = keys.index("quant")
        await pilot.pause()
        why = str(app.query_one("#ladder-why").render())
        assert why.startswith("NF4 4-bit base weights (QLoRA):") and "weights −" in why
        await pilot.press("question_mark")
        await pilot.pause()
        assert app.screen.markdown.startswith("# Quantized base")
        assert "NF4" in str(app.screen.query_one("#explain-footer").render())
        await pilot.press("escape")
        # Enter on a step (or a click) explains it too; the baseline explains the 16 bytes.
        ladder.option_list.highlighted = 0
        await pilot.press("enter")
        assert app.screen.markdown.startswith("# The savings ladder")


async def fit_found(pilot) -> None:
    """Wait for the fit search (a worker) to answer for the current options."""
    for _ in range(200):
        found = pilot.app.fit_suggestion
        if found is not None and found[0] == pilot.app.result.config:
            break
        await pilot.pause(0.02)
    await pilot.pause()


async def test_does_not_fit_says_what_would_fit_and_f_applies_it():
    app = make_app(options={"model": "llama-3.1-70b", "gpu": "rtx-4090"})
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        await fit_found(pilot)
        result = app.result
        expected = suggest(result.config, model=result.model, gpu=result.gpu)
        assert not result.budget.fits and expected.plan is not None
        hint = app.query_one(FitHint)
        assert hint.display and not hint.has_class("-pending")
        text = " ".join(str(hint.render()).split())
        assert text.startswith(f"To fit: {expected.plan.summary}") and text.endswith("f applies")
        await pilot.press("f")
        await pilot.pause()
        assert app.result.config == expected.plan.config
        assert app.result.budget.fits and "FITS" in rendered(app.query_one(VerdictBanner))
        assert app.query_one("#opt-gpus", Input).value == str(expected.plan.config.gpus)
        assert not hint.display and app.fit_suggestion is None
        assert any(expected.plan.summary in str(n.title) for n in app._notifications)
        await pilot.press("f")  # nothing left to do
        await pilot.pause()
        assert any("fits already" in n.message for n in app._notifications)


async def test_the_fit_hint_follows_the_options_and_hides_when_it_fits():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await fit_found(pilot)
        hint = app.query_one(FitHint)
        first = str(hint.render())
        assert hint.display
        await type_into(pilot, "batch_size", "4")
        await fit_found(pilot)
        assert hint.display and str(hint.render()) != first
        await type_into(pilot, "batch_size", "0")  # invalid: no hint for a stale budget
        assert app.result.stale and not hint.display
        app.apply_preset("model", "gpt2")
        await type_into(pilot, "batch_size", "1")
        assert app.result.budget.fits and not hint.display


async def test_a_burst_of_edits_starts_one_fit_search(monkeypatch):
    import memtui.engine.planning.fit

    searched = []
    real = memtui.engine.planning.fit.suggest
    monkeypatch.setattr(memtui.engine.planning.fit, "suggest", lambda config, **kw: searched.append(config) or real(config, **kw))
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await fit_found(pilot)
        assert len(searched) == 1
        field = app.query_one("#opt-batch_size", Input)
        field.focus()
        await pilot.pause()
        for key in ("end", "2", "3", "4"):
            app.post_message(events.Key(key, None if key == "end" else key))
        await pilot.pause()
        await fit_found(pilot)
        assert app.planner.options["batch_size"] == 1234
        assert [config.batch_size for config in searched] == [1, 1234]


async def test_a_failed_fit_search_only_hides_the_hint(monkeypatch):
    import memtui.engine.planning.fit

    def broken(config, **kwargs):
        raise RuntimeError("search failed")

    monkeypatch.setattr(memtui.engine.planning.fit, "suggest", broken)
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await fit_found(pilot)
        assert app.fit_suggestion == (app.result.config, None)
        assert not app.query_one(FitHint).display and not app.result.budget.fits
        await pilot.press("f")
        await pilot.pause()
        assert any("No change found" in n.message for n in app._notifications)


async def test_pin_then_change_shows_each_components_delta():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("p")
        await pilot.pause()
        pin = app.query_one(PinSummary)
        assert pin.display and app.planner.pinned is not None
        pinned = app.planner.pinned.budget
        # The pin line shows both values and the change, never a bare change after "now".
        line = str(pin.render())
        assert f"Pinned: {format_gib(pinned.device_peak_bytes)}" in line
        assert f"now: {format_gib(pinned.device_peak_bytes)}" in line and line.endswith(", 0.00 GiB · same options")
        await set_select(pilot, "checkpointing", "full")
        await set_select(pilot, "optimizer_impl", "fused")
        table = rendered(app.query_one(ComponentTable))
        assert "Δ pin" in table
        # The table widens for the delta column: no label is cut.
        assert all(label in table for label in ("Optimizer states", "Device peak (NVML)", "Tensor peak (PyTorch)",
                                                "Bytes per parameter"))
        change = app.result.budget.per_gpu.temporary - pinned.per_gpu.temporary
        assert change < 0 and f"−{abs(change) / 2**30:.2f}" in table
        line = str(pin.render())
        assert "checkpointing none→full" in line
        now = app.result.budget.device_peak_bytes
        assert f"now: {format_gib(now)} (does not fit), {format_gib(now - pinned.device_peak_bytes, signed=True)}" in line
        await pilot.press("p")
        await pilot.pause()
        assert not app.query_one(PinSummary).display
        assert "Δ pin" not in rendered(app.query_one(ComponentTable))


async def test_export_writes_markdown_and_the_estimate_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
    app = make_app(options={"model": "gpt2", "gpu": "t4", "seq_len": 1024})
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("e")
        await pilot.pause()
        paths = app.last_export
        assert paths is not None and paths.json.parent == tmp_path
        from memtui.engine.estimator.reserved import with_reserved
        from memtui.engine.model.presets import resolve_gpu, resolve_model

        config = TrainingConfig(model="gpt2", gpu="t4", seq_len=1024)
        model, gpu = resolve_model("gpt2"), resolve_gpu("t4")
        # `memtui estimate --json`: the estimate with the allocator replay.
        assert paths.json.read_text() == budget_json(with_reserved(estimate(config), config, model, gpu))
        assert paths.markdown.read_text().startswith("# memtui budget: GPT-2 (124M) on 1x Tesla T4")
        assert any(str(paths.markdown) in notification.message for notification in app._notifications)


async def test_export_is_refused_while_an_input_is_invalid(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await type_into(pilot, "tp", "5")
        app.action_export()
        await pilot.pause()
        assert app.last_export is None and list(tmp_path.iterdir()) == []


async def test_model_path_loads_a_config_json_or_says_why(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(presets_dir() / "models" / "qwen2.5-0.5b.json", folder / "config.json")
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await paste_into(pilot, "model_path", str(tmp_path / "nope.json"))
        assert row(app, "model_path").has_class("-invalid") and "no such file" in note(app, "model_path")
        await paste_into(pilot, "model_path", str(folder / "config.json"))
        assert not row(app, "model_path").has_class("-invalid")
        assert app.query_one("#opt-model", Select).value == str(folder / "config.json")
        assert app.result.budget.model.params == 494032768


async def test_theme_toggles_between_dark_and_light():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        assert app.theme == "textual-dark"
        await pilot.press("t")
        assert app.theme == "textual-light" and not app.current_theme.dark
        await pilot.press("t")
        assert app.theme == "textual-dark"


def relative_luminance(color) -> float:
    def channel(value: int) -> float:
        value /= 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4
    return 0.2126 * channel(color.red) + 0.7152 * channel(color.green) + 0.0722 * channel(color.blue)


def contrast(first, second) -> float:
    light, dark = sorted((relative_luminance(first), relative_luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def cell_ink(app, widget, x: int = 0, y: int = 0):
    """The colour a person sees in one cell as the terminal gets it (after NO_COLOR's filter): a full block
    shows its foreground, anything else mostly its background."""
    from textual.color import Color

    from textual.geometry import Region

    strip = widget.render_lines(Region(0, y, widget.size.width, 1))[0]  # with borders, as the screen draws it
    for line_filter in app._filters:
        strip = line_filter.apply(list(strip), Color(0, 0, 0))
    offset = 0
    for segment in strip:
        if offset + len(segment.text) > x:
            character, style = segment.text[x - offset], segment.style
            break
        offset += len(segment.text)
    color = style.color if character == "█" else style.bgcolor
    return color.get_truecolor()


@pytest.mark.parametrize("theme, no_color", [("textual-dark", False), ("textual-light", False),
                                             ("textual-dark", True)])
async def test_focus_is_visible_on_the_pickers_and_the_ladder(monkeypatch, theme, no_color):
    """WCAG's 3:1 for a focus indicator: the focused picker's and ladder's look against their unfocused one."""
    from textual.widgets._select import SelectCurrent

    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        app.theme = theme
        ladder = app.query_one("#ladder-list", OptionList)
        precision, checkpointing = (app.query_one(f"#opt-{key}", Select) for key in ("precision", "checkpointing"))
        precision.focus()
        await pilot.pause()
        focused = cell_ink(app, precision.query_one(SelectCurrent))
        blurred = cell_ink(app, checkpointing.query_one(SelectCurrent))
        ladder_blurred = cell_ink(app, ladder)
        assert contrast(focused, blurred) >= 3, (focused, blurred)
        ladder.focus()
        await pilot.pause()
        ladder_focused = cell_ink(app, ladder)
        assert contrast(ladder_focused, ladder_blurred) >= 3, (ladder_focused, ladder_blurred)


async def test_no_color_runs_and_keeps_segments_apart_with_glyphs(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        assert app.no_color
        bar = rendered(app.query_one(MemoryBar))
        # weights █, gradients ▓, optimizer states ▒: told apart without colour.
        assert "█" in bar and "▓" in bar and "▒" in bar
        await set_select(pilot, "checkpointing", "full")
        assert app.result.config.checkpointing == "full"


async def test_80x24_is_usable_with_the_keyboard_alone():
    app = make_app()
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        assert app.screen.has_class("-narrow")
        assert "DOES NOT FIT" in rendered(app.query_one(VerdictBanner))
        # Narrow, the ladder (what moves as options change) comes right under the summary, before the table.
        order = [child.id for child in app.query_one("#budget-scroll").children]
        assert order.index("ladder") < order.index("details")
        await pilot.resize_terminal(*WIDE)
        await pilot.pause()
        order = [child.id for child in app.query_one("#budget-scroll").children]
        assert order.index("ladder") > order.index("details") and app.screen.has_class("-wide")
        await pilot.resize_terminal(*NARROW)
        await pilot.pause()
        assert app.query_one("#opt-model").has_focus
        # Every input is in the focus chain, in reading order, and the ladder after them.
        chain = [widget.id for widget in app.screen.focus_chain if widget.id]
        from memtui.tui.option_specs import GROUPS

        option_ids = [f"opt-{spec.key}" for _, specs in GROUPS for spec in specs]  # the panel's reading order
        assert option_ids[:8] == ["opt-model", "opt-model_path", "opt-gpu", "opt-gpus", "opt-stack", "opt-modeling",
                                  "opt-batch_size", "opt-seq_len"]
        assert chain[: len(option_ids)] == option_ids and "ladder-list" in chain[len(option_ids):]
        # Tab walks it.
        for expected in option_ids[1:5]:
            await pilot.press("tab")
            assert app.focused.id == expected
        # And a change made by keys alone shows up in the budget.
        before = app.result.budget.device_peak_bytes
        await choose(pilot, "optimizer", "adamw-8bit")
        assert app.result.budget.device_peak_bytes < before


async def test_the_mouse_works_and_bad_combinations_stay_inline():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        switch = app.query_one("#opt-master_weights", Checkbox)
        assert switch.value is False and str(switch.label) == "off"
        assert await pilot.click("#opt-master_weights")
        await pilot.pause()
        assert switch.value is True and str(switch.label) == "on"
        assert "needs 16-bit weights" in note(app, "master_weights")
        await set_select(pilot, "precision", "bf16-true")
        assert not app.result.stale
        assert app.result.budget.bytes_per_param == 16.0  # the fp32 master copy brings it back


async def test_the_local_gpu_is_chosen_with_its_real_capacity():
    reading = local_gpu_from_reading("NVIDIA GeForce RTX 4090", 25757220864 - 2**27)
    app = make_app(gpu_detector=lambda: reading)
    # The note is read after the waits below: on a loaded machine they outlasted its 5 s on screen (a flaky failure).
    app.NOTIFICATION_TIMEOUT = 600
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        for _ in range(50):
            if app.planner.use_local_gpu:
                break
            await pilot.pause()
        assert app.query_one("#opt-gpu", Select).value == LOCAL_GPU
        assert app.result.budget.gpu.memory_bytes == 25757220864 - 2**27
        assert any("NVIDIA GeForce RTX 4090" in n.message for n in app._notifications), [n.message for n in app._notifications]


async def test_q_quits():
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert app._exit


async def test_newcomer_goes_from_does_not_fit_to_fits_and_exports(tmp_path, monkeypatch, capsys):
    """The issue's acceptance path, keys only and at 80x24: palette to 70B on a 4090, savers until it fits,
    why each ladder step helped, export; the exported JSON is what `memtui estimate --json` prints."""
    monkeypatch.setenv("MEMTUI_EXPORT_DIR", str(tmp_path))
    app = make_app()
    async with app.run_test(size=NARROW) as pilot:
        await ready(pilot)
        for query in ("3.1 70B", "4090"):
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*query)
            await palette_listed(pilot)
            await pilot.press("enter")
            await settled(pilot)
        assert (app.planner.options["model"], app.planner.options["gpu"]) == ("llama-3.1-70b", "rtx-4090")
        assert not app.result.budget.fits
        assert "DOES NOT FIT" in rendered(app.query_one(VerdictBanner))
        bars = [rendered(app.query_one(MemoryBar))]
        ladder_sizes = [len(app.result.ladder.steps)]
        peaks = [app.result.budget.device_peak_bytes]

        async def then(action) -> None:
            await action
            assert not app.result.stale
            bars.append(rendered(app.query_one(MemoryBar)))
            ladder_sizes.append(len(app.result.ladder.steps))
            peaks.append(app.result.budget.device_peak_bytes)

        # QLoRA: adapters on every linear layer over a 4-bit base; then checkpointing.
        await paste_into(pilot, "lora_targets", "all-linear")
        await then(type_into(pilot, "lora_rank", "16"))
        await then(choose(pilot, "quant", "nf4"))
        await then(choose(pilot, "checkpointing", "full"))
        assert app.result.budget.bytes_per_param < 1
        # A 70B model's 4-bit weights alone (~33 GiB) exceed 24 GB: the weights must leave the GPU.
        await then(choose(pilot, "zero", "3"))
        await then(choose(pilot, "offload", "optimizer+params"))
        assert app.result.budget.fits and "FITS" in rendered(app.query_one(VerdictBanner))
        # The bar moved with every step that changed the peak: all but ZeRO-3 (alone, on one GPU, it shards
        # nothing; offload then needs it). The peak only went down; the ladder grew.
        moved = [before != after for before, after in zip(bars, bars[1:])]
        changed = [before != after for before, after in zip(peaks, peaks[1:])]
        assert moved == changed and changed == [True, True, True, False, True]
        assert ladder_sizes == sorted(ladder_sizes) and ladder_sizes[-1] > ladder_sizes[0]
        assert peaks[-1] < peaks[0] and peaks == sorted(peaks, reverse=True)
        # Why each step helped: every rung says what it removed, and ? opens its explainer.
        ladder = app.query_one(LadderView)
        rows = [str(option.prompt) for option in ladder.option_list.options]
        assert not any("…" in row for row in rows)  # 80 columns: short labels ("LoRA r16", "nf4"), not cut ones
        assert [row.split()[0] for row in rows[2:5]] == ["LoRA", "nf4", "ZeRO-3"]
        ladder.option_list.focus()
        for index, step in enumerate(app.result.ladder.steps[1:], start=1):
            ladder.option_list.highlighted = index
            await pilot.pause()
            assert str(app.query_one("#ladder-why").render()).startswith(f"{step.label}:")
        await pilot.press("question_mark")
        assert app.screen.markdown.startswith("# Activation checkpointing")
        await pilot.press("escape")
        ladder.option_list.highlighted = next(
            index for index, step in enumerate(app.result.ladder.steps) if "offload" in step.keys)
        await pilot.press("question_mark")
        assert app.screen.markdown.startswith("# CPU offload")
        await pilot.press("escape")
        await pilot.press("e")
        await pilot.pause()
        paths = app.last_export
        assert paths.markdown.exists() and paths.json.exists() and paths.json.parent == tmp_path
        assert any(str(paths.json) in notification.message for notification in app._notifications)
        exported = paths.json.read_text()
    assert main(["estimate", "--model", "llama-3.1-70b", "--gpu", "rtx-4090", "--lora-targets", "all-linear",
                 "--lora-rank", "16", "--quant", "nf4", "--checkpointing", "full", "--zero", "3",
                 "--offload", "optimizer+params", "--json"]) == 0
    assert exported == capsys.readouterr().out
    assert json.loads(exported)["fits"] is True


def test_short_ladder_labels_fit_the_narrow_layout():
    """At 80 columns a rung gets 11 cells: every short label fits, so no rung is cut."""
    from memtui.engine.planning.ladder import savings_ladder
    from memtui.tui.widgets.ladder_view import short_label

    configs = [
        TrainingConfig(precision="bf16-true", master_weights=True, optimizer="galore-adamw", optimizer_impl="for-loop",
                       checkpointing="selective", gpus=8, tp=2, pp=2, zero=1, batch_size=2, microbatches=2),
        TrainingConfig(precision="16-true", master_weights=True, optimizer="sgd-momentum", optimizer_impl="fused",
                       lora_rank=64, quant="nf4", zero=3, offload="optimizer+params", checkpointing="full"),
    ]
    for config in configs:
        for step in savings_ladder(config).steps:
            assert len(short_label(step)) <= 11, short_label(step)


async def test_worker_answers_arriving_during_shutdown_are_dropped():
    """Answers from the ladder and fit workers can land while the app tears its widgets down."""
    from memtui.tui.app import FitFound, LadderBuilt

    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        await ready(pilot)
        result = app.result
        await app.query_one(FitHint).remove()
        await app.query_one(LadderView).remove()
        app.post_message(FitFound(result.config, None))
        app.post_message(LadderBuilt(result.config, result.gpu, result.ladder))
        await pilot.pause()
        assert app.fit_suggestion == (result.config, None)


@pytest.mark.parametrize("argv, expected", [
    (["gpt2"], {"model": "gpt2", "seq_len": 1024}),
    (["--model", "gpt2", "--gpu", "t4", "--lora-rank", "8", "--lora-targets", "c_attn"],
     {"model": "gpt2", "gpu": "t4", "lora_rank": 8, "lora_targets": "c_attn"}),
    ([str(presets_dir() / "models" / "qwen2.5-0.5b.json"), "--batch-size", "4"],
     {"model": str(presets_dir() / "models" / "qwen2.5-0.5b.json"), "batch_size": 4}),
])
def test_memtui_with_a_model_a_file_or_estimate_flags_opens_the_planner_on_it(monkeypatch, argv, expected):
    from textual.app import App

    opened = []

    def run_headless(app, **kwargs):  # App.run, without a terminal: look at the planner once it is ready, leave
        async def look(pilot) -> None:
            await ready(pilot)
            shown = {key: app.query_one(f"#opt-{key}", Select if key in ("model", "gpu") else Input).value
                     for key in expected if key in ("model", "gpu", "lora_rank", "lora_targets", "batch_size")}
            opened.append((app.result.config, shown))
            app.exit()

        return App.run(app, headless=True, size=WIDE, auto_pilot=look)

    monkeypatch.setenv("MEMTUI_NO_GPU_DETECT", "1")
    monkeypatch.setattr(MemtuiApp, "run", run_headless)
    assert main(argv) == 0
    (config, shown), = opened
    assert {key: getattr(config, key) for key in expected} == expected
    assert shown == {key: str(value) for key, value in expected.items() if key in shown}


@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "x"], "--lora-rank: 'x' is not a whole number"),
    (["no-such-model"], "no-such-model"),
    (["gpt2", "--model", "gpt2"], "give the model once"),
])
def test_a_bad_planner_argument_is_one_line_and_exit_2(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(MemtuiApp, "run", lambda app, **kwargs: pytest.fail("the planner opened"))
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memtui: error:") and message in err and err.count("\n") == 1


def test_memtui_on_a_configuration_the_estimate_refuses_opens_with_the_reason_at_its_field(monkeypatch):
    """The issue's own example: GPT-2 has no q_proj, so the default LoRA targets are refused beside their field."""
    from textual.app import App

    notes = []

    def run_headless(app, **kwargs):
        async def look(pilot) -> None:
            await ready(pilot)
            notes.append((app.planner.options["model"], app.planner.options["lora_rank"], note(app, "lora_targets")))
            app.exit()

        return App.run(app, headless=True, size=WIDE, auto_pilot=look)

    monkeypatch.setenv("MEMTUI_NO_GPU_DETECT", "1")
    monkeypatch.setattr(MemtuiApp, "run", run_headless)
    assert main(["--model", "gpt2", "--gpu", "t4", "--lora-rank", "8"]) == 0
    (model, rank, targets_note), = notes
    assert (model, rank) == ("gpt2", 8) and "'q_proj' is not a linear layer of gpt2" in targets_note


async def test_keys_pressed_while_the_planner_starts_are_not_lost():
    """The inputs mount after the first frame; keys typed before that reach them once they are there."""
    app = make_app()
    async with app.run_test(size=WIDE) as pilot:
        assert not app.query("#opt-model")  # still starting
        for key in ("tab", "tab"):
            app.post_message(events.Key(key, None))  # what the driver does, without waiting for the app
        await ready(pilot)
        chain = [widget.id for widget in app.screen.focus_chain]
        assert app.focused.id == chain[chain.index("opt-model") + 2]


@pytest.mark.parametrize("size", [WIDE, NARROW])
async def test_figures_up_to_a_million_gib_keep_their_columns_and_bars_their_patterns(monkeypatch, size):
    """405B in fp32 at batch 3000 needs about 10^6 GiB: every figure stays whole, a space before it, no line
    wider than its widget; under NO_COLOR the step chart's and the ladder's bars show what exceeds the GPU."""
    from memtui.engine.model.specs import COMPONENT_NAMES
    from memtui.engine.units import GiB, gib_number
    from memtui.tui.widgets.budget import OVER_GLYPH

    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(options={"model": "llama-3.1-405b", "precision": "32-true", "gpu": "t4", "batch_size": 1})
    async with app.run_test(size=size) as pilot:
        await ready(pilot)
        await pilot.press("p")
        await type_into(pilot, "batch_size", "3000")
        budget, pinned = app.result.budget, app.planner.pinned.budget
        assert budget.device_peak_bytes > 900_000 * GiB and not app.result.stale

        table = app.query_one(ComponentTable)
        lines = rendered(table).splitlines()
        assert all(len(line) <= table.content_region.width for line in lines)
        now, then = budget.per_gpu.model_dump(), pinned.per_gpu.model_dump()
        for index, name in enumerate(COMPONENT_NAMES, start=1):
            tokens = lines[index].split()
            assert gib_number(now[name]) in tokens and gib_number(now[name] - then[name], signed=True) in tokens
        peak_tokens = lines[len(COMPONENT_NAMES) + 2].split()
        assert gib_number(budget.device_peak_bytes) in peak_tokens
        assert gib_number(budget.device_peak_bytes - pinned.device_peak_bytes, signed=True) in peak_tokens

        chart = app.query_one(TimelineChart)
        chart_lines = rendered(chart).splitlines()[1:]
        assert all(len(line) <= chart.content_region.width for line in chart_lines)
        for point, line in zip(budget.timeline, chart_lines):
            assert gib_number(point.bytes) in line.split()
        assert chart_lines[[p.phase for p in budget.timeline].index(budget.peak_phase)].endswith("◀")
        assert any(OVER_GLYPH in line for line in chart_lines)

        legend = " ".join(rendered(app.query_one(MemoryBar)).splitlines()[2:]).split()
        assert all(gib_number(now[name], 1) in legend for name in COMPONENT_NAMES)

        view = app.query_one(LadderView)
        rows = [str(option.prompt) for option in view.option_list.options]
        assert all(len(row.rstrip()) <= view.option_list.content_region.width for row in rows)
        for step, row in zip(app.result.ladder.steps, rows):
            assert gib_number(step.budget.device_peak_bytes, 1) in row.split()
        if size == WIDE:  # the ladder's bars show from 70 cells up
            assert all(OVER_GLYPH in row for row in rows)
