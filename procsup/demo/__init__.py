"""``python -m procsup``: the demo a newcomer runs first. It uses the public API only.

May import: ``procsup`` (the public names) and, optionally, rich. Nothing private.
"""
