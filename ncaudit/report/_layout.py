"""Tables that fit any width with every value whole: value columns stacked into blocks under repeated key columns,
long class names abbreviated beside their index, long labels folded onto more lines (never cut)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

#: The narrowest a key column that gives way (abbreviated or folded) becomes.
MIN_KEY_WIDTH = 8
#: An abbreviated column is cut down to this many cells when that saves a block of value columns.
SHORT_NAME = 16
Cell = str | Text


@dataclass(frozen=True)
class Column:
    """One column of a :class:`FittedTable`.

    Attributes
    ----------
    header : str
        The header; a line break stacks it on two lines (``"NC2\\nnorm μ"``).
    justify : str
        ``"left"`` or ``"right"``.
    fit : str
        How a key column gives way when the width is short: ``"keep"`` never (indices, numbers), ``"abbreviate"``
        cut with an ellipsis (class names: the index beside them says which class), ``"fold"`` wrapped onto more
        lines with every character kept (checkpoint labels). Value columns are always ``"keep"``.
    max_width : int or None
        An abbreviated column's widest, whatever the room (None: its longest cell).
    style : str or None
        Rich style of the column's cells.
    """

    header: str
    justify: str = "right"
    fit: str = "keep"
    max_width: int | None = None
    style: str | None = None


def _width(cell: Cell) -> int:
    text = cell.plain if isinstance(cell, Text) else cell
    return max((cell_len(line) for line in text.split("\n")), default=0)


def abbreviate(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells with a trailing ellipsis (unchanged when it fits)."""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, max(width - 1, 0)).rstrip() + "…"


class FittedTable:
    """A table that renders every cell whole at the width it is given.

    The key columns (an index, a name, a label) start every block; the value columns go into as few blocks as the
    width allows, in order, each block a table of its own under the same keys. Before a value column is moved to a
    further block, the key columns that may give way do so: names are abbreviated down to ``max_width`` (and, when
    even one value column does not fit beside them, to :data:`MIN_KEY_WIDTH`), labels are folded. A number is
    never shortened, and rich never has to truncate: every column is as wide as its widest cell.

    Parameters
    ----------
    keys, values
        The key columns and the value columns.
    rows
        ``(key cells, value cells)`` per row, as plain strings (shown as written, never read as markup) or Text.
    title
        Shown above the first block; further blocks are titled ``title (continued)``.
    padding
        Rich's cell padding: ``(0, 1)`` puts three cells between columns, ``(0, 0, 0, 1)`` two.
    """

    def __init__(self, keys: Sequence[Column], values: Sequence[Column],
                 rows: Sequence[tuple[Sequence[Cell], Sequence[Cell]]], *, title: str | None = None,
                 padding: tuple[int, ...] = (0, 1)) -> None:
        self.keys, self.values, self.rows = list(keys), list(values), list(rows)
        self.title, self.padding = title, padding
        left = padding[3] if len(padding) == 4 else padding[-1]
        right = padding[1] if len(padding) > 1 else padding[0]
        self._gap = 1 + left + right  # the divider and the padding between two columns

    def _natural(self, index: int, key: bool) -> int:
        column = (self.keys if key else self.values)[index]
        cells = [(k if key else v)[index] for k, v in self.rows]
        return max([_width(column.header), *(_width(c) for c in cells)])

    def _total(self, widths: Sequence[int]) -> int:
        return sum(widths) + self._gap * (len(widths) - 1) if widths else 0

    def layout(self, width: int) -> tuple[list[int], list[list[int]]]:
        """``(key column widths, value columns of each block)`` for a terminal ``width`` cells wide."""
        keys = [self._natural(i, True) for i in range(len(self.keys))]
        for i, column in enumerate(self.keys):
            if column.fit == "abbreviate" and column.max_width is not None:
                keys[i] = min(keys[i], max(column.max_width, _width(column.header)))
        values = [self._natural(i, False) for i in range(len(self.values))]
        widest = max(values, default=0)
        over = self._total([*keys, widest]) - width
        for i, column in enumerate(self.keys):  # the key columns that may give way do, as far as the width needs
            if over <= 0:
                break
            if column.fit != "keep":
                floor = max(MIN_KEY_WIDTH, _width(column.header))
                give = min(over, max(keys[i] - floor, 0))
                keys[i] -= give
                over -= give
        blocks = self._pack(keys, values, width)
        # An abbreviated column gives up to SHORT_NAME cells more when that saves a block.
        short = [i for i, column in enumerate(self.keys) if column.fit == "abbreviate" and keys[i] > SHORT_NAME]
        for i in short:
            for narrower in range(keys[i] - 1, SHORT_NAME - 1, -1):
                trial = keys[:i] + [narrower] + keys[i + 1:]
                fewer = self._pack(trial, values, width)
                if len(fewer) < len(blocks):
                    keys, blocks = trial, fewer
                    break
        return keys, blocks or [[]]

    def _pack(self, keys: list[int], values: list[int], width: int) -> list[list[int]]:
        """The value columns, in order, in as few blocks beside ``keys`` as ``width`` allows (one at least each)."""
        blocks: list[list[int]] = []
        for j, w in enumerate(values):
            if blocks and self._total([*keys, *(values[k] for k in blocks[-1]), w]) <= width:
                blocks[-1].append(j)
            else:
                blocks.append([j])
        return blocks

    def _table(self, keys: list[int], block: list[int], title: str | None) -> Table:
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=self.padding)
        for column, w in zip(self.keys, keys):
            fold = column.fit == "fold"
            table.add_column(column.header, justify=column.justify, style=column.style,  # type: ignore[arg-type]
                             no_wrap=not fold, overflow="fold" if fold else "ellipsis", min_width=w, max_width=w)
        for j in block:
            column = self.values[j]
            table.add_column(column.header, justify=column.justify, style=column.style,  # type: ignore[arg-type]
                             no_wrap=True)
        for key_cells, value_cells in self.rows:
            cells: list[Cell] = []
            for column, w, cell in zip(self.keys, keys, key_cells):
                if column.fit == "abbreviate":
                    cell = Text(abbreviate(cell.plain if isinstance(cell, Text) else cell, w),
                                style=cell.style if isinstance(cell, Text) else "")
                cells.append(cell if isinstance(cell, Text) else Text(cell))
            cells += [value_cells[j] if isinstance(value_cells[j], Text) else Text(value_cells[j]) for j in block]
            table.add_row(*cells)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        keys, blocks = self.layout(options.max_width)
        for i, block in enumerate(blocks):
            title = self.title if i == 0 or self.title is None else f"{self.title} (continued)"
            if i:
                yield Text("")
            yield self._table(keys, block, title)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        keys, blocks = self.layout(options.max_width)
        widths = [self._total([*keys, *(self._natural(j, False) for j in b)]) for b in blocks]
        return Measurement(min(widths), max(widths))


class Fitted:
    """A renderable built for the width it is rendered at: ``build(width)`` gives what to print."""

    def __init__(self, build: Callable[[int], RenderableType]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.build(options.max_width))

