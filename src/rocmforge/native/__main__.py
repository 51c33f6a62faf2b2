"""``python -m rocmforge.native``: compile the native CPU kernels now (``make setup`` runs it)."""

from __future__ import annotations

import logging
import sys

from rocmforge.native import build, ops


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build(verbose="-v" in sys.argv)
    except RuntimeError as exc:
        logging.getLogger("rocmforge.native").error("%s", exc)
        return 1
    native = ops()
    isas = ", ".join(native.isa_name(i) for i in native.available_isas()) if native else "none"
    logging.getLogger("rocmforge.native").info("native CPU kernels: %s (instruction sets: %s)", path.parent, isas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
