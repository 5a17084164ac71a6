import pytest

from avl_compile.options import AvlOptions, uses_cudagraphs


def test_defaults_match_the_paper_settings():
    opts = AvlOptions.from_mapping({})
    assert (opts.vision_keep, opts.vision_compute, opts.refresh_every, opts.text_keep) == (
        0.5,
        0.3,
        3,
        0.6,
    )
    assert opts.text_heavy_share == 0.7 and opts.text_min_budget == 20
    assert opts.prefill_filter_keep is None and opts.prefill_filter_layer == 2
    assert opts.policy == "avl" and opts.inner == "inductor"


@pytest.mark.parametrize(
    "options, names",
    [
        ({"vision_keep": 0.0}, ["vision_keep", "0.0", "(0, 1]"]),
        ({"vision_keep": 1.5}, ["vision_keep", "1.5", "(0, 1]"]),
        ({"vision_compute": 0.6}, ["vision_compute", "0.6", "vision_keep=0.5"]),
        ({"text_keep": -0.1}, ["text_keep", "-0.1"]),
        ({"text_heavy_share": 2}, ["text_heavy_share", "[0, 1]"]),
        ({"refresh_every": 0}, ["refresh_every", "-1"]),
        ({"refresh_every": 2.5}, ["refresh_every", "2.5"]),
        ({"text_min_budget": -1}, ["text_min_budget", ">= 0"]),
        ({"prefill_filter_keep": 0.4}, ["vision_keep", "prefill_filter_keep=0.4", "S <= P"]),
        ({"prefill_filter_layer": 0, "prefill_filter_keep": 0.6}, ["prefill_filter_layer"]),
        ({"policy": "magic"}, ["policy", "'magic'", "avl"]),
        ({"inner": "tvm"}, ["inner", "'tvm'", "inductor"]),
        ({"vision_keeps": 0.5}, ["unknown option", "vision_keeps", "vision_keep"]),
    ],
)
def test_bad_options_name_the_option_value_and_allowed_range(options, names):
    with pytest.raises(ValueError) as error:
        AvlOptions.from_mapping(options)
    for name in names:
        assert name in str(error.value)


def test_bool_is_not_a_number():
    with pytest.raises(ValueError, match="refresh_every"):
        AvlOptions.from_mapping({"refresh_every": True})


def test_full_budgets_are_recognised():
    assert AvlOptions.from_mapping(
        {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
    ).keeps_everything
    assert not AvlOptions.from_mapping({}).keeps_everything


def test_cudagraphs_option_is_checked_and_only_acts_on_cuda_with_inductor():
    with pytest.raises(ValueError, match="cudagraphs='yes'.*True, False or None"):
        AvlOptions.from_mapping({"cudagraphs": "yes"})
    assert uses_cudagraphs(AvlOptions(), "cuda")
    assert not uses_cudagraphs(AvlOptions(cudagraphs=False), "cuda")
    assert not uses_cudagraphs(AvlOptions(inner="aot_eager"), "cuda")
    assert not uses_cudagraphs(AvlOptions(cudagraphs=True), "cpu")  # accepted, no effect
