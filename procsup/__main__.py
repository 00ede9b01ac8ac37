"""``python -m procsup`` runs the demo; the demo's tasks live in ``procsup.demo.main``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from procsup.demo.main import main

    sys.exit(main(sys.argv[1:]))
