"""`memtui presets`: the models, GPUs and recipes memtui ships."""

from __future__ import annotations

import argparse
import json

HELP = "list model, GPU and recipe presets, and the training stacks"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("presets", help=HELP, description=HELP)
    parser.add_argument("kind", nargs="?", choices=("models", "gpus", "recipes", "stacks"), help="list only this kind")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from memtui.engine.model import presets

    from memtui.engine.model.stacks import STACKS

    models, gpus, recipes = presets.models(), presets.gpus(), presets.recipes()
    kinds = [args.kind] if args.kind else ["models", "gpus", "recipes", "stacks"]
    if args.json:
        data = {}
        if "models" in kinds:
            data["models"] = [
                {"id": m.id, "name": m.name, "family": m.family, "params": m.params, "layers": m.num_layers,
                 "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "source": m.config.get("_memtui", {}).get("source", "")}
                for m in models.values()
            ]
        if "gpus" in kinds:
            data["gpus"] = [g.model_dump() for g in gpus.values()]
        if "recipes" in kinds:
            data["recipes"] = [r.model_dump() for r in recipes.values()]
        if "stacks" in kinds:
            data["stacks"] = [{"id": stack.id, "name": stack.name, "repository": stack.repository, "commit": stack.commit,
                               "defaults": [_default_json(default) for default in stack.defaults],
                               "not_modelled": [vars(item) | {"when": list(item.when)} for item in stack.not_modelled]}
                              for stack in STACKS.values()]
        print(json.dumps(data, indent=2))
        return 0

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from memtui.engine.units import format_count, format_gib

    console = Console()
    if "models" in kinds:
        table = Table(title="Models (--model)", title_justify="left")
        for column in ("id", "name", "family", "params", "layers", "hidden", "vocab"):
            table.add_column(column, justify="right" if column in ("params", "layers", "hidden", "vocab") else "left")
        for m in models.values():
            table.add_row(m.id, m.name, m.family, format_count(m.params), str(m.num_layers), str(m.hidden_size), f"{m.vocab_size:,}")
        console.print(table)
    if "gpus" in kinds:
        table = Table(title="GPUs (--gpu)", title_justify="left")
        for column in ("id", "name", "memory", "bf16", "fp8"):
            table.add_column(column, justify="right" if column == "memory" else "left")
        for g in gpus.values():
            table.add_row(g.id, g.name, format_gib(g.memory_bytes), "yes" if g.bf16 else "no", "yes" if g.fp8 else "no")
        console.print(table)
    if "recipes" in kinds:
        table = Table(title="Recipes (--recipe)", title_justify="left")
        table.add_column("id")
        table.add_column("what it sets")
        for r in recipes.values():
            table.add_row(r.id, f"[bold]{r.name}[/]\n{r.description}\n[dim]" + ", ".join(f"{k}={v}" for k, v in r.options.items()) + "[/]")
        console.print(table)
    if "stacks" in kinds:
        table = Table(title="Stacks (--stack; sources in docs/stacks.md)", title_justify="left")
        table.add_column("id")
        table.add_column("what it sets")
        for stack in STACKS.values():
            sets = ", ".join(f"{default.field}={default.value_text()}"
                             + (f" ({' and '.join(default.when)})" if default.when else "") for default in stack.defaults)
            unmodelled = "".join(f"\nnot modelled yet: {item.knob}={item.value}" for item in stack.not_modelled)
            table.add_row(stack.id, f"[bold]{escape(stack.name)}[/] ({stack.repository} {stack.commit[:12]})\n[dim]"
                          + escape(sets + unmodelled) + "[/]")
        console.print(table)
    return 0


def _default_json(default) -> dict:
    from memtui.engine.model.stacks import Derived

    value = default.value_text() if isinstance(default.value, Derived) else default.value
    return {"field": default.field, "value": value, "source": default.source, "when": list(default.when),
            "needs": list(default.needs), "note": default.note}
