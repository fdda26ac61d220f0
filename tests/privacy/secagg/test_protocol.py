"""The SecAgg / SecAgg+ protocol end to end between SecAggClient and SecAggServer objects."""

import numpy as np
import pytest
from scipy import stats

from fedlearn.errors import ConfigError
from fedlearn.privacy.secagg.client import SecAggClient, SecAggProtocolError, b64, unb64
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.graph import hypergeometric_tail, neighbour_graph, secagg_plus_parameters
from fedlearn.privacy.secagg.server import SecAggAborted, SecAggServer, resolve_threshold


class Round:
    """n clients and a server through the four steps; inputs and dropouts chosen by the test."""

    def __init__(self, n, threshold, length=500, degree=None, bits=32, clip=1.0, max_weight=50, seed=0):
        self.ids = [f"client-{i:02d}" for i in range(n)]
        self.fp = FixedPoint(bits, clip, n, max_weight, length)
        self.server = SecAggServer(1, self.ids, self.fp, threshold=threshold, degree=degree, seed=seed)
        self.clients = {c: SecAggClient(c, 1) for c in self.ids}
        self.rng = np.random.default_rng(seed)
        self.updates = {c: self.rng.uniform(-clip, clip, length) for c in self.ids}
        self.weights = {c: int(self.rng.integers(1, max_weight + 1)) for c in self.ids}
        self.masked = {}

    def setup(self):
        requests = self.server.receive_keys({c: self.clients[c].advertise() for c in self.ids})
        self.mask_requests = self.server.receive_shares(
            {c: self.clients[c].share_keys(requests[c]) for c in self.ids})

    def mask(self, senders):
        for c in senders:
            encoded = self.fp.encode(self.updates[c], self.weights[c], [], self.rng)
            y, rejected = self.clients[c].mask(self.mask_requests[c], encoded, self.fp.bits)
            self.masked[c] = y
            self.server.add_input(c, y, rejected)

    def unmask(self, responders):
        requests = self.server.unmask_requests()
        return self.server.finish({c: self.clients[c].unmask(requests[c]) for c in responders if c in requests})

    def check_sum(self, total, survivors):
        weighted, total_weight, _ = self.fp.decode(total, len(survivors))
        plain = sum(self.weights[c] * self.updates[c] for c in survivors)
        assert total_weight == sum(self.weights[c] for c in survivors)  # the weight is exact
        assert np.abs(weighted - plain).max() <= self.fp.error_bound(len(survivors))


def test_sum_equals_plain_weighted_sum_within_quantization_bound():
    r = Round(10, 7)
    r.setup()
    r.mask(r.ids)
    r.check_sum(r.unmask(r.ids), r.ids)


def test_twenty_clients_threshold_twelve_survive_eight_dropouts_after_masking():
    r = Round(20, 12)
    r.setup()
    survivors = r.ids[8:]
    r.mask(r.ids)
    for c in r.ids[:8]:  # they sent masked input, then vanished before unmasking
        r.server.inputs.pop(c)
    r.check_sum(r.unmask(survivors), survivors)


def test_nine_dropouts_abort_the_round_without_unmasking():
    r = Round(20, 12)
    r.setup()
    r.mask(r.ids[9:])  # 11 survivors < t = 12
    with pytest.raises(SecAggAborted, match="fewer than the threshold 12"):
        r.server.unmask_requests()


def test_dropouts_during_unmasking_are_tolerated_down_to_the_threshold():
    r = Round(12, 8)
    r.setup()
    r.mask(r.ids)
    r.check_sum(r.unmask(r.ids[:8]), r.ids)  # four survivors never answer the unmask request
    r2 = Round(12, 8)
    r2.setup()
    r2.mask(r2.ids)
    with pytest.raises(SecAggAborted):
        r2.unmask(r2.ids[:7])


def test_secagg_plus_with_dropouts_is_exact():
    r = Round(40, 24, degree=12)
    r.setup()
    assert all(len(v) == 12 for v in r.server.graph.values())
    r.mask(r.ids)
    for c in r.ids[:4]:
        r.server.inputs.pop(c)
    r.check_sum(r.unmask(r.ids[4:]), r.ids[4:])


def test_small_bit_width_still_exact_within_its_coarser_bound():
    r = Round(10, 6, bits=20, max_weight=10)
    r.setup()
    r.mask(r.ids)
    r.check_sum(r.unmask(r.ids), r.ids)


def test_tampered_relayed_share_makes_its_sender_dropped():
    r = Round(10, 6)
    r.setup()
    victim, sender = r.ids[0], r.ids[3]
    text = bytearray(unb64(r.mask_requests[victim]["ciphertexts"][sender]))
    text[-1] ^= 0x01  # the server (or the network) flips one bit of a relayed share
    r.mask_requests[victim]["ciphertexts"][sender] = b64(bytes(text))
    r.mask(r.ids)
    assert r.server.rejected == {sender}
    requests = r.server.unmask_requests()
    assert sender not in r.server.survivors and sender in r.server.dropped
    total = r.server.finish({c: r.clients[c].unmask(requests[c]) for c in r.server.survivors})
    r.check_sum(total, [c for c in r.ids if c != sender])


def _uniformity_pvalue(values: np.ndarray, bits: int = 32) -> float:
    top = (values.astype(np.uint64) >> np.uint64(bits - 8)).astype(np.int64)  # 256 bins of the high byte
    return stats.chisquare(np.bincount(top, minlength=256)).pvalue


def test_masked_inputs_look_uniform_and_alike_for_different_inputs():
    r = Round(5, 3, length=200_000, seed=7)
    r.updates[r.ids[0]] = np.full(200_000, -1.0)  # two extreme, very different inputs
    r.updates[r.ids[1]] = np.full(200_000, 1.0)
    r.setup()
    r.mask(r.ids)
    a, b = r.masked[r.ids[0]], r.masked[r.ids[1]]
    # Without masks these would be a single value each; with them both are uniform on Z_2^32.
    assert _uniformity_pvalue(a) > 1e-6 and _uniformity_pvalue(b) > 1e-6
    table = np.stack([np.bincount((v >> np.uint32(24)).astype(np.int64), minlength=256) for v in (a, b)])
    assert stats.chi2_contingency(table).pvalue > 1e-6
    encoded = r.fp.encode(r.updates[r.ids[0]], r.weights[r.ids[0]], [], r.rng)
    assert _uniformity_pvalue(encoded) < 1e-100  # the test can tell: an unmasked input is far from uniform


def test_client_never_reveals_both_secrets_of_one_peer_or_unmasks_twice():
    r = Round(5, 3)
    r.setup()
    r.mask(r.ids)
    client = r.clients[r.ids[0]]
    with pytest.raises(SecAggProtocolError, match="both secrets"):
        client.unmask({"dropped": [r.ids[1]], "survivors": [r.ids[0], r.ids[1]]})
    client.unmask({"dropped": [], "survivors": r.ids})
    with pytest.raises(SecAggProtocolError):
        client.unmask({"dropped": [r.ids[1]], "survivors": []})  # a second request could combine answers


def test_client_refuses_forged_keys_and_out_of_order_steps():
    client = SecAggClient("a", 1)
    with pytest.raises(SecAggProtocolError):
        client.share_keys({"peers": {}, "threshold": 2})  # before advertising
    client.advertise()
    other = SecAggClient("b", 1).advertise()
    with pytest.raises(SecAggProtocolError, match="not this client's"):
        client.share_keys({"threshold": 2, "peers": {"a": {"x": 1, **other}, "b": {"x": 2, **other}}})


def test_fewer_advertisers_than_threshold_abort_before_any_secret_is_shared():
    r = Round(6, 5)
    with pytest.raises(SecAggAborted, match="key advertisement"):
        r.server.receive_keys({c: r.clients[c].advertise() for c in r.ids[:4]})


def test_fixed_point_refuses_overflowing_configurations():
    with pytest.raises(ConfigError, match="overflow"):
        FixedPoint(16, 1.0, 100, 1000, 10)
    fp = FixedPoint(32, 1.0, 100, 50, 4)
    assert 100 * fp.levels < 2**32
    with pytest.raises(ConfigError, match="secagg-max-weight"):
        fp.encode(np.zeros(4), 51, [], np.random.default_rng(0))


def test_stochastic_rounding_is_unbiased():
    fp = FixedPoint(12, 1.0, 1, 1, 20_000)  # coarse grid: 4095 steps over [-1, 1]
    value = np.full(20_000, 0.123456)
    decoded, _, _ = fp.decode(fp.encode(value, 1, [], np.random.default_rng(0)), 1)
    assert abs(decoded.mean() - 0.123456) < 4 * fp.step / np.sqrt(20_000)
    assert np.abs(decoded - value).max() < fp.step


def test_neighbour_graph_is_symmetric_regular_and_seeded():
    ids = [f"c{i}" for i in range(30)]
    g = neighbour_graph(ids, 6, seed=1)
    assert all(len(v) == 6 and c not in v for c, v in g.items())
    assert all(c in g[v] for c, vs in g.items() for v in vs)
    assert g == neighbour_graph(ids, 6, seed=1) and g != neighbour_graph(ids, 6, seed=2)
    assert neighbour_graph(ids, None, 0)["c0"] == set(ids) - {"c0"}
    unseeded = neighbour_graph(ids, 6, None)  # the OS's CSPRNG: still 6-regular and symmetric
    assert all(len(v) == 6 and all(c in unseeded[p] for p in v) for c, v in unseeded.items())


def test_hypergeometric_tail_is_exact():
    # 2 marked of 5, draw 3: P[>= 1] = 1 - C(3,3)/C(5,3) = 0.9, P[>= 2] = C(2,2) C(3,1) / C(5,3) = 0.3
    assert abs(hypergeometric_tail(5, 2, 3, 1) - 0.9) < 1e-12
    assert abs(hypergeometric_tail(5, 2, 3, 2) - 0.3) < 1e-12
    assert hypergeometric_tail(5, 2, 3, 3) == 0.0 and abs(hypergeometric_tail(5, 2, 3, 0) - 1.0) < 1e-12


def test_secagg_plus_parameters_meet_2_to_the_minus_40_and_t_over_half():
    for n in (100, 1000, 10_000):
        k, t = secagg_plus_parameters(n, 1 / 3, 0.1)
        assert k % 2 == 0 and 2 * t > k + 1 and t <= k
        bad, gone = n // 3, n // 10
        assert n * hypergeometric_tail(n - 1, bad, k, t) <= 2.0 ** -41  # no client has t colluding neighbours
        assert n * hypergeometric_tail(n - 1, gone, k, k - t + 1) <= 2.0 ** -20  # every client keeps t
        assert n * hypergeometric_tail(n, bad + gone, k // 2, k // 2) <= 2.0 ** -41  # no cutting run of k/2
        # k - 2 fails one of them: k is the fewest
        smaller = k - 2
        ok = any(n * hypergeometric_tail(n - 1, bad, smaller, u) <= 2.0 ** -41
                 and n * hypergeometric_tail(n - 1, gone, smaller, smaller - u + 1) <= 2.0 ** -20
                 for u in range((smaller + 1) // 2 + 1, smaller + 1))
        assert not ok or n * hypergeometric_tail(n, bad + gone, smaller // 2, smaller // 2) > 2.0 ** -41
    assert secagg_plus_parameters(100, 1 / 3, 0.1) == (60, 34)  # against 2 log2 n = 14 before
    assert secagg_plus_parameters(10, 1 / 3, 0.1) is None  # only the complete graph gives 2^-40 there
    assert secagg_plus_parameters(1000, 1 / 3, 0.1)[0] < 1000 // 5  # sub-linear: it pays at scale
    assert secagg_plus_parameters(10_000, 0.49, 0.49) is None  # nothing up to MAX_DEGREE: the complete graph


def test_threshold_forms():
    assert resolve_threshold(0.6, 20) == 12
    assert resolve_threshold(12, 20) == 12
    assert resolve_threshold(2, 20) == resolve_threshold(0.51, 20) == 11  # always more than half
    for bad in (1.5, 0.5, 0.3):
        with pytest.raises(Exception, match="secagg-threshold"):
            resolve_threshold(bad, 20)
    with pytest.raises(Exception, match="more than half"):
        SecAggServer(1, [f"c{i}" for i in range(10)], FixedPoint(32, 1.0, 10, 1, 4), threshold=5)


def test_a_client_refuses_a_threshold_of_half_its_holders_or_less():
    """An active server asking for t <= k/2 could collect a client's mask key from one half of its holders and its
    self seed from the other, and unmask its input: the client shares nothing then."""
    clients = {c: SecAggClient(c, 1) for c in "abcd"}
    peers = {c: {"x": i + 1, **client.advertise()} for i, (c, client) in enumerate(clients.items())}
    for threshold in (1, 2):
        with pytest.raises(SecAggProtocolError, match="must exceed half"):
            clients["a"].share_keys({"threshold": threshold, "peers": peers})
    assert clients["a"].share_keys({"threshold": 3, "peers": peers})["ciphertexts"]


def test_the_neighbour_graph_is_fresh_randomness_not_the_run_seed():
    ids = [f"c{i:02d}" for i in range(30)]
    graphs = []
    for _ in range(2):
        server = SecAggServer(1, ids, FixedPoint(32, 1.0, 30, 1, 4), threshold=20, degree=6)  # no seed
        server.receive_keys({c: SecAggClient(c, 1).advertise() for c in ids})
        graphs.append(server.graph)
    assert graphs[0] != graphs[1]  # equal with probability ~1e-30
