"""``python -m procsup`` runs the demo (``procsup.demo.main``); no task functions here."""

from __future__ import annotations

import sys

from procsup.demo.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
