"""The ``fedlearn`` command line (typer). Nothing in the package imports this layer."""
