"""The information commands: config (resolved config, key reference, JSON Schema), init
(starter configs), datasets and backbones. None of them trains or reads a run folder.
"""

from __future__ import annotations

import typer

from tltool.cli.core import SET_OPTION, app, call, load


@app.command("config")
def show_config(
    config: str = typer.Argument(None, help="YAML config to resolve."),
    set_: list[str] = SET_OPTION,
    reference: bool = typer.Option(False, "--reference", help="Print every key with its "
                                   "default and meaning (Markdown)."),
    schema: bool = typer.Option(False, "--schema", help="Print the config's JSON Schema (for "
                                "editors: completion and checking of keys)."),
) -> None:
    """Print the fully resolved config (extends + --set + defaults) without running anything.

    Example: tltool config configs/credit/finetune.yaml --set model.frozen_layers=2
    """
    from tltool.config import dump_config, json_schema, schema_reference

    if reference:
        typer.echo(schema_reference())
        return
    if schema:
        import json

        typer.echo(json.dumps(json_schema(), indent=1))
        return
    if config is None:
        typer.echo("error: give a CONFIG file, or --reference / --schema", err=True)
        raise typer.Exit(2)
    typer.echo(dump_config(call(lambda: load(config, set_))), nl=False)


TEMPLATES = ("credit", "images", "multilabel", "adapt")


@app.command()
def init(
    template: str = typer.Argument(..., metavar="credit|images|multilabel|adapt",
                                   help="Which starter config."),
    out: str = typer.Option(None, "--out", help="File to write (default TEMPLATE.yaml; - for "
                            "standard output). An existing file is never replaced."),
) -> None:
    """Write a commented starter config that runs as written on a built-in data set.

    Example: tltool init credit && tltool pretrain credit.yaml
    """
    from importlib.resources import files

    if template not in TEMPLATES:
        typer.echo(f"error: unknown template {template!r}; allowed: {', '.join(TEMPLATES)}",
                   err=True)
        raise typer.Exit(2)
    text = files("tltool").joinpath("templates", f"{template}.yaml").read_text()
    if out == "-":
        typer.echo(text, nl=False)
        return
    from pathlib import Path

    path = Path(out or f"{template}.yaml")
    try:
        with open(path, "x") as fh:  # exclusive: never replaces a file
            fh.write(text)
    except FileExistsError:
        typer.echo(f"error: {path}: exists; choose another --out (nothing was replaced)",
                   err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@app.command()
def datasets() -> None:
    """List the built-in data sets (tables and images) with their options.

    Example: tltool datasets
    """
    from tltool.datasets import TABLES
    from tltool.datasets.images import describe

    typer.echo("tables (kind: builtin, name: NAME):")
    for t in TABLES.values():
        typer.echo(f"  {t.name:<15} {t.rows:>6} rows  label={t.label} (positive: {t.positive})"
                   f"  {t.description}")
    typer.echo("images (kind: builtin, name: NAME, options: {...}):")
    for d in describe():
        kind = "multi-label" if d["multilabel"] else "single-label"
        typer.echo(f"  {d['name']:<15} {d['rows']}; {d['image']}; {kind}; classes: "
                   f"{d['classes']}\n  {'':<15} {d['description']}")
        for key, text in d["options"].items():
            typer.echo(f"  {'':<15} option {key}: {text}")



@app.command()
def backbones(
    inputs: int = typer.Option(20, min=1, help="Input width used to count tabular parameters."),
    name: str = typer.Option(None, "--name", help="Show only this backbone."),
) -> None:
    """List backbones with their ordered freezable blocks (the unit of frozen_layers),
    parameter counts, input size and pretrained weight names.

    Example: tltool backbones --name resnet18
    """
    from tltool import catalog

    known = catalog.load()  # static data: no torch import, answers in well under a second
    if name is not None and name.startswith("timm:"):
        _timm_backbone(name)
        return
    if name is not None and name not in known:
        from tltool.suggest import did_you_mean

        hint = did_you_mean(name, known, around=("", " "))
        typer.echo(f"error: --name: unknown backbone {name!r}; {hint}available: "
                   f"{', '.join(known)}", err=True)
        raise typer.Exit(2)
    for key, spec in known.items():
        if name is not None and key != name:
            continue
        tabular = spec["input"] == "tabular"
        blocks = [(b["name"], catalog.params(b, inputs)) for b in spec["blocks"]]
        total = sum(n for _, n in blocks)
        feats = catalog.params(spec["out_features"], inputs)
        extra = (f"{inputs} inputs" if tabular else
                 f"{spec['default_size']} px; weights: {', '.join(spec['weights']) or 'none'}")
        typer.echo(f"{key} ({spec['input']}; {extra}; {total:,} parameters, "
                   f"{feats} features): {spec['description']}")
        for i, (block, n) in enumerate(blocks):
            typer.echo(f"  {i + 1:>2}. {block:<12} {n:>12,} parameters")
    if name is None:
        typer.echo("timm:NAME (image; any model of the timm package, pip install timm): blocks "
                   "at its feature stages, its pretrained input size and normalisation; "
                   "weights: timm or a state-dict file. tltool backbones --name timm:NAME "
                   "shows its blocks")


def _timm_backbone(name: str) -> None:
    """`tltool backbones --name timm:NAME`: builds the model to list its blocks."""
    from tltool.errors import ConfigError
    from tltool.models.backbones import build_backbone, get_spec

    try:
        spec = get_spec(name)
        net = build_backbone(name, {}, 3)
    except ConfigError as exc:
        typer.echo(f"error: --name: {exc}", err=True)
        raise typer.Exit(2) from None
    total = sum(p.numel() for p in net.parameters())
    typer.echo(f"{name} (image; {spec.default_size} px; weights: timm; {total:,} parameters, "
               f"{net.out_features} features): {spec.description}")
    for i, (block, module) in enumerate(zip(net.block_names, net.blocks, strict=True)):
        n = sum(p.numel() for p in module.parameters())
        typer.echo(f"  {i + 1:>2}. {block:<12} {n:>12,} parameters")
