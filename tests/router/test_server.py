"""The gRPC API end to end: real worker processes, real Redis, the router's server."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import wait_for
from rpc_helpers import Recorded, collect, greedy_request, stub_for, wait_cluster_idle

from pdserve.deploy.local_cluster import LocalCluster
from pdserve.deploy.spec import ClusterSpec
from pdserve.engine import ModelConfig, SamplingParams
from pdserve.router.observe import RequestOutcome
from pdserve.router.router import RouterConfig
from pdserve.rpc import pdserve_pb2 as pb
from pdserve.rpc.client import PdServeClient

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):"]


class RecordingCluster(LocalCluster):
    """The router's handles note every call in `calls`."""

    calls: list = []

    def connect(self, record):
        return Recorded(super().connect(record), self.calls)


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec(prefill=1, decode=1, colocated=1, num_blocks=256,
                       router=RouterConfig(disaggregation_threshold=4, max_in_flight_per_worker=4,
                                           max_queue=4))
    c = RecordingCluster(spec)
    yield c
    c.close()


def calls_for(cluster, request_id: str) -> list[tuple[str, str]]:
    """(worker, method) of every handle call the router made for a request."""
    return [(worker, method) for worker, method, tid in cluster.calls
            if tid.startswith(f"{request_id}/")]


@pytest.fixture(scope="module")
def stub(cluster):
    return stub_for(cluster.address)


@pytest.fixture(autouse=True)
def no_leaks(cluster):
    yield
    wait_cluster_idle(cluster)


@pytest.mark.parametrize("hint", ["ALWAYS", "NEVER"])
def test_streamed_text_equals_llm(stub, smollm2_llm, hint):
    params = SamplingParams(max_tokens=16, temperature=0.0)
    expected = smollm2_llm.generate(PROMPTS, params)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        req = greedy_request(prompt, disaggregation=pb.Disaggregation.Value(
            f"DISAGGREGATION_{hint}"))
        text, ids, final = collect(stub, req)
        assert ids == want.token_ids
        assert text == want.text
        assert final.disaggregated is (hint == "ALWAYS")
        assert final.usage.completion_tokens == len(ids)
        assert final.usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_messages_and_stop_strings(stub, smollm2_llm):
    conv = [{"role": "user", "content": "Name two fruits."}]
    want = smollm2_llm.chat([conv], SamplingParams(max_tokens=24, temperature=0.0))[0]
    req = greedy_request(max_tokens=24)
    req.messages.extend(pb.ChatMessage(**m) for m in conv)
    text, _, final = collect(stub, req)
    assert text == want.text
    stop = want.text[5:9]
    want_cut = smollm2_llm.chat([conv], SamplingParams(max_tokens=24, temperature=0.0,
                                                       stop=[stop]))[0]
    req.sampling.stop.append(stop)
    text, _, final = collect(stub, req)
    assert text == want_cut.text and stop not in text
    assert final.finish_reason == pb.FINISH_REASON_STOP


def test_a_second_chat_turn_moves_only_the_kv_the_decode_worker_lacks(stub, smollm2_llm,
                                                                      smollm2_dir):
    """The second turn's prompt starts with the first's and its answer, which the decode
    worker computed: the router passes on what its prefix cache holds, so the transfer
    carries whole blocks fewer, and the answer is still LLM's."""
    conv = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is a prime number?"}]

    def ask(messages):
        req = greedy_request(max_tokens=24, disaggregation=pb.DISAGGREGATION_ALWAYS)
        req.messages.extend(pb.ChatMessage(**m) for m in messages)
        return collect(stub, req)

    first, _, final1 = ask(conv)
    conv2 = conv + [{"role": "assistant", "content": first},
                    {"role": "user", "content": "Give one example."}]
    second, _, final2 = ask(conv2)
    want = smollm2_llm.chat([conv, conv2], SamplingParams(max_tokens=24, temperature=0.0))
    assert [first, second] == [w.text for w in want]
    per_block = 16 * ModelConfig.from_pretrained(smollm2_dir).kv_bytes_per_token(4)
    saved = final2.usage.prompt_tokens * per_block // 16 - final2.kv_transfer_bytes
    assert saved % per_block == 0 and final1.kv_transfer_bytes > 0
    assert saved >= final1.usage.prompt_tokens // 16 * per_block  # the first prompt, at least


def test_the_request_path_makes_no_wasted_call(cluster, stub, smollm2_llm):
    """A finished request aborts nothing; one that a stop string ends aborts only its
    decode job (the prefill job ended at the hand-off); each side is called once."""
    prompt = PROMPTS[0]
    req = greedy_request(prompt, 16, request_id="whole",
                         disaggregation=pb.DISAGGREGATION_ALWAYS)
    text, _, final = collect(stub, req)
    assert calls_for(cluster, "whole") == [("decode-0", "reserve"), ("prefill-0", "submit")]
    assert final.timing.prefill_compute_ms > 0 and final.timing.kv_received > 0
    stop = text[len(text) // 3:len(text) // 3 + 3]
    req = greedy_request(prompt, 16, request_id="stopped",
                         disaggregation=pb.DISAGGREGATION_ALWAYS)
    req.sampling.stop.append(stop)
    cut, _, final = collect(stub, req)
    assert final.finish_reason == pb.FINISH_REASON_STOP and stop not in cut
    assert calls_for(cluster, "stopped") == [("decode-0", "reserve"), ("prefill-0", "submit"),
                                             ("decode-0", "abort")]
    # the timing up to the first token still came with the decode worker's first chunk
    assert final.timing.prefill_compute_ms > 0 and final.timing.decode_admitted > 0
    assert final.usage.cached_prompt_tokens >= 0


def test_timing_breakdown_is_present_and_ordered(stub):
    _, _, final = collect(stub, greedy_request(PROMPTS[0], disaggregation=1))
    t = final.timing
    stamps = [t.arrival, t.dispatched, t.prefill_start, t.prefill_end, t.kv_received,
              t.decode_admitted, t.first_token, t.finished]
    assert all(s > 0 for s in stamps) and stamps == sorted(stamps), stamps
    assert t.first_token_ms >= t.prefill_compute_ms > 0
    assert final.prefill_worker == "prefill-0" and final.decode_worker == "decode-0"


def _bad_requests():
    def req(**kw):
        r = greedy_request("hello")
        for k, v in kw.items():
            if k.startswith("sampling_"):
                setattr(r.sampling, k.removeprefix("sampling_"), v)
            else:
                setattr(r, k, v)
        return r

    both = greedy_request("hi")
    both.token_ids.extend([1, 2])
    bad_role = pb.GenerateRequest()
    bad_role.messages.add(role="wizard", content="hi")
    vocab_ids = pb.GenerateRequest(token_ids=[1, 10**9])
    stop_ids = greedy_request("hi")
    stop_ids.sampling.stop_token_ids.append(-1)
    empty_stop = greedy_request("hi")
    empty_stop.sampling.stop.append("")
    return [
        (pb.GenerateRequest(), "prompt"),
        (both, "token_ids"),
        (req(sampling_max_tokens=-3), "sampling.max_tokens"),
        (req(sampling_temperature=-0.5), "sampling.temperature"),
        (req(sampling_top_p=0.0), "sampling.top_p"),
        (req(sampling_top_k=-1), "sampling.top_k"),
        (req(disaggregation=7), "disaggregation"),
        (pb.GenerateRequest(prompt="word " * 9000), "prompt"),  # over the model's length
        (pb.GenerateRequest(prompt="word " * 5000), "prompt"),  # over every worker's KV
        (bad_role, "messages[0].role"),
        (vocab_ids, "token_ids[1]"),
        (stop_ids, "sampling.stop_token_ids[0]"),
        (empty_stop, "sampling.stop[0]"),
        (greedy_request("hi", slo=pb.Slo(ttft_ms=-1)), "slo.ttft_ms"),
    ]


@pytest.mark.parametrize("request_, field", _bad_requests(),
                         ids=[f for _, f in _bad_requests()])
def test_bad_requests_get_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_invalid_utf8_in_a_stop_string_names_the_field(cluster, stub):
    raw = greedy_request("hello")
    raw.sampling.stop.append("ab")
    data = raw.SerializeToString().replace(b"ab", b"\xff\xfe")
    channel = grpc.insecure_channel(cluster.address)
    call = channel.unary_stream("/pdserve.v1.PdServe/Generate",
                                request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(call(data, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "sampling.stop[0]: is not valid UTF-8"
    # and the cluster still serves
    assert collect(stub, greedy_request("hello", max_tokens=2))[2] is not None


def test_cancel_mid_stream_frees_both_sides(cluster, stub):
    req = greedy_request(PROMPTS[0], max_tokens=400, disaggregation=1)
    req.sampling.ignore_eos = True
    call = stub.Generate(req, timeout=60)
    next(call)
    next(call)
    call.cancel()
    wait_cluster_idle(cluster)


def test_deadline_expiry_frees_both_sides(cluster, stub):
    req = greedy_request(PROMPTS[1], max_tokens=400, disaggregation=1)
    req.sampling.ignore_eos = True
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, req, timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_cluster_idle(cluster)


def test_overload_answers_resource_exhausted_and_the_rest_complete(cluster, stub):
    # capacity: 4 in flight per decode-side worker (2) + a queue of 4
    req = greedy_request(PROMPTS[2], max_tokens=64, disaggregation=1)
    req.sampling.ignore_eos = True

    def one(_):
        try:
            return collect(stub, req, timeout=120)[2].finish_reason
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    rejected = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    done = [o for o in outcomes if o == pb.FINISH_REASON_LENGTH]
    assert rejected and done and len(rejected) + len(done) == 24, outcomes


class Observed:
    """A router observer that keeps every record (router.observe)."""

    def __init__(self):
        self.records = []

    def request_ended(self, record):
        self.records.append(record)


def test_observers_hear_of_every_request_once_with_how_it_ended(cluster, stub):
    observed = Observed()
    router = cluster.routers[0].router
    router.observers.append(observed)
    try:
        text, ids, final = collect(stub, greedy_request(PROMPTS[0], 6, disaggregation=1))
        call = stub.Generate(greedy_request(PROMPTS[1], 400, disaggregation=1), timeout=60)
        next(call)
        next(call)
        call.cancel()
        wait_cluster_idle(cluster)
        wait_for(lambda: len(observed.records) == 2, 10, "both ends observed")
    finally:
        router.observers.remove(observed)
    done, cancelled = observed.records
    assert done.outcome is RequestOutcome.FINISHED and done.final == final
    assert done.completion_tokens == len(ids) == sum(n for _, n in done.token_times)
    assert done.prompt_tokens == final.usage.prompt_tokens and done.code == ""
    assert done.arrival <= done.token_times[0][0] <= done.ended
    assert cancelled.outcome is RequestOutcome.CANCELLED and cancelled.final is None
    assert cancelled.completion_tokens >= 1


def test_cluster_status_lists_every_worker(stub):
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    roles = {w.worker_id: w.role for w in status.workers}
    assert roles == {"prefill-0": "prefill", "decode-0": "decode", "colocated-0": "colocated"}
    assert all(w.total_blocks == 256 and w.last_heartbeat > 0 for w in status.workers)


def test_the_typed_async_client(cluster, smollm2_llm):
    want = smollm2_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0))[0]

    async def run():
        async with PdServeClient(cluster.address) as client:
            pieces = [p async for p in client.generate(PROMPTS[0], max_tokens=8,
                                                        temperature=0.0)]
            status = await client.cluster_status()
        return pieces, status

    pieces, status = asyncio.run(run())
    assert "".join(p.text for p in pieces) == want.text
    assert pieces[-1].final.usage.completion_tokens == 8
    assert len(status.workers) == 3


def test_reflection_alone_finds_and_calls_generate(cluster):
    """A generic client: no pdserve stubs, only what the server's reflection serves."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(cluster.address)
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "pdserve.v1.PdServe" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("pdserve.v1.PdServe")
    assert {m.name for m in service.methods} == {"Generate", "GetClusterStatus"}
    method = service.FindMethodByName("Generate")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = request_cls(prompt="The capital of France is")
    request.sampling.max_tokens = 4
    request.sampling.temperature = 0.0
    call = channel.unary_stream(f"/{service.full_name}/{method.name}",
                                request_serializer=request_cls.SerializeToString,
                                response_deserializer=response_cls.FromString)
    responses = list(call(request, timeout=60))
    assert responses[-1].WhichOneof("response") == "final"
    assert sum(len(r.chunk.token_ids) for r in responses[:-1]) == 4
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "pdserve.v1.PdServe"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_load_generator_against_the_server(cluster):
    import argparse

    from pdserve.bench.serve_bench import add_arguments, bench

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--target", cluster.address, "--num-prompts", "3", "--input-len",
                          "40", "--output-len", "6", "--request-rate", "inf",
                          "--disaggregation", "always", "--slo-ttft-ms", "60000",
                          "--slo-tpot-ms", "60000"])
    result = asyncio.run(bench(args))
    assert result["completed"] == 3 and result["total_output_tokens"] == 18
    assert result["slo_attainment"] == 1.0 and result["disagg_requests"] == 3
    assert result["num_prefill_workers"] == 1 and result["num_colocated_workers"] == 1
    assert result["mean_ttft_ms"] > 0 and result["disagg_mean_prefill_compute_ms"] > 0
