"""The Python side agrees with the compiled ABI: errors, events, enums and view records."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_abi.grammar import ABIType, TupleType
from eth_abi.grammar import parse as parse_abi_type
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3

import chain.fraud  # noqa: F401  (registers the verifier's errors)
from chain.build import load_artifact
from chain.errors import CONTRACT_ERRORS, ContractError
from chain.events import ENUMS, EVENT_TYPES, event_fields, snake_case
from chain.records import BidInfo, DeviceInfo, RoundInfo, TaskInfo
from chain.transactions import abi_functions, decode_revert
from core.errors import FlexError

ABI = load_artifact("FlexMarket")["abi"]
# The verifier's errors reach callers through the market's challenge, so they decode too.
ERROR_ABI = ABI + [e for e in load_artifact("FlexVerifier")["abi"] if e["type"] == "error"]
CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
SOURCE = "\n".join((CONTRACTS / n).read_text() for n in ("FlexMarket.sol", "FlexVerifier.sol"))
SAMPLE = {"uint256": 7, "uint8": 2, "address": "0x" + "ab" * 20, "bytes32": b"\x01" * 32}


def abi_entries(kind: str) -> dict[str, dict]:
    return {e["name"]: e for e in (ERROR_ABI if kind == "error" else ABI) if e["type"] == kind}


def test_every_contract_error_has_its_class_and_back():
    assert set(abi_entries("error")) == set(CONTRACT_ERRORS)


@pytest.mark.parametrize("name", sorted(abi_entries("error")))
def test_revert_decodes_to_the_class_with_named_fields(name: str):
    entry = abi_entries("error")[name]
    types = [i["type"] for i in entry["inputs"]]
    selector = keccak(text=f"{name}({','.join(types)})")[:4]
    data = selector + abi_encode(types, [SAMPLE[t] for t in types])
    error = decode_revert(data)
    assert type(error) is CONTRACT_ERRORS[name]
    assert list(error.fields) == [snake_case(i["name"]) for i in entry["inputs"]]
    assert isinstance(error, ContractError)
    assert isinstance(error, FlexError)
    assert error.as_dict()["code"] == type(error).code


def test_error_codes_are_stable_snake_case_and_unique():
    codes = [cls.code for cls in CONTRACT_ERRORS.values()]
    assert len(set(codes)) == len(codes)
    for name, cls in CONTRACT_ERRORS.items():
        if name.startswith("FlexVerifier"):
            assert cls.code == "challenge_" + snake_case(name.removeprefix("FlexVerifier"))
        else:
            assert cls.code == snake_case(name.removeprefix("FlexMarket"))


def test_unknown_and_string_and_panic_reverts():
    unknown = decode_revert("0xdeadbeef")
    assert type(unknown) is ContractError
    assert unknown.data == "0xdeadbeef"
    reason = decode_revert(keccak(text="Error(string)")[:4] + abi_encode(["string"], ["no"]))
    assert reason.reason == "no"
    panic = decode_revert(keccak(text="Panic(uint256)")[:4] + abi_encode(["uint256"], [0x11]))
    assert panic.panic == 0x11
    assert type(decode_revert(None)) is ContractError


def test_every_event_has_a_record_with_the_abi_fields():
    events = abi_entries("event")
    assert set(events) == set(EVENT_TYPES)
    for name, entry in events.items():
        assert event_fields(EVENT_TYPES[name]) == [snake_case(i["name"]) for i in entry["inputs"]]


def test_python_enums_mirror_the_solidity_enums():
    declared = dict(re.findall(r"enum (\w+) \{([^}]*)\}", SOURCE))
    assert set(declared) == set(ENUMS)
    for name, body in declared.items():
        members = [m.strip() for m in body.split(",") if m.strip()]
        assert [m.name for m in ENUMS[name]] == [snake_case(m).upper() for m in members]
        assert [m.value for m in ENUMS[name]] == list(range(len(members)))
    referenced = {
        p["internalType"].rsplit(".", 1)[-1]
        for e in ABI
        for p in e.get("inputs", []) + e.get("outputs", [])
        if p.get("internalType", "").startswith("enum ")
    }
    assert referenced <= set(ENUMS)


@pytest.mark.parametrize(
    ("record", "function", "extra"),
    [
        (TaskInfo, "task", set()),
        (DeviceInfo, "deviceInfo", set()),
        (RoundInfo, "roundInfo", set()),
        (BidInfo, "bids", {"index"}),
    ],
)
def test_view_records_match_the_abi_structs(record, function, extra):
    (output,) = abi_entries("function")[function]["outputs"]
    names = [snake_case(c["name"]) for c in output["components"]]
    assert [f.name for f in fields(record) if f.name not in extra] == names


def sample_of(abi_type: ABIType, address: str) -> Any:
    """A value of ``abi_type`` whose addresses are all ``address``."""
    if abi_type.is_array:
        return (sample_of(abi_type.item_type, address),) * 2
    if isinstance(abi_type, TupleType):
        return tuple(sample_of(c, address) for c in abi_type.components)
    base, sub = abi_type.base, abi_type.sub
    return {
        "address": address,
        "bool": True,
        "string": "flex",
        "bytes": b"\x01" * (sub or 3),
    }.get(base, 7)


@pytest.mark.parametrize("name", sorted(abi_entries("function")))
def test_each_function_is_called_as_web3_calls_it_and_its_addresses_come_back_checksummed(
    name: str,
):
    entry = abi_entries("function")[name]
    function = abi_functions(ABI)[name]
    checksummed = to_checksum_address("0x" + "ab" * 20)
    args = [sample_of(parse_abi_type(t), checksummed) for t in function.inputs]
    web3_contract = Web3().eth.contract(abi=[entry])
    assert function.encode(args) == bytes(HexBytes(web3_contract.encode_abi(name, args=args)))
    # An answer as the node sends it, addresses in lower case: they come back checksummed,
    # however deep in a struct or array they sit, and a lone output comes back bare.
    lower = [sample_of(parse_abi_type(t), checksummed.lower()) for t in function.outputs]
    expected = tuple(sample_of(parse_abi_type(t), checksummed) for t in function.outputs)
    decoded = function.decode(abi_encode(list(function.outputs), lower))
    assert decoded == (expected[0] if len(expected) == 1 else expected)
