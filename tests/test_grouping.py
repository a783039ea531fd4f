"""split_by_tag: the grouped values of a tagged join, one list per tag."""

import pytest

from cm_beam.grouping import single, split_by_tag


def test_split_by_tag_keeps_arrival_order_per_tag():
    items = [("state", 1), ("edges", "a"), ("edges", "b"), ("absorb", None)]
    assert split_by_tag(items, "state", "absorb", "edges", "rename") == ([1], [None], ["a", "b"], [])
    assert split_by_tag([], "state") == ([],)


def test_an_unexpected_tag_is_a_bug():
    with pytest.raises(ValueError, match="unexpected tag 'ghost'"):
        split_by_tag([("ghost", 1)], "state", "edges")


def test_single():
    assert single([]) is None and single([7]) == 7
    with pytest.raises(AssertionError):
        single([1, 2])
