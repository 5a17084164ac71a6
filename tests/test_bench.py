"""The evaluation bench (``avl-bench``) on the bundled reader model and a tiny JSONL dataset
made here: the CSV, the table and the plot, and numbers checked against independent sources."""

import csv

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from avl_compile.bench import cli, evaluate, reader_task  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vqa")
    reader_task.write_jsonl_dataset(folder, reader_task.make_examples(3, seed=12345))
    return folder


def _dense_accuracy(folder) -> float:
    """Exact match of the uncompiled model, computed without the bench's loop."""
    model, processor = evaluate.load_model(reader_task.READER_MODEL_DIR, torch.float32, "cpu")
    records = evaluate.load_examples(folder, None)
    hits = 0
    for record in records:
        inputs = evaluate.prompt_inputs(processor, record, "cpu")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += text.strip().lower() == record["answers"][0].lower()
    return hits / len(records)


def test_bench_command_writes_the_csv_and_plot(dataset, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--data", str(dataset), "--policies", "full", "avl", "h2o", "avl-recall",
            "avl-pages", "avl-adaptive", "--budgets", "0.25",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ms/token" in printed

    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == evaluate.CSV_COLUMNS
    by_policy = {row["policy"]: row for row in rows}
    assert [(r["policy"], float(r["kv_budget"])) for r in rows] == [
        ("full", 1.0), ("avl", 0.25), ("h2o", 0.25), ("avl-recall", 0.25), ("avl-pages", 0.25),
        ("avl-adaptive", 0.25),
    ]  # fmt: skip
    full, avl, h2o = by_policy["full"], by_policy["avl"], by_policy["h2o"]
    # the full cache through the backend is the uncompiled model
    assert float(full["accuracy"]) == pytest.approx(_dense_accuracy(dataset))
    # resident KV: the full cache holds every prompt row of every layer
    config = reader_task.build_config()
    text = config.text_config
    row_bytes = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    prompt_rows = reader_task.NUM_IMAGE_TOKENS + 10  # image + a few text tokens at least
    assert float(full["kv_bytes_prefill"]) >= prompt_rows * row_bytes * text.num_hidden_layers
    for policy in (avl, h2o):
        assert float(policy["kv_bytes_prefill"]) < 0.5 * float(full["kv_bytes_prefill"])
        assert float(policy["attended_rows_per_step"]) < float(full["attended_rows_per_step"])
    assert float(full["ms_per_token"]) > 0
    # the full cache attends every row; the attended share of the others says how much less
    assert float(full["attended_share"]) == pytest.approx(1.0, abs=0.01)
    assert 0 < float(avl["attended_share"]) < 0.6
    # A-VL re-picks its core every third decode step (K = 3); the others never
    assert 0.2 < float(avl["refreshes_per_token"]) <= 1 / 3
    assert float(full["refreshes_per_token"]) == float(h2o["refreshes_per_token"]) == 0
    # recall keeps A-VL's evicted image rows in host memory; the device holds as much as avl's
    recall = by_policy["avl-recall"]
    assert float(recall["refreshes_per_token"]) == 1.0
    assert float(recall["kv_bytes_prefill"]) == float(avl["kv_bytes_prefill"])
    evicted_rows = reader_task.NUM_IMAGE_TOKENS - int(0.25 * reader_task.NUM_IMAGE_TOKENS)
    assert float(recall["kv_bytes_host"]) == evicted_rows * row_bytes * text.num_hidden_layers
    assert float(avl["kv_bytes_host"]) == float(full["kv_bytes_host"]) == 0
    # the query-aware core: as much on the device, recall every step, yet it attends only
    # sink + core + text (fewer rows than A-VL's, which attends every kept row at refreshes)
    pages = by_policy["avl-pages"]
    assert float(pages["kv_bytes_prefill"]) == float(avl["kv_bytes_prefill"])
    assert float(pages["refreshes_per_token"]) == 1.0
    assert float(pages["attended_rows_per_step"]) < float(avl["attended_rows_per_step"])
    # adaptive refresh: A-VL's cache and scheduled refreshes, and the ones its signal fired
    # (counted on the device, read after each generate), each attending the other image rows
    adaptive = by_policy["avl-adaptive"]
    assert float(adaptive["kv_bytes_prefill"]) == float(avl["kv_bytes_prefill"])
    refreshes = float(adaptive["refreshes_per_token"]), float(avl["refreshes_per_token"])
    attended = float(adaptive["attended_rows_per_step"]), float(avl["attended_rows_per_step"])
    assert (refreshes[0] > refreshes[1]) == (attended[0] > attended[1])
    assert refreshes[0] >= refreshes[1] and attended[0] >= attended[1]
    assert all(row["kv_bytes_end"].isdigit() for row in rows)  # bytes are whole
    assert "attended share" in printed and "median over the examples" in printed
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_bench_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="budget 1.5 is not a fraction"):
        evaluate.configurations(["avl"], [1.5])
    with pytest.raises(SystemExit):
        cli.parse_args(["--policies", "nope"])


def test_avl_refresh_period_reaches_the_avl_options_only(capsys):
    assert evaluate.policy_options("avl", 0.5, 1)["refresh_every"] == 1
    assert "refresh_every" not in evaluate.policy_options("avl", 0.5)  # the backend's default
    assert "refresh_every" not in evaluate.policy_options("h2o", 0.5, 1)
    assert cli.parse_args(["--avl-refresh-every", "-1"]).avl_refresh_every == -1
    with pytest.raises(SystemExit):
        cli.parse_args(["--avl-refresh-every", "0"])
    assert "refresh_every" in capsys.readouterr().err


def test_bench_needs_data_for_a_model_that_is_not_bundled(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "llava-hf/llava-1.5-7b-hf"])
    assert "--data is required with --model llava-hf/llava-1.5-7b-hf" in capsys.readouterr().err
    # a bundled model brings its task's held-out split
    args = cli.parse_args(["--model", "region-reader"])
    assert (args.model_path, args.task) == reader_task.BUNDLED_MODELS["region-reader"]
    records = evaluate.load_examples(None, 3, args.task)
    assert all(record["answers"][0][0].isdigit() for record in records)
    # ... also when named by its folder
    folder = str(reader_task.REGION_READER_MODEL_DIR)
    assert cli.parse_args(["--model", folder]).task == "count-read"
