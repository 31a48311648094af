"""Pure routing pieces: the DHT key of each alias kind, and one lookup as a state machine (no sockets)."""

import base64
import hashlib

import pytest

from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.nixbase32 import encode as nix32
from p2pcache.errors import InvalidKey
from p2pcache.routing import NIX_NAMESPACE, Announcements, ProviderQuery, dht_key, nix_alias
from p2pcache.routing.query import distance

DATA = b"an archive's bytes"
SHA256 = hashlib.sha256(DATA).digest()
SHA512 = hashlib.sha512(DATA).digest()
STORE_HASH = "7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5"


# -- dht_key --------------------------------------------------------------------------------------


def test_sha256_alias_is_the_sha2_256_multihash_and_the_raw_cid_key():
    key = dht_key("sha256:" + SHA256.hex())
    assert key == b"\x12\x20" + SHA256
    assert key == dht_key(str(CID.for_block(RAW, DATA)))  # same bytes as a raw block: same key


def test_every_form_of_a_hash_gives_one_key():
    forms = ["sha256:" + SHA256.hex(), SHA256.hex(), "sha256-" + base64.b64encode(SHA256).decode(),
             "sha256:" + nix32(SHA256), nix32(SHA256), "SHA256:" + SHA256.hex().upper()]
    assert {dht_key(f) for f in forms} == {b"\x12\x20" + SHA256}
    assert dht_key("sha512:" + SHA512.hex()) == b"\x13\x40" + SHA512
    assert dht_key("sha512-" + base64.b64encode(SHA512).decode()) == b"\x13\x40" + SHA512


def test_root_cid_alias_is_its_multihash():
    root = CID.for_block(DAG_CBOR, b"manifest")
    assert dht_key(str(root)) == root.multihash == b"\x12\x20" + hashlib.sha256(b"manifest").digest()


def test_nix_alias_is_namespaced():
    key = dht_key(nix_alias(STORE_HASH))
    assert key == b"\x12\x20" + hashlib.sha256(b"/p2pcache/nix-store-path/" + STORE_HASH.encode()).digest()
    assert NIX_NAMESPACE == b"/p2pcache/nix-store-path/"
    assert len({key, dht_key("sha256:" + hashlib.sha256(STORE_HASH.encode()).hexdigest())}) == 2


@pytest.mark.parametrize("alias", ["nix:" + STORE_HASH[:-1], "nix:" + STORE_HASH.upper(), "nix:" + "e" * 32,
                                   "sha256:abc", "", "hello", "md5:" + "00" * 16])
def test_bad_aliases_are_refused(alias):
    with pytest.raises(InvalidKey):
        dht_key(alias)


# -- Announcements --------------------------------------------------------------------------------


def test_shared_keys_stay_until_the_last_root_goes():
    a, b = CID.for_block(DAG_CBOR, b"a"), CID.for_block(DAG_CBOR, b"b")
    shared = "sha256:" + SHA256.hex()
    ann = Announcements()
    assert ann.add(a, [shared]) == {dht_key(str(a)), dht_key(shared)}
    assert ann.add(b, [shared]) == {dht_key(str(b))}  # the shared key is not new
    assert ann.add(b, [shared]) == set()
    assert ann.remove(a) == {dht_key(str(a))}
    assert dht_key(shared) in ann
    assert ann.remove(b) == {dht_key(str(b)), dht_key(shared)}
    assert ann.keys() == [] and ann.remove(b) == set()


# -- ProviderQuery --------------------------------------------------------------------------------

KEY = dht_key("sha256:" + SHA256.hex())


def peer_bytes(p: str) -> bytes:
    return p.encode()


def line(n: int) -> dict[str, list[str]]:
    """p0 - p1 - ... - p(n-1): each peer knows only its neighbours."""
    return {f"p{i}": [f"p{j}" for j in (i - 1, i + 1) if 0 <= j < n] for i in range(n)}


def run(query, graph, holders, fail=()):
    """Drive the machine to the end, answering in the order questions were asked."""
    order = []
    while not query.done:
        asked = []
        while (p := query.next_peer()) is not None:
            asked.append(p)
        assert asked, "not done but nothing to ask"
        assert len(asked) <= query.alpha
        for p in asked:
            order.append(p)
            if p in fail:
                query.on_failure(p)
            else:
                query.on_answer(p, [(h, f"info:{h}") for h in holders.get(p, ())], graph[p])
    return order


def test_lookup_walks_a_line_and_counts_hops():
    graph = line(8)
    q = ProviderQuery(KEY, peer_bytes, self_peer="p0", alpha=3)
    q.add_seeds(graph["p0"])
    order = run(q, graph, {"p6": ["p7"]})
    assert q.found and q.providers == {"p7": "info:p7"}
    assert q.stats.found_at_hop == 6  # p1 is hop 1, p6 hop 6
    assert q.hop_of("p6") == 6
    assert order == [f"p{i}" for i in range(1, 7)]
    assert q.stats.asked == 6 and q.stats.max_hop == 6


def test_lookup_stops_at_the_first_provider_and_keeps_alpha_in_flight():
    graph = {"me": ["a", "b", "c", "d"], "a": [], "b": [], "c": [], "d": []}
    q = ProviderQuery(KEY, peer_bytes, self_peer="me", alpha=2)
    q.add_seeds(graph["me"])
    first, second = q.next_peer(), q.next_peer()
    assert q.next_peer() is None and q.in_flight == 2  # alpha bound
    assert distance(KEY, first.encode()) < distance(KEY, second.encode())  # closest first
    q.on_answer(second, [("x", "info:x")], [])
    assert q.done and q.next_peer() is None  # the first still in flight does not matter any more
    assert q.stats.found_at_hop == 1


def test_miss_ends_when_everyone_was_asked_or_failed():
    graph = line(5)
    q = ProviderQuery(KEY, peer_bytes, self_peer="p0", alpha=3)
    q.add_seeds(graph["p0"])
    run(q, graph, {}, fail={"p2"})  # p2 fails, so p3 and p4 are never heard of
    assert q.done and not q.found
    assert (q.stats.asked, q.stats.answered, q.stats.failed) == (2, 1, 1)


def test_ourselves_is_neither_asked_nor_a_provider_and_want_waits_for_more():
    graph = {"me": ["a", "b"], "a": ["me", "b"], "b": ["me"]}
    q = ProviderQuery(KEY, peer_bytes, self_peer="me", alpha=1, want=2)
    q.add_seeds(graph["me"] + ["me"])
    run(q, graph, {"a": ["me", "z"], "b": ["y"]})
    assert set(q.providers) == {"z", "y"}
    assert q.stats.asked == 2


def test_misuse_is_refused():
    q = ProviderQuery(KEY, peer_bytes)
    q.add_seeds(["a"])
    with pytest.raises(ValueError):
        q.on_answer("a", [], [])  # never asked
    with pytest.raises(ValueError):
        ProviderQuery(KEY, peer_bytes, alpha=0)


def test_max_asks_bounds_a_lookup():
    graph = line(50)
    q = ProviderQuery(KEY, peer_bytes, self_peer="p0", alpha=3, max_asks=10)
    q.add_seeds(graph["p0"])
    run(q, graph, {"p40": ["p41"]})
    assert q.done and not q.found and q.stats.asked == 10


def test_in_flight_is_kept_equal_to_the_peers_being_asked():
    """The kept counter `in_flight` and the candidates' states agree after every step (answers, failures,
    refused misuse), and a candidate's state only moves NEW -> ASKING -> ANSWERED/FAILED."""
    from p2pcache.routing.errors import RoutingUsageError
    from p2pcache.routing.query import CandidateState

    graph = line(12)
    q = ProviderQuery(KEY, peer_bytes, self_peer="p0", alpha=3)
    q.add_seeds(graph["p0"])
    order = {CandidateState.NEW: 0, CandidateState.ASKING: 1, CandidateState.ANSWERED: 2, CandidateState.FAILED: 2}
    seen: dict[str, CandidateState] = {}

    def check() -> None:
        states = {p: q.state_of(p) for p in graph if q.state_of(p) is not None}
        assert q.in_flight == sum(1 for s in states.values() if s is CandidateState.ASKING)
        for p, s in states.items():
            assert order[s] >= order[seen.get(p, CandidateState.NEW)]
            seen[p] = s

    step = 0
    while not q.done:
        asked = []
        while (p := q.next_peer()) is not None:
            asked.append(p)
            check()
        for p in asked:
            step += 1
            if step % 3 == 0:
                q.on_failure(p)
            else:
                q.on_answer(p, [("p11", "info")] if p == "p10" else [], graph[p])
            check()
            with pytest.raises(RoutingUsageError):
                q.on_failure(p)  # settled already
            check()
    assert q.state_of("nobody") is None
