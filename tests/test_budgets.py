"""The counting rules of shared/AVL_METHOD.md, checked on the paper's own examples."""

from avl_compile.policies.budgets import (
    fraction_count,
    is_refresh_step,
    split_text_budget,
    text_budget,
)


def test_counts_are_floors_like_the_authors_int_of_fraction_times_n():
    assert fraction_count(0.3, 64) == 19  # C = 30% of N = 64
    assert fraction_count(1 - 0.7, 64) == 19  # the authors' int((1 - 0.7) * N)
    assert fraction_count(1 - 0.5, 576) == 288
    assert fraction_count(0.5, 5) == 2


def test_refresh_steps_with_k_3_are_3_6_9():
    assert [t for t in range(1, 10) if is_refresh_step(t, 3)] == [3, 6, 9]
    assert all(is_refresh_step(t, -1) for t in range(1, 5))


def test_text_budget_has_a_floor_and_a_heavy_recent_split():
    assert text_budget(10, 0.6, 20) == 20
    assert text_budget(100, 0.6, 20) == 60
    assert split_text_budget(60, 0.7) == (42, 18)
    assert split_text_budget(21, 0.7) == (14, 7)
