"""The demo's terminal view: a rich ``Live`` table redrawn in place, events printed above it.

The only module that imports rich, the optional ``demo`` extra. ``procsup.demo.output.make_view``
imports it when the output is a terminal; importing it is what fails (ImportError) when rich is
not installed, and the demo falls back to the plain view.
"""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from procsup.demo.rows import Row, mib
from procsup.demo.view import View

__all__ = ["RichView"]

_STYLE = {
    "started": "green",
    "subtask": "green",
    "stopping": "yellow",
    "cancelled": "bold yellow",
    "interrupt": "bold yellow",
    "finished": "green",
    "crashed": "bold red",
    "failed": "bold red",
    "panicked": "bold red",
    "stopped": "red",
    "lost": "bold red",
    "restarted": "yellow",
    "escalated": "bold red",
    "exit": "bold",
}
_TITLES = {"crashed": "crash record", "escalated": "escalation"}
_TITLE = "procsup: critical tasks (live)"
_STATE_STYLE = {
    "running": "green",
    "cancelling": "yellow",
    "done": "dim green",
    "crashed": "bold red",
    "failed": "bold red",
    "panicked": "bold red",
    "stopped": "red",
    "restarting": "yellow",
    "escalated": "bold red",
}


class RichView(View):
    """Live status table on a terminal; events scroll above it, the summary replaces it."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._console = Console(file=stream, highlight=False)
        self._live = Live(
            Text("starting…"),
            console=self._console,
            refresh_per_second=8,
            transient=True,  # the final summary table takes its place
        )
        self._live.start()

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Print a styled, timestamped line above the live table; a record as a panel."""
        style = _STYLE.get(kind, "")
        line = Text.assemble(
            (f"{self.now():6.2f}s ", "dim"), (f"{kind:<10} ", style or "bold"), text
        )
        self._console.print(line)
        record = fields.get("record")
        if record:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for key, value in record.items():
                grid.add_row(key, escape(str(value).rstrip()))
            title = _TITLES.get(kind, f"{kind} record")
            self._console.print(Panel(grid, title=title, border_style=style or "red"))

    def status(self, rows: list[Row]) -> None:
        """Redraw the live table (every call: rich rate-limits the terminal writes)."""
        self._live.update(self._table(rows, _TITLE))

    def refresh(self, rows: list[Row]) -> None:
        """Redraw the live table now, not at the next tick: events come faster than ticks."""
        self._live.update(self._table(rows, _TITLE), refresh=True)

    def _table(self, rows: list[Row], title: str, final: bool = False) -> Table:
        now = self.now()
        table = Table(title=title, title_justify="left", expand=False)
        for name, justify in (
            ("task", "left"),
            ("pid", "right"),
            ("state", "left"),
            ("restarts", "right"),
            ("uptime", "right"),
            ("RSS", "right"),
            ("peak RSS", "right"),
            ("CPU time" if final else "CPU", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        if final:
            table.add_column("result", overflow="fold", max_width=60)
        for row in rows:
            cpu = f"{row.cpu_time:.2f}s" if final else f"{row.cpu_percent:.0f}%"
            state = Text(row.state, style=_STATE_STYLE.get(row.state, ""))
            cells: list[Any] = [
                row.description,
                str(row.pid),
                state,
                str(row.restarts),
                f"{row.uptime(now):.1f}s",
                mib(row.rss),
                mib(row.peak_rss),
                cpu,
            ]
            table.add_row(*cells, *([escape(row.detail)] if final else []))
            if not final:
                for pid, name, rss in row.subtasks:
                    sub = [f"  └ {name}", str(pid), "", "", "", mib(rss), "", ""]
                    table.add_row(*sub, style="dim")
        return table

    def summary(self, rows: list[Row]) -> None:
        """Stop the live table and print the final one in its place."""
        self.close()
        self._console.print(Group(Text(""), self._table(rows, "summary", final=True)))

    def close(self) -> None:
        """Stop the live display, restoring the cursor (idempotent)."""
        if self._live.is_started:
            self._live.stop()
