"""The ``rocmforge`` command line (typer)."""
