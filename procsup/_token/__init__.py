"""Cancellation tokens that work across processes and survive a killed holder.

Owns: the futex calls (``futex``), the shared-memory arena of token nodes and its lock
(``arena``), ``CancellationToken`` itself (``token``), and watching many tokens from one thread
(``watch``).

May import: ``procsup._os``.

``_rebuild`` is named here because a pickled token names it as ``procsup._token._rebuild``: the
name it had when this package was one module, so a token pickled before the move still loads.
"""

from __future__ import annotations

from procsup._token.token import _rebuild

__all__ = ["_rebuild"]
