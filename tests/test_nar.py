"""NAR reader and writer: round trips, byte-exactness against an independent encoder, and rejection of
every kind of malformed or non-canonical archive."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcache.content import nar
from p2pcache.content.nar import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    InvalidNar,
    NarReader,
    NarWriter,
    RegularFile,
    Symlink,
    read_nar,
    read_nar_file,
    write_nar,
)
from p2pcache.errors import InvalidInput

# -- an independent, recursive encoder written straight from the grammar, used as the reference -----------


def s(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def ref_node(node) -> bytes:
    kind = node[0]
    if kind == "file":
        _, data, executable = node
        return (
            s(b"(") + s(b"type") + s(b"regular") + (s(b"executable") + s(b"") if executable else b"")
            + s(b"contents") + s(data) + s(b")")
        )
    if kind == "link":
        return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(node[1]) + s(b")")
    out = s(b"(") + s(b"type") + s(b"directory")
    for name in sorted(node[1]):
        out += s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + ref_node(node[1][name]) + s(b")")
    return out + s(b")")


def ref_nar(node) -> bytes:
    return s(b"nix-archive-1") + ref_node(node)


def events_of(node, piece: int = 3) -> list:
    kind = node[0]
    if kind == "file":
        _, data, executable = node
        return [RegularFile(len(data), executable)] + [
            Contents(data[i : i + piece]) for i in range(0, len(data), piece)
        ]
    if kind == "link":
        return [Symlink(node[1])]
    out = [DirectoryStart()]
    for name in sorted(node[1]):
        out += [Entry(name)] + events_of(node[1][name], piece)
    return out + [DirectoryEnd()]


def merged(events) -> list:
    """Events with adjacent Contents joined, so that differently chunked streams compare equal."""
    out: list = []
    for e in events:
        if isinstance(e, Contents):
            if not e.data:
                continue
            if out and isinstance(out[-1], Contents):
                out[-1] = Contents(out[-1].data + e.data)
                continue
        out.append(e)
    return out


def feed_in_pieces(data: bytes, cuts: list[int]) -> list:
    reader = NarReader()
    events: list = []
    prev = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        events += reader.feed(data[prev:cut])
        prev = cut
    reader.end()
    return events


names = st.binary(min_size=1, max_size=12).filter(lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n)
targets = st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)
leaves = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=50), st.booleans()),
    st.tuples(st.just("link"), targets),
)
trees = st.recursive(leaves, lambda kids: st.tuples(st.just("dir"), st.dictionaries(names, kids, max_size=5)), max_leaves=20)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.integers(1, 9), st.lists(st.integers(0, 10_000), max_size=8))
def test_events_to_nar_to_events(tree, piece, cuts):
    events = events_of(tree, piece)
    data = b"".join(write_nar(events))
    assert data == ref_nar(tree)
    assert merged(feed_in_pieces(data, cuts)) == merged(events)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_every_truncation_is_rejected_at_end(tree, data):
    whole = ref_nar(tree)
    cut = data.draw(st.integers(0, len(whole) - 1))
    reader = NarReader()
    reader.feed(whole[:cut])
    with pytest.raises(InvalidNar, match="truncated"):
        reader.end()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_accepted_mutants_are_canonical(tree, data):
    """Flip one byte: the reader rejects it with InvalidNar, or accepts it and the writer gives back exactly
    the mutated bytes (so only canonical NARs are ever accepted)."""
    whole = bytearray(ref_nar(tree))
    i = data.draw(st.integers(0, len(whole) - 1))
    whole[i] ^= data.draw(st.integers(1, 255))
    try:
        events = list(read_nar([bytes(whole)]))
    except InvalidNar as e:
        assert "\n" not in str(e)
        return
    assert b"".join(write_nar(events)) == bytes(whole)


def _outcome(pieces):
    try:
        return merged(read_nar(pieces))
    except InvalidNar as e:
        return str(e)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_the_fast_path_for_buffered_files_reads_exactly_as_the_token_parser(tree, data):
    """Fed whole, a directory's small files are read by the buffered fast path; fed 7 bytes at a time, never
    (it needs whole entries in the buffer). Both give the same events, or the same error, for any tree and
    any one-byte mutation of it."""
    whole = bytearray(ref_nar(tree))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(whole) - 1))
        whole[i] ^= data.draw(st.integers(1, 255))
    raw = bytes(whole)
    assert _outcome([raw]) == _outcome([raw[i:i + 7] for i in range(0, len(raw), 7)])


def test_the_fast_path_reads_a_directory_of_many_small_files():
    files = [(b"f%04d" % i, ("file", bytes([i % 251]) * (i % 40), i % 3 == 0)) for i in range(300)]
    data = MAGIC + node_dir(*((name, ref_node(f)) for name, f in files))
    events = list(read_nar([data]))
    assert merged(events) == merged(read_nar([data[i:i + 5] for i in range(0, len(data), 5)]))
    assert sum(isinstance(e, RegularFile) for e in events) == 300
    assert b"".join(write_nar(events)) == data


def test_known_bytes_of_a_single_file():
    data = b"".join(write_nar([RegularFile(3, True), Contents(b"hi\n")]))
    assert data == (
        b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0"
        b"\x01\0\0\0\0\0\0\0(\0\0\0\0\0\0\0"
        b"\x04\0\0\0\0\0\0\0type\0\0\0\0"
        b"\x07\0\0\0\0\0\0\0regular\0"
        b"\x0a\0\0\0\0\0\0\0executable\0\0\0\0\0\0"
        b"\0\0\0\0\0\0\0\0"
        b"\x08\0\0\0\0\0\0\0contents"
        b"\x03\0\0\0\0\0\0\0hi\n\0\0\0\0\0"
        b"\x01\0\0\0\0\0\0\0)\0\0\0\0\0\0\0"
    )


def test_reader_passes_large_contents_through_in_fed_pieces():
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = ref_nar(("file", payload, False))
    head = data.index(payload)
    reader = NarReader()
    events = reader.feed(data[:head])
    assert events == [RegularFile(len(payload), False)]
    piece = data[head : head + 65536]
    events = reader.feed(piece)
    assert events == [Contents(piece)] and events[0].data is piece  # no copy of a whole bytes piece
    events = reader.feed(data[head + 65536 :])
    assert merged(events) == [Contents(payload[65536:])]
    reader.end()
    assert reader.done


def test_read_nar_file_and_empty_feeds():
    tree = ("dir", {b"a": ("file", b"x" * 100, True), b"b": ("dir", {}), b"c": ("link", b"../a")})
    data = ref_nar(tree)
    assert merged(read_nar_file(io.BytesIO(data), chunk_size=7)) == merged(events_of(tree))
    reader = NarReader()
    assert reader.feed(b"") == []
    reader.feed(data)
    assert reader.feed(b"") == []
    reader.end()


# -- rejection ------------------------------------------------------------------------------------------

FILE = ref_node(("file", b"hello", False))


def node_dir(*entries: tuple[bytes, bytes]) -> bytes:
    out = s(b"(") + s(b"type") + s(b"directory")
    for name, node in entries:
        out += s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")
    return out + s(b")")


def rejected(data: bytes, match: str) -> str:
    with pytest.raises(InvalidNar, match=match) as info:
        list(read_nar([data]))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, InvalidInput)
    # Fed a byte at a time, the same input fails the same way.
    with pytest.raises(InvalidNar, match=match):
        reader = NarReader()
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
        reader.end()
    return message


MAGIC = s(b"nix-archive-1")


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (s(b"nix-archive-2") + FILE, "bad magic"),
        (s(b"nix-archive-1x") + FILE, "bad magic"),
        (b"\xff" * 8 + FILE, "bad magic"),
        (MAGIC + FILE + b"\0", "trailing data"),
        (MAGIC + FILE + FILE, "trailing data"),
        (MAGIC + FILE[:-1], "truncated"),
        (MAGIC + s(b"(") + s(b"type") + s(b"fifo") + s(b")"), "unknown node type"),
        (MAGIC + s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"x") + s(b"contents"), "executable marker"),
        (MAGIC + s(b"(") + s(b"type") + s(b"regular") + s(b")"), "expected 'executable' or 'contents'"),
        (MAGIC + s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"") + s(b"executable"), "expected 'contents'"),
        (MAGIC + s(b"(") + s(b"type") + s(b"directory") + s(b"executable") + s(b""), "expected 'entry' or '\\)'"),
        (MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"contents"), "expected 'target'"),
        (MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"t") + s(b"contents"), "expected '\\)'"),
        (MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"") + s(b")"), "target is empty"),
        (MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"a\0b") + s(b")"), "contains NUL"),
        (MAGIC + s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"a" * 4097) + s(b")"), "longer than the limit"),
        (MAGIC + node_dir((b"b", FILE), (b"a", FILE)), "out of order"),
        (MAGIC + node_dir((b"a", FILE), (b"a", FILE)), "duplicate entry"),
        (MAGIC + node_dir((b"", FILE)), "name is empty"),
        (MAGIC + node_dir((b".", FILE)), "not allowed"),
        (MAGIC + node_dir((b"..", FILE)), "not allowed"),
        (MAGIC + node_dir((b"a/b", FILE)), "'/' or NUL"),
        (MAGIC + node_dir((b"a\0", FILE)), "'/' or NUL"),
        (MAGIC + node_dir((b"n" * 1025, FILE)), "longer than the limit"),
        (MAGIC + s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"node"), "expected 'name'"),
        (MAGIC + (2**62).to_bytes(8, "little"), "expected '\\('"),  # a huge length is refused, not allocated
        (MAGIC + s(b"(") + s(b"type") + (2**63).to_bytes(8, "little"), "longer than the limit"),
    ],
)
def test_rejects(data, match):
    rejected(data, match)


def test_rejects_non_zero_padding_everywhere():
    base = MAGIC + node_dir((b"abc", ref_node(("file", b"hello", False))))
    # Padding follows the magic (13 bytes), "(" and the name "abc"; and the 5 content bytes of the file.
    for padded_token in (b"nix-archive-1\0", b"(\0", b"abc\0", b"hello\0"):
        i = base.index(padded_token) + len(padded_token) - 1
        bad = base[:i] + b"\x01" + base[i + 1 :]
        message = rejected(bad, "padding|bad magic")
        assert "byte" in message


def test_error_names_the_path_inside_the_archive():
    data = MAGIC + node_dir((b"share", node_dir((b"doc", node_dir((b"z", FILE), (b"y", FILE))))))
    assert "in /share/doc" in rejected(data, "out of order")


def test_depth_limit():
    tree: tuple = ("file", b"", False)
    for _ in range(10):
        tree = ("dir", {b"d": tree})
    data = ref_nar(tree)
    assert merged(read_nar([data], max_depth=10)) == merged(events_of(tree))
    with pytest.raises(InvalidNar, match="nested deeper"):
        list(read_nar([data], max_depth=9))


def test_deep_tree_without_recursion():
    depth = 1500
    data = MAGIC + s(b"(") + s(b"type") + s(b"directory")
    for _ in range(depth - 1):
        data += s(b"entry") + s(b"(") + s(b"name") + s(b"d") + s(b"node") + s(b"(") + s(b"type") + s(b"directory")
    data += s(b")") + (s(b")") + s(b")")) * (depth - 1)
    events = list(read_nar([data]))
    assert events.count(DirectoryStart()) == depth
    assert b"".join(write_nar(events)) == data


def test_errors_are_sticky():
    reader = NarReader()
    with pytest.raises(InvalidNar):
        reader.feed(b"garbage!" * 4)
    with pytest.raises(InvalidNar, match="bad magic"):
        reader.feed(MAGIC)
    with pytest.raises(InvalidNar, match="bad magic"):
        reader.end()


# -- writer misuse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "events, match",
    [
        ([Contents(b"x")], "expected a node"),
        ([Entry(b"a")], "expected a node"),
        ([DirectoryEnd()], "expected a node"),
        ([Symlink(b"t"), Contents(b"x")], "after the end"),
        ([Symlink(b"t"), Symlink(b"t")], "after the end"),
        ([RegularFile(2), Contents(b"abc")], "exceed the declared"),
        ([RegularFile(2), Contents(b"a"), DirectoryEnd()], "missing"),
        ([DirectoryStart(), Contents(b"a")], "expected an entry"),
        ([DirectoryStart(), RegularFile(0)], "expected an entry"),
        ([DirectoryStart(), Entry(b"b"), RegularFile(0), Entry(b"a")], "out of order"),
        ([DirectoryStart(), Entry(b"b"), RegularFile(0), Entry(b"b")], "duplicate"),
        ([DirectoryStart(), Entry(b"..")], "not allowed"),
        ([DirectoryStart(), Entry(b"a/b")], "'/' or NUL"),
        ([DirectoryStart(), Entry("a")], "must be bytes"),
        ([DirectoryStart(), Entry(b"a"), Entry(b"b")], "expected a node"),
        ([Symlink(b"")], "target is empty"),
        ([RegularFile(-1)], "64-bit"),
        ([RegularFile(2**64)], "64-bit"),
    ],
)
def test_writer_rejects(events, match):
    writer = NarWriter()
    with pytest.raises(InvalidNar, match=match):
        for e in events:
            writer.send(e)


@pytest.mark.parametrize("events", [[], [DirectoryStart()], [RegularFile(3), Contents(b"ab")], [DirectoryStart(), Entry(b"a")]])
def test_writer_refuses_incomplete_archives(events):
    writer = NarWriter()
    for e in events:
        writer.send(e)
    with pytest.raises(InvalidNar, match="incomplete"):
        writer.finish()
    with pytest.raises(InvalidNar, match="incomplete"):
        list(write_nar(events))


def test_write_nar_coalesces_small_pieces_and_passes_large_ones():
    big = b"z" * 200_000
    events = [DirectoryStart()]
    for i in range(100):
        events += [Entry(b"f%03d" % i), RegularFile(1), Contents(b"x")]
    events += [Entry(b"zz"), RegularFile(len(big)), Contents(big[:100_000]), Contents(big[100_000:]), DirectoryEnd()]
    pieces = list(write_nar(events, coalesce=4096))
    # ~19 KB of small tokens arrive as ~5 pieces, not 400; the first big half passes on as its own piece.
    assert big[:100_000] in pieces
    assert len(pieces) <= 10
    assert b"".join(pieces) == b"".join(write_nar(events, coalesce=1))
    assert nar.MAGIC in pieces[0]
