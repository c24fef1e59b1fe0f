"""SVG snapshots of the planner screen. Regenerate (after looking at the diff report): 
`uv run pytest tests/test_tui_snapshots.py --snapshot-update`."""

from __future__ import annotations

from memtui.tui.app import MemtuiApp


def make_app(**options) -> MemtuiApp:
    # Never this machine's GPU: the picture must not depend on it.
    return MemtuiApp(gpu_detector=None, options=options or None)


async def inputs_ready(pilot) -> None:
    for _ in range(1000):
        if pilot.app.query("#opt-model") and pilot.app.focused is not None:
            break
        await pilot.pause()
    await settled(pilot)


async def settled(pilot) -> None:
    """The ladder, the fit search and the allocator replay run in workers: wait for them so the picture does not
    depend on timing."""
    import time

    app = pilot.app
    deadline = time.monotonic() + 60  # a loaded 2-core CI machine runs these workers slowly
    while time.monotonic() < deadline:
        result = app.result
        fit_known = result.budget is None or result.budget.fits or (
            app.fit_suggestion is not None and app.fit_suggestion[0] == result.config)
        if result.stale or (fit_known and result.ladder is not None and ladder_shown(app) and replay_shown(app)
                            and ladder_laid_out(app)):
            break
        await pilot.pause(0.02)
    await pilot.pause()


def ladder_laid_out(app) -> bool:
    """The ladder's list has its new rows' height and its explanation sits right under it (a loaded machine can
    take the picture between the new rows and the layout that follows them)."""
    from textual.widgets import OptionList

    rows = app.query_one("#ladder-list", OptionList)
    why = app.query_one("#ladder-why")
    return rows.region.height == min(rows.option_count, 14) and why.region.y == rows.region.bottom


def replay_shown(app) -> bool:
    """The budget table has the allocator replay of the budget shown (or knows it cannot be replayed)."""
    from memtui.tui.widgets.budget import ComponentTable

    replayed = app.query_one(ComponentTable).replayed
    return replayed is not None and replayed.config == app.result.budget.config


def ladder_shown(app) -> bool:
    """The ladder's rows are drawn and the highlighted row's explanation under them (it follows the rows)."""
    views = app.query("#ladder-why")
    return bool(views) and bool(str(views.first().render()).strip())


async def qlora_70b_on_a_4090(pilot) -> None:
    await inputs_ready(pilot)
    pilot.app.apply_preset("model", "llama-3.1-70b")
    pilot.app.apply_preset("recipe", "qlora-24gb")
    await settled(pilot)
    pilot.app.clear_notifications()
    await pilot.pause()


def test_main_screen_120x40(snap_compare):
    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=inputs_ready)


def test_main_screen_80x24(snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=inputs_ready)


def test_workshop_story_120x40(snap_compare):
    """70B with QLoRA on a 24 GB card: the ladder from 16 to 0.6 bytes/param, still over the line."""
    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=qlora_70b_on_a_4090)


def test_pipeline_stages_120x40(snap_compare):
    """PP 4, interleaved 1F1B: every rank's budget under the component table, the binding one marked."""
    app = make_app(gpus=4, pp=4, pp_schedule="interleaved-1f1b", batch_size=8, microbatches=8)
    assert snap_compare(app, terminal_size=(120, 40), run_before=inputs_ready)
