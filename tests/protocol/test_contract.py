"""The contract's pure parts: sampling validated once with the field named, roles, the
prefix hash chain (the engine registers blocks under it), and a model folder's limits."""

from __future__ import annotations

import json

import pytest
from helpers import make_engine, run_to_completion

from pdserve.protocol import (
    InvalidField,
    SamplingParams,
    WorkerRole,
    block_hashes,
    hash_block,
    read_model_limits,
)
from pdserve.protocol.sampling import SAMPLING_EPS


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=10**400), "temperature"),  # no float holds it
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed=2**64), "seed"),  # torch's generators take 64 bits
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(stop=["ok", ""]), "stop[1]"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids[1]"),
])
def test_sampling_names_the_bad_field(kwargs, field):
    with pytest.raises(InvalidField) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


@pytest.mark.parametrize("temperature, greedy", [
    (0, True), (0.0, True), (5e-324, True), (1e-38, True), (9.99e-6, True),
    (SAMPLING_EPS, False), (0.7, False), (1e30, False),
])
def test_temperatures_below_the_floor_are_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


@pytest.mark.parametrize("seed", [0, -1, -(2**63), 2**64 - 1])
def test_every_64_bit_seed_is_accepted(seed):
    assert SamplingParams(seed=seed).seed == seed


def test_sampling_keeps_lists_hashable_and_checks_the_vocabulary():
    p = SamplingParams(stop=["a"], stop_token_ids=[5, 9])
    assert p.stop == ("a",) and p.stop_token_ids == (5, 9) and hash(p)
    assert SamplingParams(stop="a").stop == ("a",)
    p.check_vocab(10)
    with pytest.raises(InvalidField, match=r"stop_token_ids\[1\]: 9 is outside"):
        p.check_vocab(9)


def test_stop_tokens_and_eos():
    eos = {2}
    assert SamplingParams().stops_on(2, eos)
    assert not SamplingParams(ignore_eos=True).stops_on(2, eos)
    assert SamplingParams(ignore_eos=True, stop_token_ids=(2,)).stops_on(2, eos)
    assert not SamplingParams().stops_on(3, eos)


def test_roles():
    assert [r for r in WorkerRole if r.receives_kv] == [WorkerRole.DECODE]
    assert not WorkerRole.PREFILL.decodes and WorkerRole.COLOCATED.decodes


@pytest.mark.parametrize("block_size", [4, 16])
def test_the_hash_chain_covers_every_earlier_token(block_size):
    tokens = [(i * 7919) % 49152 for i in range(70)]
    chain = block_hashes(tokens, block_size)
    assert len(chain) == 70 // block_size
    assert chain[0] == hash_block(None, tokens[:block_size])
    other = block_hashes([tokens[0] + 1, *tokens[1:]], block_size)
    assert all(a != b for a, b in zip(chain, other, strict=True))  # a change propagates


def test_the_engine_registers_blocks_under_the_contract_hashes(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    engine.drain_prefix_events()  # start the record
    prompt = list(range(1, 14))
    engine.add_request("a", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(engine)
    entered, _ = engine.drain_prefix_events()
    assert set(block_hashes(prompt, 4)) <= set(entered)


def test_model_limits_read_eos_from_both_files_and_cap_at_a_window(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mistral", "vocab_size": 100, "max_position_embeddings": 4096,
         "sliding_window": 1024, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    limits = read_model_limits(tmp_path)
    assert (limits.vocab_size, limits.max_model_len, limits.eos_token_ids) == (100, 1024, (2, 7))
    with pytest.raises(ValueError, match="has no config.json"):
        read_model_limits(tmp_path / "missing")
