"""``avl-diff`` and ``avl_compile.diff``: the report of what each graph became, and why."""

import pytest

from avl_compile import diff
from avl_compile.tiny_models import llava_prompt, tiny_llava


def test_report_lists_rewritten_sites_with_their_policy_and_the_code_diff():
    model = tiny_llava()
    prompt = llava_prompt(model, [[1, 5, 6]], [[7, 8, 9]])
    report = diff.diff_model(model, prompt.inputs, {"vision_keep": 0.4, "vision_compute": 0.2})
    decoder_graphs = [g for g in report.graphs if any(s.rewritten for s in g.sites)]
    assert decoder_graphs, "no graph was rewritten"
    first = decoder_graphs[0]
    layers = model.config.text_config.num_hidden_layers
    rewritten = [s for s in first.sites if s.rewritten]
    assert sorted(s.layer_idx for s in rewritten) == list(range(layers))
    assert all(s.detail == "policy=avl S=0.4 C=0.2 K=3 T=0.6" for s in rewritten)
    for site in first.sites:
        if not site.rewritten:  # e.g. the vision tower's attention in transformers 5.17
            assert site.detail, "a site left dense must say why"
    removed = [line for line in first.diff.splitlines() if line.startswith("-")]
    added = [line for line in first.diff.splitlines() if line.startswith("+")]
    assert any("scaled_dot_product_attention" in line for line in removed)
    assert any("attention_site" in line for line in added)
    text = report.render()
    assert "rewritten model.language_model.layers.0.self_attn" in text
    # the model runs uncompiled again afterwards
    assert not hasattr(model.forward, "_torchdynamo_orig_callable")


def test_command_prints_and_writes_the_graphs(tmp_path, capsys):
    out = tmp_path / "graphs"
    argv = ["--model", "tiny-llava", "--option", "policy=h2o", "--option", "kv_budget=0.3",
            "--out", str(out), "--no-code"]  # fmt: skip
    assert diff.main(argv) == 0
    printed = capsys.readouterr().out
    assert "policy=h2o kv_budget=0.3" in printed
    assert "@@" not in printed  # --no-code
    # every graph says what it runs; one without attention says so, not "0 of 0"
    headings = [line for line in printed.splitlines() if line.startswith("== graph")]
    assert headings and all("it runs " in line for line in headings)
    assert "0 of 0" not in printed
    assert any("rewritten" in line and "language_model.layers" in line for line in headings)
    written = {p.name for p in out.iterdir()}
    assert "report.txt" in written and "graph_0_before.py" in written
    diffs = [p for p in out.glob("graph_*.diff") if p.read_text()]
    assert diffs and "attention_site" in diffs[0].read_text()


def test_bad_option_names_the_option():
    with pytest.raises(ValueError, match="kv_budget"):
        diff.main(["--option", "kv_budget=3"])
