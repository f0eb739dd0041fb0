"""The collective ledger and the agreement protocol's pure parts: call sites, structures, keys, headers,
the agreed prediction, the mismatch tables and the checks each collective applies."""

from __future__ import annotations

import collections

import pytest
import torch

from distrib import _agreement, _exchange, _ledger, _mismatch
from distrib._agreement import Header, header_row
from distrib._ledger import Key, Ledger, call_site, flatten, stable_id


def _site_here():
    return call_site(1)


def test_the_call_site_is_the_callers_line_and_is_cached():
    sites = []
    for _ in range(2):
        sites.append(_site_here())  # one line, called twice
    line = test_the_call_site_is_the_callers_line_and_is_cached.__code__.co_firstlineno + 3
    assert sites[0] is sites[1], "one Site per code object and line"
    assert sites[0].path == __file__ and sites[0].line == line
    assert sites[0].function == "test_the_call_site_is_the_callers_line_and_is_cached"
    assert str(sites[0]) == f"{__file__}:{line}"


def test_a_site_is_named_by_the_file_name_not_the_directory():
    a = _ledger.Site("/home/a/train.py", 10, "main")
    b = _ledger.Site("/scratch/b/train.py", 10, "main")
    c = _ledger.Site("/home/a/train.py", 11, "main")
    assert a.ident == b.ident != c.ident


def test_flatten_describes_structure_and_keys():
    t = torch.zeros(1)
    leaves, spec = flatten({"a": t, "b": [t, (t, "x")], "c": 3})
    assert len(leaves) == 3
    assert spec == ("dict", ("a", "b", "c"), ("T", ("list", ("T", ("tuple", ("T", "-")))), "-"))
    assert _ledger.describe_structure(spec).startswith("dict with keys ['a', 'b', 'c']")
    assert flatten(t) == ([t], "T")
    Pair = collections.namedtuple("Pair", "x y")
    assert flatten(Pair(t, t))[1] == ("Pair", ("T", "T"))


def test_the_order_of_leaves_is_tree_maps_order():
    from distrib._tree import leaves

    data = {"b": torch.tensor([1]), "a": [torch.tensor([2]), torch.tensor([3])]}
    assert [t.item() for t in flatten(data)[0]] == [t.item() for t in leaves(data)]


def _key(op="gather", shapes=((2, 3),), dtype=torch.float32, extra=(), payload=True, line=1):
    site = _ledger.Site("/x/train.py", line, "main")
    sig = tuple((dtype, torch.Size(s)) for s in shapes)
    return Key(op, site, "T" if len(shapes) == 1 else ("tuple", ("T",) * len(shapes)), sig, extra, payload)


def test_keys_differ_in_every_component_and_agree_when_equal():
    base = _key()
    assert _key().ident == base.ident
    variants = [
        _key(op="reduce"),
        _key(shapes=((2, 4),)),
        _key(dtype=torch.float64),
        _key(extra=(("reduction", "max"),)),
        _key(payload=False),
        _key(line=2),
    ]
    assert len({v.ident for v in variants} | {base.ident}) == len(variants) + 1
    assert 0 < base.ident < 2**62 and stable_id("a") == stable_id("a") != stable_id("b")


def test_a_payload_travels_in_its_own_dtype_or_as_bytes():
    same = _key(shapes=((2, 3), (4,)), dtype=torch.float32)
    assert same.unit is torch.float32
    assert [(off, n) for _, _, off, n in same.layout] == [(0, 6), (6, 4)] and same.nbytes == 40
    site = _ledger.Site("/x/t.py", 1, "f")
    mixed = Key(
        "gather", site, "x", ((torch.float32, torch.Size([2])), (torch.int64, torch.Size([1]))), (), True
    )
    assert mixed.unit is torch.uint8 and [(off, n) for *_, off, n in mixed.layout] == [(0, 8), (8, 8)]
    flags = Key("gather", site, "T", ((torch.bool, torch.Size([3])),), (), True)
    assert flags.unit is torch.uint8, "bool values travel as bytes"
    tag, expected = same.tag(torch.device("cpu"), 3)
    assert tag.dtype is torch.float32 and tag.numel() == 2 and expected.shape == (3, 2)
    assert torch.equal(expected[1], tag)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
def test_a_tag_is_a_normal_number_in_every_float_view(dtype):
    # so that comparing values compares bits: never NaN, infinite, negative zero or subnormal
    for ident in (0, 2**62 - 1, stable_id("a"), stable_id("b"), 0x7FF0_0000_0000_0001):
        tag = torch.tensor([_ledger.tag_value(ident)], dtype=torch.int64).view(dtype)
        values = (torch.view_as_real(tag) if tag.is_complex() else tag).double()
        assert torch.isfinite(values).all() and (values > 0).all()
        real_dtype = torch.float32 if dtype is torch.complex64 else dtype
        assert (values >= torch.finfo(real_dtype).tiny).all()
    assert _ledger.tag_value(stable_id("a")) != _ledger.tag_value(stable_id("b"))


def test_the_header_round_trips():
    key = _key(shapes=((2, 3), (5,), (1,), (7, 1, 1), (9,)), extra=(("reduction", "sum"),))
    row = header_row(key, seq=12, nbytes=None, flags=0)
    assert len(row) == _agreement.HEADER
    header = Header(row)
    assert (header.seq, header.key, header.count, header.nbytes) == (12, key.ident, 5, key.nbytes)
    assert [shape for _, shape in header.tensors] == [(2, 3), (5,), (1,), (7, 1, 1)], (
        "the first 4 travel in it"
    )
    header.add_rows(_agreement.tensor_row(torch.float32, torch.Size([9])), 1)
    assert header.tensors[4] == (_ledger.DTYPE_CODE[torch.float32], (9,))


def test_the_prediction_is_the_key_that_followed_last_time():
    ledger = Ledger(rank=0, world_size=2)
    a, b = _key(line=1), _key(line=2)
    assert ledger.predicted is None
    for key in (a, b, a, b):
        ledger.begin(key)
        ledger.settle(key)
        ledger.end("ok")
    assert ledger.predicted is a, "after b came a"
    ledger.begin(a)
    ledger.settle(None)  # the ranks disagreed
    ledger.end("failed: CollectiveMismatchError")
    assert ledger.predicted is a, (
        "after a disagreement: what followed the last disagreement (here: the start)"
    )
    assert ledger.completed == 5 and [e["outcome"] for e in ledger.last_entries()][-1].startswith("failed")


def test_the_ledger_keeps_a_bounded_history():
    ledger = Ledger(rank=0, world_size=2, keep=4)
    key = _key()
    for _ in range(10):
        ledger.begin(key)
        ledger.end("ok")
    assert len(ledger.entries) == 4 and ledger.last_entries()[0]["seq"] == 7


def _headers(*shape_lists, dtype=torch.float32, key_from_shapes=True):
    out = []
    for shapes in shape_lists:
        key = _key(shapes=shapes, dtype=dtype)
        out.append(Header(header_row(key, 1, None, 0)))
    return out


def test_gather_accepts_a_different_first_dimension_only():
    assert _exchange.gatherable(_headers([(2, 3)], [(5, 3)])) is None
    message = _exchange.gatherable(_headers([(2, 3)], [(2, 4)]))
    assert "different shapes" in message and "rank 0: float32[2, 3], rank 1: float32[2, 4]" in message
    mixed = [
        Header(header_row(_key(dtype=torch.float32), 1, None, 0)),
        Header(header_row(_key(dtype=torch.int64), 1, None, 0)),
    ]
    assert "different dtypes" in _exchange.gatherable(mixed)


def test_reduce_needs_identical_tensors_and_pad_the_same_dimensions():
    check = _exchange.identical("reduce", "Pad them.")
    assert check(_headers([(3,)], [(3,)])) is None
    assert "rank 0: float32[3]; rank 1: float32[4]" in check(_headers([(3,)], [(4,)]))
    assert _exchange.paddable(_headers([(2, 3)], [(2, 7)])) is None
    assert "numbers of dimensions" in _exchange.paddable(_headers([(2, 3)], [(2, 3, 1)]))


def test_the_mismatch_table_and_its_hints():
    described = [
        {"op": "gather", "site": "/w/train.py:41 in main", "tensors": ["float32[64, 10]"]},
        {"op": "wait_for_everyone", "site": "/w/train.py:44 in main", "tensors": []},
        {"op": "gather", "site": "/w/train.py:41 in main", "tensors": ["float32[64, 10]"]},
    ]
    key = _key()
    error = _mismatch.build_error(key, 7, [], described, "collective")
    text = str(error)
    assert isinstance(error, _mismatch.CollectiveMismatchError)
    assert "(collective #7 on every rank): the ranks called different collectives." in text
    lines = text.splitlines()
    assert lines[1].split() == ["rank", "collective", "call", "site", "tensors"]
    assert lines[3].split()[:2] == ["1", "wait_for_everyone"] and lines[3].rstrip().endswith("-")
    assert "rank 1 did not call gather() at /w/train.py:41 in main; it called wait_for_everyone()" in text
    assert "if rank == 0:" in text


def test_a_rank_that_left_the_scope_is_named_as_such():
    described = [
        {"op": "gather", "site": "/w/t.py:9 in main", "tensors": ["float32[2]"]},
        {"op": _mismatch.LEAVE_SCOPE, "site": "/w/t.py:3 in main", "tensors": []},
    ]
    text = str(_mismatch.build_error(_key(), 2, [], described, "collective"))
    assert (
        "rank 1 left the distributed() scope (returned or finished early) while rank 0 called gather()"
        in text
    )


def test_a_local_failure_is_a_collective_error_naming_the_rank():
    described = [
        {"op": "gather_object", "site": "s", "tensors": [], "error": "cannot pickle generator: no"},
        {"op": "gather_object", "site": "s", "tensors": [], "error": None},
    ]
    error = _mismatch.build_error(_key(op="gather_object"), 3, [], described, "error")
    assert type(error) is _mismatch.CollectiveError
    assert "rank 0: cannot pickle generator" in str(error)


@pytest.mark.parametrize(
    "op, expected", [("gather", "gather()"), ("leave distributed()", "leave distributed()")]
)
def test_op_names_read_as_calls(op, expected):
    assert _ledger.op_call(op) == expected


def test_the_same_collective_from_different_lines_says_how_to_make_it_one_call():
    described = [
        {"op": "broadcast_object_list", "site": "/w/t.py:5 in main", "tensors": []},
        {"op": "broadcast_object_list", "site": "/w/t.py:7 in main", "tensors": []},
    ]
    text = str(_mismatch.build_error(_key(op="broadcast_object_list"), 1, [], described, "collective"))
    assert "Every rank called broadcast_object_list(), but from different lines" in text
    assert "make the call from one line" in text
