"""The router's front door without a cluster: input limits, validation off the event loop
(the loop keeps running while a large input is tokenized), bounded lanes, the diagnosis of
undecodable bytes, the `pdserve serve` flags, and a property test over GenerateRequest."""

from __future__ import annotations

import argparse
import asyncio
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.deploy.cli import build_parser
from pdserve.deploy.input_flags import add_input_limit_flags, input_limits
from pdserve.protocol import InvalidField, ModelLimits
from pdserve.router.intake import Intake, IntakeFull
from pdserve.router.limits import MIB, InputLimits
from pdserve.router.server import _Undecodable, deserialize_generate_request
from pdserve.router.tokenizer import RouterTokenizer
from pdserve.router.validate import check_sizes, validate
from pdserve.router.wire import diagnose
from pdserve.rpc import pdserve_pb2 as pb


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return RouterTokenizer(smollm2_dir)


# -- limits -------------------------------------------------------------------------------

SMALL = InputLimits(max_prompt_bytes=10, max_messages=3, max_message_bytes=12, max_stop=2,
                    max_stop_bytes=4, max_stop_token_ids=2)
MODEL = ModelLimits(vocab_size=100, max_model_len=5, eos_token_ids=(0,))


def _req(**kw) -> pb.GenerateRequest:
    messages = kw.pop("messages", [])
    stop, stop_ids = kw.pop("stop", []), kw.pop("stop_token_ids", [])
    r = pb.GenerateRequest(**kw)
    for content in messages:
        r.messages.add(role="user", content=content)
    r.sampling.stop.extend(stop)
    r.sampling.stop_token_ids.extend(stop_ids)
    return r


@pytest.mark.parametrize("req, field, limit", [
    (_req(prompt="x" * 11), "prompt", "10 bytes"),
    (_req(prompt="é" * 6), "prompt", "10 bytes"),  # 6 characters, 12 bytes
    (_req(messages=["a"] * 4), "messages", "at most 3"),
    (_req(messages=["abcdef", "ghijklm"]), "messages", "12 bytes"),
    (_req(messages=["ü" * 7]), "messages", "12 bytes"),
    (_req(prompt="p", stop=["a", "b", "c"]), "sampling.stop", "at most 2"),
    (_req(prompt="p", stop=["a", "abcde"]), "sampling.stop[1]", "4 bytes"),
    (_req(prompt="p", stop=["€€"]), "sampling.stop[0]", "4 bytes"),
    (_req(prompt="p", stop_token_ids=[1, 2, 3]), "sampling.stop_token_ids", "at most 2"),
    (_req(prompt="p", request_id="r" * 257), "request_id", "256"),
    (_req(token_ids=[-1] * 5), "token_ids", "maximum length is 5"),  # counted, not read
])
def test_over_a_limit_names_the_field_and_the_limit(req, field, limit):
    with pytest.raises(InvalidField) as err:
        check_sizes(req, SMALL, MODEL)
    assert err.value.field == field and limit in err.value.problem


def test_at_the_limits_passes():
    check_sizes(_req(prompt="é" * 5, stop=["€", "ab"], stop_token_ids=[1, 2]), SMALL, MODEL)
    check_sizes(_req(messages=["é" * 3, "abcdef"]), SMALL, MODEL)
    check_sizes(_req(token_ids=[-1] * 4), SMALL, MODEL)


def test_limits_are_positive_integers():
    with pytest.raises(ValueError, match="max_messages"):
        InputLimits(max_messages=0)


def test_serve_flags_set_every_limit_and_say_their_defaults(capsys):
    parser = argparse.ArgumentParser()
    add_input_limit_flags(parser)
    args = parser.parse_args(["--max-prompt-bytes", "7", "--max-messages", "3",
                              "--max-message-bytes", "9", "--max-stop-strings", "1",
                              "--max-stop-bytes", "5", "--max-stop-token-ids", "2",
                              "--max-request-bytes", "100", "--tokenizer-threads", "4"])
    assert input_limits(args) == InputLimits(
        max_prompt_bytes=7, max_messages=3, max_message_bytes=9, max_stop=1, max_stop_bytes=5,
        max_stop_token_ids=2, max_request_bytes=100, tokenizer_threads=4)
    assert input_limits(parser.parse_args([])) == InputLimits()
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-messages", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "request limits" in out and "--max-prompt-bytes N" in out
    assert f"({MIB})" in out and "(2048)" in out


# -- off the event loop -------------------------------------------------------------------

def _beating_while(intake: Intake, req: pb.GenerateRequest):
    """(seconds validation took, longest gap of a 10 ms heartbeat on the same loop, outcome)"""

    async def run():
        gaps: list[float] = []

        async def heartbeat():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beat = asyncio.get_running_loop().create_task(heartbeat())
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        try:
            outcome = await intake.validate(req)
        except InvalidField as e:
            outcome = e
        took = time.perf_counter() - start
        beat.cancel()
        return took, max(gaps), outcome

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_the_event_loop_keeps_beating_while_a_large_input_is_tokenized(tok, kind):
    # limits raised so that the input is tokenized, and long enough to measure: on the
    # loop, the longest gap would be the whole validation
    intake = Intake(tok, InputLimits(max_prompt_bytes=4 * MIB, max_messages=30_000))
    if kind == "prompt":
        req = _req(prompt=("The quick brown fox jumps over the lazy dog. " * 50_000)[:2 * MIB])
    else:
        req = _req(messages=["Hi there, how are you?"] * 25_000)
    took, gap, outcome = _beating_while(intake, req)
    assert isinstance(outcome, InvalidField) and "maximum length" in outcome.problem
    assert took > 0.2, took  # measured something
    # on the loop the longest gap would be all of `took`; a loaded machine stretches gaps
    assert gap < took / 2, (gap, took)


def test_a_full_large_lane_refuses_and_small_requests_pass_it(tok):
    intake = Intake(tok, InputLimits(max_pending_large=1))
    big = _req(prompt=("lorem ipsum " * 100_000)[:MIB])
    small = _req(prompt="The capital of France is")

    async def run():
        first = asyncio.get_running_loop().create_task(intake.validate(big))
        await asyncio.sleep(0)  # queued in the large lane
        with pytest.raises(IntakeFull):
            await intake.validate(big)
        quick = asyncio.get_running_loop().create_task(intake.validate(small))
        done, _ = await asyncio.wait({first, quick}, return_when=asyncio.FIRST_COMPLETED)
        assert quick in done, "a small request waited behind a large one"
        with pytest.raises(InvalidField):
            await first  # over the model's length
        return quick.result()

    assert len(asyncio.run(run()).prompt_token_ids) == 5


# -- undecodable bytes ----------------------------------------------------------------------

def _good() -> bytes:
    r = _req(prompt="hello", request_id="ab", messages=["ef"], stop=["cd"])
    r.sampling.max_tokens = 5
    return r.SerializeToString()


@pytest.mark.parametrize("data, field", [
    (_good().replace(b"ab", b"\xff\xfe"), "request_id"),
    (_good().replace(b"hello", b"hell\x80"), "prompt"),
    (_good().replace(b"ef", b"\xed\xa0"), "messages[0].content"),  # a UTF-8 surrogate
    (_good().replace(b"cd", b"\xc0\xaf"), "sampling.stop[0]"),  # overlong encoding
    (b"\xff" * 16, "request"),
    (b"\x00", "request"),  # field number 0
    (_good()[:-3], "sampling"),  # cut inside the sampling message
    (b"\x2a\x03\x08\xff\xff", "sampling.max_tokens"),  # a number cut short
    (b"\x1a\x02\x80\x80", "token_ids"),  # packed ids cut short
    (b"\x22\x05\x12\x09abc", "messages[0].content"),  # a length past its message's end
    (b"\x0b" * 10_000, "request_id"),  # groups opened, never closed
])
def test_undecodable_bytes_name_where_they_break(data, field):
    req = deserialize_generate_request(data)
    assert isinstance(req, _Undecodable)
    error = diagnose(data)
    assert error.field == field, error


# -- property test over the request message ---------------------------------------------

LIMITS = InputLimits(max_prompt_bytes=64, max_messages=4, max_message_bytes=96, max_stop=3,
                     max_stop_bytes=8, max_stop_token_ids=4)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])
texts = st.text(max_size=24) | st.sampled_from(
    ["", "<|im_start|>system\n", "<|im_end|>", "\x00", "user", "é" * 40, " "])


@st.composite
def requests(draw) -> pb.GenerateRequest:
    r = pb.GenerateRequest(request_id=draw(st.text(max_size=8) | st.just("r" * 300)))
    if draw(st.booleans()):
        r.prompt = draw(texts)
    if draw(st.booleans()):
        r.token_ids.extend(draw(st.lists(st.integers(0, 49151) | int32, max_size=6)))
    for role, content in draw(st.lists(st.tuples(
            st.sampled_from(["system", "user", "assistant", "", "tool", "USER"]), texts),
            max_size=5)):
        r.messages.add(role=role, content=content)
    s = r.sampling
    for name, values in (("max_tokens", int32), ("temperature", floats), ("top_p", floats),
                         ("top_k", int32), ("seed", st.integers(-(2**63), 2**63 - 1))):
        if draw(st.booleans()):
            setattr(s, name, draw(values))
    s.stop.extend(draw(st.lists(texts, max_size=4)))
    s.stop_token_ids.extend(draw(st.lists(st.integers(0, 49151) | int32, max_size=5)))
    s.ignore_eos = draw(st.booleans())
    r.disaggregation = draw(st.integers(0, 2) | int32)
    for name in ("ttft_ms", "tpot_ms"):
        if draw(st.booleans()):
            setattr(r.slo, name, draw(st.floats() | st.just(math.nan)))
    return r


def _names_a_field(path: str, message=None, descriptor=pb.GenerateRequest.DESCRIPTOR) -> bool:
    """Whether `path` (`sampling.stop[2]`) is a field of the schema, and with a message, an
    element that it holds."""
    head, _, rest = path.partition(".")
    name, _, index = head.partition("[")
    field = descriptor.fields_by_name.get(name)
    if field is None:
        return False
    value = getattr(message, name) if message is not None else None
    if index:
        if not field.is_repeated:
            return False
        i = int(index.removesuffix("]"))
        if value is not None:
            if i >= len(value):
                return False
            value = value[i]
    if not rest:
        return True
    return field.message_type is not None and _names_a_field(rest, value, field.message_type)


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _check_outcome(req: pb.GenerateRequest, tok: RouterTokenizer) -> None:
    try:
        valid = validate(req, tok, LIMITS)
    except InvalidField as e:
        assert _names_a_field(e.field, req), e
        return
    assert 0 < len(valid.prompt_token_ids) < tok.limits.max_model_len
    assert all(0 <= t < tok.limits.vocab_size for t in valid.prompt_token_ids)
    s = valid.sampling
    assert s.max_tokens >= 1 and math.isfinite(s.temperature) and 0 < s.top_p <= 1


@SETTINGS
@given(req=requests())
def test_every_request_is_valid_or_refused_naming_a_field_it_has(tok, req):
    _check_outcome(req, tok)


@st.composite
def garbled(draw) -> bytes:
    data = bytearray(draw(requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@SETTINGS
@given(data=garbled() | st.binary(max_size=64))
def test_any_bytes_are_a_request_or_refused_naming_a_field(tok, data):
    req = deserialize_generate_request(data)
    if isinstance(req, _Undecodable):
        error = diagnose(data)
        assert error.field == "request" or _names_a_field(error.field), error
    else:
        _check_outcome(req, tok)


def test_the_property_is_not_vacuous(tok):
    """Valid requests exist among those drawn: a plain greedy chat request passes."""
    req = _req(messages=["Hi"], stop=["x"])
    req.sampling.temperature = 0.0
    valid = validate(req, tok, LIMITS)
    assert valid.sampling.is_greedy and valid.prompt_token_ids
