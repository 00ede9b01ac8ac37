"""``python -m procsup`` runs the demo; the demo's tasks live in ``procsup._demo``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from procsup._demo import main

    sys.exit(main(sys.argv[1:]))
