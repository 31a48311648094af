import random

import pytest
from hypothesis import given, settings, strategies as st
from pyfastcdc import FastCDC

from p2pcache.content.chunking import DEFAULT_PARAMS, ChunkerParams, Chunker, chunk_buffers
from p2pcache.errors import InvalidInput

SMALL = ChunkerParams(min_size=256, avg_size=1024, max_size=4096)


def reference(data: bytes, p: ChunkerParams) -> list[bytes]:
    cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, normalized_chunking=p.normalization)
    return [bytes(c.data) for c in cdc.cut_buf(data)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=60_000), st.lists(st.integers(min_value=0), max_size=30))
def test_streaming_cuts_equal_one_shot_cuts_however_input_is_split(data, cuts):
    got = [bytes(c) for c in chunk_buffers(split(data, cuts), SMALL)]
    assert got == reference(data, SMALL)
    assert b"".join(got) == data
    assert all(len(c) <= SMALL.max_size for c in got)
    assert all(len(c) >= SMALL.min_size for c in got[:-1])


def test_default_params_on_large_random_input_with_odd_reads():
    rng = random.Random(7)
    data = rng.randbytes(6 << 20)
    pieces, i = [], 0
    while i < len(data):
        n = rng.choice([1, 17, 4096, 100_000, 3 << 20])
        pieces.append(data[i:i + n])
        i += n
    got = [bytes(c) for c in chunk_buffers(pieces)]
    assert got == reference(data, DEFAULT_PARAMS)
    assert max(map(len, got)) <= DEFAULT_PARAMS.max_size <= 1 << 20


def test_insertion_only_changes_nearby_chunks():
    rng = random.Random(1)
    data = rng.randbytes(2 << 20)
    edited = data[: 1 << 20] + b"inserted!" + data[1 << 20:]
    a = set(bytes(c) for c in chunk_buffers([data]))
    b = set(bytes(c) for c in chunk_buffers([edited]))
    assert len(a & b) >= len(a) - 3


def test_chunker_is_reusable_after_finish():
    ch = Chunker(SMALL)
    data = random.Random(2).randbytes(50_000)
    first = [bytes(c) for c in ch.feed(data)] + [bytes(c) for c in ch.finish()]
    second = [bytes(c) for c in ch.feed(data)] + [bytes(c) for c in ch.finish()]
    assert first == second == reference(data, SMALL)


@pytest.mark.parametrize("kw", [dict(min_size=10), dict(max_size=2 << 20), dict(min_size=8192, avg_size=4096),
                                dict(normalization=7), dict(algorithm="rabin")])
def test_bad_params_rejected(kw):
    with pytest.raises(InvalidInput):
        ChunkerParams(**kw).validate()


def test_params_roundtrip_through_ipld():
    assert ChunkerParams.from_ipld(DEFAULT_PARAMS.to_ipld()) == DEFAULT_PARAMS
    with pytest.raises(InvalidInput):
        ChunkerParams.from_ipld({"alg": "fastcdc-2020"})


def test_the_compiled_fastcdc_is_the_one_chunking():
    # pyfastcdc falls back to pure Python (with only a warning) when its Cython extension cannot load: every
    # ingest would then run two orders of magnitude slower with nothing else failing.
    from p2pcache.content import chunking

    assert chunking.FastCDC.__module__ == "pyfastcdc.cy.fastcdc"
    assert type(Chunker()._cdc).__module__ == "pyfastcdc.cy.fastcdc"


@pytest.mark.parametrize("params", [SMALL, DEFAULT_PARAMS])
def test_whole_cuts_what_fastcdc_cuts_around_the_minimum_size(params):
    # `whole` takes an input of at most min_size bytes as one chunk without asking FastCDC: the same
    # chunks FastCDC cuts, at and on either side of that size, and for larger inputs
    rng = random.Random(7)
    m = params.min_size
    for n in (0, 1, 2, m - 1, m, m + 1, 2 * m, params.avg_size + m, 3 * params.max_size):
        data = rng.randbytes(n)
        got = [bytes(c) for c in Chunker(params).whole(data)]
        assert got == reference(data, params), n
        assert b"".join(got) == data
