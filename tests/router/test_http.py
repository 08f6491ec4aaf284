"""The OpenAI-compatible HTTP API end to end: the official `openai` client against a live
pdserve (real worker processes, real Redis), bad requests, disconnects, and /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import openai
import pytest
from helpers import wait_for
from http_helpers import get, open_stream, post, scrape, send, value
from rpc_helpers import wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import ModelConfig, SamplingParams
from pdserve.router.http import HttpConfig
from pdserve.router.router import RouterConfig

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name two fruits."}]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve.json"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def cluster():
    # two requests per worker: two more wait in a queue of two (every request passes
    # through it, so two arriving at once both fit), a fifth is refused
    spec = ClusterSpec(model=MODEL, prefill=1, decode=1, num_blocks=256,
                       router=RouterConfig(disaggregation_threshold=4,
                                           max_in_flight_per_worker=2, max_queue=2))
    c = LocalCluster(spec, http=HttpConfig(port=0))
    yield c
    c.close()


@pytest.fixture(scope="module")
def url(cluster) -> str:
    return f"http://{cluster.http_address}"


@pytest.fixture(autouse=True)
def no_leaks(cluster):
    yield
    wait_cluster_idle(cluster)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def chat_text(smollm2_llm) -> str:
    return smollm2_llm.chat([CHAT], GREEDY)[0].text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("hint", ["always", "never"])
def test_openai_client_completions_equal_llm(url, smollm2_llm, stream, hint):
    want = smollm2_llm.generate(PROMPTS, GREEDY)
    for prompt, expected in zip(PROMPTS, want, strict=True):
        out = client(url).completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=stream,
            extra_body={"disaggregation": hint})
        if stream:
            text = "".join(chunk.choices[0].text for chunk in out if chunk.choices)
        else:
            text = out.choices[0].text
            assert out.usage.completion_tokens == len(expected.token_ids)
            assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
            assert out.model_extra["pdserve"]["disaggregated"] is (hint == "always")
        assert text == expected.text


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_chat_equals_llm(url, smollm2_llm, stream):
    out = client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                              temperature=0, stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    else:
        text = out.choices[0].message.content
        assert out.choices[0].message.role == "assistant"
    assert text == chat_text(smollm2_llm)


def test_async_openai_client_streams_and_waits(url, smollm2_llm):
    want_completion = smollm2_llm.generate(PROMPTS[:1], GREEDY)[0].text
    want_chat = chat_text(smollm2_llm)

    async def run():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        whole = await api.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16,
                                             temperature=0)
        parts = []
        async for chunk in await api.completions.create(
                model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True):
            parts.append(chunk.choices[0].text)
        # two at once: the workers' two slots each
        chat, streamed = await asyncio.gather(
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                        temperature=0),
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16,
                                        temperature=0, stream=True))
        chat_parts = [c.choices[0].delta.content or "" async for c in streamed if c.choices]
        await api.close()
        return whole.choices[0].text, "".join(parts), chat.choices[0].message.content, \
            "".join(chat_parts)

    assert asyncio.run(run()) == (want_completion, want_completion, want_chat, want_chat)


def test_stream_ends_with_usage_timings_and_done(cluster):
    conn, response = open_stream(cluster.http_address, "/v1/chat/completions", {
        "model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "disaggregation": "always"})
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    events = [line[len(b"data: "):] for line in response.read().splitlines() if line]
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] <= 8
    assert last["usage"]["total_tokens"] == (last["usage"]["prompt_tokens"]
                                             + last["usage"]["completion_tokens"])
    ext = last["pdserve"]
    assert ext["disaggregated"] and ext["prefill_worker"] == "prefill-0"
    assert ext["timing"]["prefill_compute_ms"] > 0 and ext["timing"]["first_token_ms"] > 0
    assert ext["kv_transfer_bytes"] > 0
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


BAD = [
    ("/v1/completions", {"prompt": "Hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["a", ""]}, 400, "stop[1]"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt[2]"),
    ("/v1/completions", {"prompt": ["one", "two"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "Hi", "slo": {"ttft_ms": -1}}, 400, "slo.ttft_ms"),
    ("/v1/completions", {"prompt": "Hi", "disaggregation": "sometimes"}, 400,
     "disaggregation"),
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True,
                              "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD,
                         ids=[f"{p.rsplit('/', 1)[1]}-{param}" for p, _, _, param in BAD])
def test_bad_requests_get_the_openai_error_naming_the_field(url, path, body, status, param):
    got, reply = post(url, path, body)
    assert got == status, reply
    error = reply["error"]
    assert error["param"] == param and error["type"] and error["code"], error
    if status == 400:
        assert error["message"].startswith(f"{param}:"), error


def test_asking_for_nothing_unsupported_is_served(url):
    status, reply = post(url, "/v1/completions", {
        "model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 1, "logprobs": None,
        "presence_penalty": 0, "user": "someone", "top_k": -1})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2, reply


def _long(hint: str = "always") -> dict:
    return {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000,
            "ignore_eos": True, "stream": True, "disaggregation": hint}


def _read_until_text(response) -> None:
    while True:
        line = response.readline()
        assert line, "the stream ended before any text"
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            return


def _drop(conn) -> None:
    """Go away as a client that crashed would: the socket closes under the stream."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_disconnect_mid_stream_aborts_on_both_workers(cluster, url):
    before = scrape(url)
    conn, response = open_stream(cluster.http_address, "/v1/completions", _long())
    assert response.status == 200
    _read_until_text(response)
    _drop(conn)
    # 2,000 tokens take a minute: idle within wait_cluster_idle's bound means aborted
    wait_cluster_idle(cluster)
    wait_for(lambda: value(scrape(url), "pdserve:request_failure_total", outcome="cancelled",
                           code="CANCELLED")
             == value(before, "pdserve:request_failure_total", outcome="cancelled",
                      code="CANCELLED") + 1, 10, "the cancelled request in /metrics")


def test_overload_is_429_and_a_queued_client_that_leaves_is_dropped(cluster, url):
    streams = []
    try:
        for _ in range(2):  # the decode worker's two slots
            conn, response = open_stream(cluster.http_address, "/v1/completions", _long())
            _read_until_text(response)
            streams.append(conn)
        for _ in range(2):  # no answer before a slot frees: they wait in the queue
            streams.append(send(cluster.http_address, "/v1/completions", _long()))
        wait_for(lambda: value(scrape(url), "pdserve:num_requests_waiting") == 2, 30,
                 "two requests in the router queue")
        assert value(scrape(url), "pdserve:num_requests_running") == 2
        status, reply = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error", reply
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    finally:
        for conn in streams:
            _drop(conn)
    wait_cluster_idle(cluster)
    wait_for(lambda: value(scrape(url), "pdserve:num_requests_waiting") == 0, 10,
             "the queued request gone")


def test_metrics_move_as_requests_run(url, smollm2_dir):
    before = scrape(url)
    bodies = [{"prompt": PROMPTS[0], "disaggregation": "always",
               "slo": {"ttft_ms": 600_000}},
              {"prompt": PROMPTS[1], "disaggregation": "always", "ignore_eos": True,
               "slo": {"tpot_ms": 1e-6}},
              {"prompt": PROMPTS[0], "disaggregation": "never"}]
    replies = []
    for body in bodies:
        status, reply = post(url, "/v1/completions", {"model": MODEL, "max_tokens": 8,
                                                      "temperature": 0, **body})
        assert status == 200, reply
        replies.append(reply)
    after = scrape(url)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prefill_time_seconds",
                      "request_time_per_output_token_seconds"):
        assert delta(f"pdserve:{histogram}_count") == 3, histogram
    assert delta("pdserve:kv_transfer_time_seconds_count") == 2
    assert delta("pdserve:inter_token_latency_seconds_count") == sum(
        r["usage"]["completion_tokens"] - 1 for r in replies)
    assert delta("pdserve:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"]
                                                       for r in replies)
    assert delta("pdserve:generation_tokens_total") == sum(r["usage"]["completion_tokens"]
                                                           for r in replies)
    assert delta("pdserve:request_success_total", finished_reason="length") \
        + delta("pdserve:request_success_total", finished_reason="stop") == 3
    assert delta("pdserve:requests_prefill_total", mode="disaggregated") == 2
    assert delta("pdserve:requests_prefill_total", mode="local") == 1
    # what the decode worker reported receiving: every layer's K and V of every prompt token
    reported = [r["pdserve"]["kv_transfer_bytes"] for r in replies]
    per_token = ModelConfig.from_pretrained(smollm2_dir).kv_bytes_per_token(4)
    assert reported == [r["usage"]["prompt_tokens"] * per_token for r in replies[:2]] + [0]
    assert delta("pdserve:kv_transfer_bytes_total") == sum(reported)
    assert delta("pdserve:slo_requests_total") == 2
    assert (delta("pdserve:slo_met_total", slo="ttft"), delta("pdserve:slo_met_total", slo="tpot"),
            delta("pdserve:slo_met_total", slo="all")) == (1, 0, 1)
    for worker, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        assert value(after, "pdserve:worker_kv_blocks_free", worker=worker, role=role) > 0
        assert ("pdserve:worker_prefix_cache_hit_rate",
                (("role", role), ("worker", worker))) in after
    assert value(after, "pdserve:num_workers", role="decode") == 1


def test_dashboard_panels_chart_metrics_that_exist(url):
    dashboard = json.loads(DASHBOARD.read_text())
    served = {name for name, _ in scrape(url)}
    charted = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"pdserve:[A-Za-z0-9_:]+", target["expr"])}
    assert len(charted) >= 15
    assert not charted - served, f"charted but not served: {sorted(charted - served)}"


def test_models_health_and_version(url):
    status, body = get(url, "/v1/models")
    models = json.loads(body)
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
    assert client(url).models.list().data[0].id == MODEL
    assert get(url, "/health")[0] == 200
    status, body = get(url, "/version")
    assert status == 200 and json.loads(body)["version"]
