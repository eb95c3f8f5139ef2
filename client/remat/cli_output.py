"""How the `remat` commands print: rich tables on stdout in one style (plain text when
piped: no escape codes, no width limit, no trailing blanks) and `remat compare`'s
progress on stderr."""

from __future__ import annotations


def _stdout_console():
    """A rich Console on stdout for the `remat` commands' tables. On a terminal: its
    width, bold headers, colour. Piped: no escape codes, and no width limit, since rich
    would otherwise squeeze a wide table into 80 columns and scripts want one line per
    row. Markup is off: graph, node and file names are printed as they are."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            # `remat ops | head`: the reader left, which main() answers with exit 0
            # (rich's own handler exits 1).
            raise BrokenPipeError

    options = dict(markup=False, highlight=False, emoji=False)
    console = StdoutConsole(**options)
    return console if console.is_terminal else StdoutConsole(**options, width=100_000)


def new_table(*headers: str, figures=(), title: str | None = None, show_header: bool = True):
    """An empty rich Table for `print_table`: text columns left-aligned, the columns
    named in `figures` right-aligned so digits line up."""
    from rich.table import Table

    table = Table(title=title, show_header=show_header)
    for header in headers:
        table.add_column(header, justify="right" if header in figures else "left")
    return table


def print_table(table) -> None:
    """Print a rich Table on stdout in the commands' common style: a rule under a bold
    header, no borders, a row starting with its first cell, nothing cut short."""
    from rich import box
    from rich.measure import Measurement

    table.box, table.show_edge, table.pad_edge = box.SIMPLE_HEAD, False, False
    table.padding = (0, 1, 0, 0)  # with the box's blank divider, two spaces between columns
    table.header_style, table.title_style, table.title_justify = "bold", "bold", "left"
    console = _stdout_console()

    def width():  # unbounded: the table's own minimum and natural widths
        return Measurement.get(console, console.options.update_width(100_000), table)

    if width().maximum > console.width:
        _narrow(table)
        # A table that cannot fit even so runs past the edge (the terminal wraps it).
        console.width = max(console.width, width().minimum)
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:  # piped: rich pads every cell to its column's
        console.print(table)  # width; a file needs no trailing blanks
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _narrow(table) -> None:
    """Ready `table` for a terminal narrower than it. Left alone, rich shrinks the widest
    columns evenly and cuts words and figures short ("4.…"). Instead: figure columns
    keep their width and stack their header's words; text columns wrap between words,
    and only they shrink."""
    from rich.cells import cell_len

    for column in table.columns:
        cells = [cell for cell in column.cells if isinstance(cell, str)]
        if column.justify == "right":
            column.header = "\n".join(str(column.header).split())
            words = column.header.split() + cells
        else:
            words = " ".join([str(column.header), *cells]).split()
        column.min_width = max(map(cell_len, words), default=0)
        # A column already as narrow as it can be must not be picked to shrink.
        column.no_wrap = column.min_width >= max(
            map(cell_len, [*str(column.header).splitlines(), *cells]), default=0
        )


class Progress:
    """One step per policy result, on stderr. On an interactive terminal, a rich
    progress bar (with the elapsed time ticking while a slow policy runs) that clears
    itself when done; otherwise no live display, just one line per policy as it
    arrives, so logs of a long sweep still show headway."""

    def __init__(self, labels: list[str], console=None):
        from rich import progress
        from rich.console import Console

        self.labels, self.done = labels, 0
        self.console = console or Console(stderr=True, markup=False, highlight=False)
        self.bar = None
        if self.console.is_interactive and labels:
            self.bar = progress.Progress(
                progress.SpinnerColumn(),
                progress.BarColumn(),
                progress.MofNCompleteColumn(),
                progress.TimeElapsedColumn(),
                progress.TextColumn("{task.description}", markup=False),
                # stdout stays stdout (rich would send it through this stderr console).
                console=self.console,
                transient=True,
                redirect_stdout=False,
            )
            self.task = self.bar.add_task(self._running(), total=len(labels))
            self.bar.start()

    def _running(self) -> str:
        return f"running {self.labels[self.done]}" if self.done < len(self.labels) else "done"

    def advance(self, row) -> None:
        """Count `row` (a ComparisonRow) as done."""
        self.done += 1
        if self.bar is not None:
            # Drawn now, not at the next tick: each result shows as it arrives.
            self.bar.update(self.task, advance=1, description=self._running(), refresh=True)
            return
        status = (
            f"error {row.error_code}".rstrip()
            if row.error
            else f"peak {row.peak_ratio:.1%} of store_all, {row.total_seconds * 1e3:.2f} ms"
        )
        print(
            f"remat compare: [{self.done}/{len(self.labels)}] {row.policy}: {status}",
            file=self.console.file,
            flush=True,
        )

    def close(self) -> None:
        """Stop the display and clear it (the table follows on stdout)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
