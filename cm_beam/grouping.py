"""Splitting a GroupByKey's values by tag (pure Python; no Beam import).

Stages that join several inputs in one GroupByKey tag each value first, as
`(tag, value)`; the grouped values then arrive mixed, and the consumer splits them:

    states, ghosts = split_by_tag(items, "state", "ghost")
    state = single(states)
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple


def split_by_tag(items: Iterable[Tuple[str, Any]], *tags: str) -> Tuple[List[Any], ...]:
    """The values of `(tag, value)` pairs, one list per tag of `tags` (in that order,
    each in arrival order). A tag not in `tags` is a bug and raises ValueError."""
    lists = {tag: [] for tag in tags}
    for tag, value in items:
        try:
            lists[tag].append(value)
        except KeyError:
            raise ValueError(f"unexpected tag {tag!r}; expected one of {', '.join(tags)}") from None
    return tuple(lists[tag] for tag in tags)


def single(values: List[Any]) -> Optional[Any]:
    """The one value of a tag that has at most one per key (None if it has none)."""
    if len(values) > 1:
        raise AssertionError(f"internal: {len(values)} values where at most one is expected")
    return values[0] if values else None
