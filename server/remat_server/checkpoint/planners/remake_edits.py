"""The edits a remake move makes to a step list (`remake`): a value freed across the
peak, its inputs kept live longer, and the values made from those inputs freed with it
or made at their readers.

    >>> edit = Edit()  # filled by a move, applied by tighten.edited
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..problem import Problem
from ..schedule import Compute, Free, Step
from .tighten import Events


@dataclass
class Edit:
    """A move's changes to a step list: indices dropped, steps inserted before and
    after indices (see `tighten.edited`)."""

    drop: set[int] = field(default_factory=set)
    before: dict[int, list[Step]] = field(default_factory=dict)
    after: dict[int, list[Step]] = field(default_factory=dict)


class MoveEdits:
    """What `remake._Repair` needs to edit a step list: its problem, the values a move
    may free or remake (`movable`) and the graph inputs (always live)."""

    problem: Problem
    movable: set[str]
    inputs: set[str]

    @staticmethod
    def freed_across(found: Events, made: int, peak: int, name: str, edit: Edit) -> None:
        """Add to `edit` freeing `name` (made at step `made`) after its last reader before
        `peak`, or not making it there when nothing read it since."""
        earlier = bisect.bisect_left(found.read, peak)
        last_read = found.read[earlier - 1] if earlier else -1
        if last_read > made:
            edit.after.setdefault(last_read, []).append(Free(name))
        else:  # not read since it was made: made later instead, for nothing
            edit.drop.add(made)

    def held(
        self, events: dict[str, Events], source: str, until: int, last: int, edit: Edit
    ) -> bool:
        """Add to `edit` keeping `source`, live at some step before `until`, live until
        step `last` (>= until) instead of freeing it; False when it is made again
        before then."""
        kept = events[source]
        source_made = kept.last_computed_before(until)
        if source_made is None:
            return False
        freed = kept.freed[bisect.bisect_right(kept.freed, source_made)]
        remade_at = kept.computed[bisect.bisect_right(kept.computed, freed) :]
        if remade_at and remade_at[0] <= last:
            return False  # it is made again before then: a longer life would clash
        edit.drop.add(freed)
        edit.after.setdefault(last, []).append(Free(source))
        return True

    def kept_longer(
        self,
        steps: list[Step],
        events: dict[str, Events],
        source: str,
        reader: str,
        until: int,
        edit: Edit,
    ) -> bool:
        """Add to `edit` keeping `source` live until step `until` (and its derived
        readers); False when it is made again before then."""
        kept = events[source]
        source_made = kept.last_computed_before(until)
        if source_made is None:
            return False
        freed = kept.freed[bisect.bisect_right(kept.freed, source_made)]
        last = max(until, self.derived_readers(steps, events, source, reader, source_made, freed))
        return self.held(events, source, until, last, edit)

    def siblings(
        self,
        steps: list[Step],
        events: dict[str, Events],
        source: str,
        remade: str,
        peak: int,
        until: int,
        edit: Edit,
    ) -> list[str]:
        """The values made from `source` (besides `remade`) that are live across `peak`
        and first read after `until`, where their other inputs are live: added to `edit`
        freed across the peak, for `remade`'s move to make them again at `until`."""
        kept = events[source]
        source_made = kept.last_computed_before(until)
        freed = kept.freed[bisect.bisect_right(kept.freed, source_made)]
        graph, found = self.problem.graph, []
        for index, name in self.made_from(steps, source, remade, source_made, freed):
            inputs = graph[name].inputs
            sibling = events[name]
            if sibling.last_computed_before(peak) != index:
                continue
            next_read = sibling.first_read_after(peak)
            if (
                next_read is None
                or next_read <= until
                or not sibling.live_at(peak)
                or any(peak < i < next_read for i in (*sibling.computed, *sibling.freed))
                or not all(
                    s == source or s in self.inputs or events[s].live_at(until) for s in inputs
                )
            ):
                continue
            self.freed_across(sibling, index, peak, name, edit)
            found.append(name)
        return found

    def made_from(self, steps: list[Step], source: str, remade: str, made: int, freed: int):
        """(step index, value) for each movable value besides `remade` computed from
        `source` between steps `made` and `freed`."""
        graph = self.problem.graph
        for index in range(made + 1, freed):
            step = steps[index]
            name = step.node
            if (
                type(step) is Compute
                and name != remade
                and name in self.movable
                and source in graph[name].inputs
            ):
                yield index, name

    def derived_readers(
        self,
        steps: list[Step],
        events: dict[str, Events],
        source: str,
        remade: str,
        made: int,
        freed: int,
    ) -> int:
        """The last first-reader of the values made from `source` (besides `remade`)
        between its making and freeing whose other inputs are live there: kept that
        long, `source` lets the deferral pass make them there (a ReLU's mask made
        from the kept pre-activation in the backward pass, not kept itself)."""
        graph, latest = self.problem.graph, -1
        for index, name in self.made_from(steps, source, remade, made, freed):
            inputs = graph[name].inputs
            reader = events[name].first_read_after(index)
            if reader is not None and all(
                s == source or s in self.inputs or events[s].live_at(reader) for s in inputs
            ):
                latest = max(latest, reader)
        return latest
