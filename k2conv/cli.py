"""The `k2conv` command line: one click group, one thin command per pipeline step.

Commands only parse options and call into the stage packages; every bad input surfaces as a
K2ConvError, printed as one line with exit status 2 (nothing else is written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from k2conv import __version__
from k2conv.errors import K2ConvError


class _Group(click.Group):
    """Turn K2ConvError into `error: <message>` + exit 2, without a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except K2ConvError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="k2conv")
def main() -> None:
    """Convert Kimi K2-family checkpoints into llama.cpp GGUF files, exactly and in one pass.

    \b
    Example (the whole pipeline on a tiny synthetic checkpoint):
      k2conv demo
    """


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--variant", type=click.Choice(["k2.5", "k2-thinking", "k2-instruct"]), default="k2.5",
              show_default=True, help="Which real checkpoint's on-disk format to imitate.")
@click.option("--preset", type=click.Choice(["tiny", "slice"]), default="tiny", show_default=True,
              help="tiny: seconds, <50 MB. slice: true K2.5 per-layer dimensions, few layers/experts.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the weights.")
@click.option("--force", is_flag=True, help="Overwrite OUT_DIR if it exists.")
def synth(out_dir: Path, variant: str, preset: str, seed: int, force: bool) -> None:
    """Write a synthetic checkpoint in the exact on-disk format of a Kimi variant.

    \b
    Example:
      k2conv synth /tmp/k25-tiny --variant k2.5 --preset tiny
    """
    from k2conv.convert.synth import write_checkpoint

    path = write_checkpoint(out_dir, variant=variant, preset=preset, seed=seed, force=force)
    click.echo(f"wrote {variant} {preset} checkpoint to {path}")


if __name__ == "__main__":
    main()
