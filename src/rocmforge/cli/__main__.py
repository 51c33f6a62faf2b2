"""``python -m rocmforge.cli``: the same as the ``rocmforge`` command."""

from rocmforge.cli.main import main

main()
