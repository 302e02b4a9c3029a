"""``fedlearn sweep CONFIG.toml``: a grid of simulations and a comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlearn.cli.common import OutOpt, console
from fedlearn.errors import FedlearnError


def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep file (TOML): \\[grid] lists, fixed "
                                           "\\[sim] and \\[train] settings, \\[sweep] "
                                           "placement.",
                                           show_default=False)],
    out: OutOpt = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="local (points one after another here) or ray (one Ray task per "
        "point). [default: the file's, else local]")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to join (auto or HOST:6379). [default: the "
        "file's, else start Ray here]")] = None,
) -> None:
    """Run a grid of simulations (one run directory per point) and compare them."""
    from fedlearn.runs import default_run_dir
    from fedlearn.sweep import load_sweep, make_points, run_sweep
    from fedlearn.sweep_compare import comparison_table, failed

    settings = load_sweep(config, backend=backend, ray_address=ray_address)
    if settings.backend == "ray":
        from fedlearn.sim.ray_backend import require_ray

        require_ray()
    points = make_points(settings, where=str(config))
    folder = out or (Path(settings.out) if settings.out else default_run_dir("sweep"))
    where = "on Ray" if settings.backend == "ray" else "one after another"
    console.print(f"fedlearn sweep: {len(points)} points ({' x '.join(settings.grid) or 'one'})"
                  f" {where} -> {folder}", markup=False, highlight=False)
    rows = run_sweep(settings, points, folder,
                     log=lambda line: console.print(line, markup=False, highlight=False))
    console.print(comparison_table(rows, list(settings.grid)), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"wrote {folder / 'comparison.csv'}, comparison.md and comparison.png",
                  markup=False, highlight=False)
    bad = failed(rows)
    if bad:
        raise FedlearnError(f"{len(bad)} of {len(rows)} points did not finish "
                               f"({', '.join(bad)}); each one's error.txt says why.")
