from tda_collector.intervals import merge, subtract


def test_merge_joins_touching_and_overlapping_and_drops_empty():
    assert merge([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]


def test_subtract_returns_the_uncovered_parts_in_order():
    assert subtract((0, 10), []) == [(0, 10)]
    assert subtract((0, 10), [(0, 10)]) == []
    assert subtract((0, 10), [(2, 4), (6, 8)]) == [(0, 2), (4, 6), (8, 10)]
    assert subtract((0, 10), [(-5, 3), (9, 20)]) == [(3, 9)]
    assert subtract((5, 10), [(0, 5), (10, 12)]) == [(5, 10)]


def test_extending_a_range_leaves_only_the_new_part():
    assert subtract((0, 20), [(0, 10)]) == [(10, 20)]
    assert subtract((-10, 10), [(0, 10)]) == [(-10, 0)]


def test_total_length_counts_overlaps_once():
    assert sum(end - start for start, end in merge([(0, 5), (3, 8), (10, 11)])) == 9
