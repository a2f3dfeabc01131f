"""Routing policies, by hand-computed numbers."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrouter.errors import ConfigError, InvalidRequest
from kvrouter.events.model import WorkerKey
from kvrouter.load.aggregator import EndpointMetrics
from kvrouter.routing.policies import (
    MAX_ROWS,
    POLICY_NAMES,
    CustomPolicy,
    KvCostPolicy,
    RequestView,
    RoutingOverrides,
    ScorePolicy,
    WorkerView,
    load_policy,
    make_policy,
)

W1, W2, W3 = WorkerKey(1), WorkerKey(2), WorkerKey(3)


def _endpoint(worker_id: int, usage: float) -> EndpointMetrics:
    return EndpointMetrics(
        worker_id=worker_id,
        dp_rank=0,
        request_active_slots=0,
        request_total_slots=0,
        num_requests_waiting=0,
        kv_active_blocks=0,
        kv_total_blocks=0,
        gpu_cache_usage_perc=usage,
        gpu_prefix_cache_hit_rate=0.0,
        age_s=0.0,
        stale=False,
        source="push",
    )


def _seed_views() -> tuple[RequestView, list[WorkerView]]:
    request = RequestView(
        "seed",
        num_tokens=20 * 16,
        num_blocks=20,
        overlaps={W1: 3, W2: 10, W3: 15},  # 15%, 50%, 75%
        block_size=16,
    )
    views = [
        WorkerView(w, metrics=_endpoint(w.worker_id, load), reported_load=load)
        for w, load in ((W1, 0.30), (W2, 0.50), (W3, 0.80))
    ]
    return request, views


def test_seed_score_example_exactly() -> None:
    request, views = _seed_views()
    decision = ScorePolicy(weight_cache=1.0, weight_load=1.0)(request, views)
    assert decision.worker == W2
    assert decision.policy == "score"
    assert [round(c.score or 0.0, 10) for c in decision.candidates] == [-0.15, 0.0, -0.05]
    assert [c.selected for c in decision.candidates] == [False, True, False]
    assert decision.explain() == [
        "Worker 1: 15% cache hit, 30% load -> score -0.15",
        "Worker 2: 50% cache hit, 50% load -> score 0.00 (Selected)",
        "Worker 3: 75% cache hit, 80% load -> score -0.05",
    ]
    assert decision.overlap_blocks == 10


def test_score_weights_and_overrides() -> None:
    request, views = _seed_views()
    # caching weighed 2x: 0.0, 0.5, 0.7 -> worker 3
    assert ScorePolicy(weight_cache=2.0)(request, views).worker == W3
    override = RequestView(**{**_fields(request), "overrides": RoutingOverrides(weight_cache=2.0)})
    assert ScorePolicy()(override, views).worker == W3


def _fields(request: RequestView) -> dict[str, object]:
    return {name: getattr(request, name) for name in RequestView.__slots__}


def _kv_request(**overlaps: int) -> RequestView:
    return RequestView(
        "r",
        num_tokens=64,
        num_blocks=4,
        overlaps={WorkerKey(int(k[1:])): v for k, v in overlaps.items()},
        block_size=16,
    )


def test_kv_cost_by_hand() -> None:
    request = _kv_request(w1=2, w3=4)
    views = [
        WorkerView(W1, prefill_tokens=32, active_blocks=10),  # (32+32)/16=4, 10+4=14 -> 18
        WorkerView(W2, prefill_tokens=0, active_blocks=4),  # (0+64)/16=4, 4+4=8 -> 12
        WorkerView(W3, prefill_tokens=64, active_blocks=20),  # (64+0)/16=4, 20+4=24 -> 28
    ]
    decision = KvCostPolicy()(request, views)
    assert decision.worker == W2
    assert [c.score for c in decision.candidates] == [18.0, 12.0, 28.0]
    assert [(c.prefill_blocks, c.decode_blocks) for c in decision.candidates] == [
        (4.0, 14.0),
        (4.0, 8.0),
        (4.0, 24.0),
    ]
    assert decision.explain()[1] == (
        "Worker 2: 0% cache hit, 0% load, 4.00 prefill + 8.00 decode blocks"
        " -> cost 12.00 (Selected)"
    )


def test_kv_blocks_already_active_are_not_new() -> None:
    request = RequestView(
        "r", num_tokens=70, num_blocks=4, overlaps={}, block_size=16, shared_active={W1: 3}
    )
    # 70 tokens occupy 5 blocks (a partial tail); 3 are already active on W1
    assert request.new_blocks(W1) == 2
    assert request.new_blocks(W2) == 5
    views = [WorkerView(W1, active_blocks=3), WorkerView(W2)]
    decision = KvCostPolicy()(request, views)
    # W1: 70/16 + 3 + 2 = 9.375; W2: 70/16 + 0 + 5 = 9.375 -> tie, both trees 0 -> random
    assert decision.candidates[0].score == decision.candidates[1].score == 9.375


def test_kv_overlap_weight_and_ties() -> None:
    request = RequestView(
        "r",
        num_tokens=64,
        num_blocks=4,
        overlaps={W1: 4},
        block_size=16,
        tree_sizes={W1: 100, W2: 50},
    )
    views = [
        WorkerView(W1, active_blocks=12),  # 0 prefill, 16 decode
        WorkerView(W2),  # 4 prefill, 4 decode
    ]
    assert KvCostPolicy()(request, views).worker == W2  # 16 vs 8
    assert KvCostPolicy(overlap_weight=4.0)(request, views).worker == W1  # 16 vs 20
    # weight 3: 16 vs 16, a tie -> the smaller tree
    tie = RequestView(**{**_fields(request), "overrides": RoutingOverrides(overlap_weight=3.0)})
    decision = KvCostPolicy()(tie, views)
    assert [c.score for c in decision.candidates] == [16.0, 16.0]
    assert decision.worker == W2
    # equal trees too -> random (seeded)
    equal = [WorkerView(W1, active_blocks=12), WorkerView(W2)]
    same_trees = RequestView(**{**_fields(request), "tree_sizes": {W1: 7, W2: 7}})
    policy = KvCostPolicy(overlap_weight=3.0, rng=random.Random(1))
    picks = Counter(policy(same_trees, equal).worker for _ in range(200))
    assert set(picks) == {W1, W2}
    assert 70 <= picks[W1] <= 130


def test_kv_temperature_samples_softmax_of_normalised_costs() -> None:
    request = _kv_request(w1=4)
    views = [WorkerView(W1), WorkerView(W2)]  # costs 4 and 8 -> normalised 0 and 1
    policy = KvCostPolicy(temperature=1.0, rng=random.Random(42))
    picks = [policy(request, views).worker for _ in range(2000)]
    # with T=1: weights e^0 and e^-1, P(W1) = 1 / (1 + e^-1)
    p_w1 = 1.0 / (1.0 + math.exp(-1.0))
    replay = random.Random(42)
    expected = [W1 if replay.random() * (1 + math.exp(-1.0)) < 1.0 else W2 for _ in range(2000)]
    assert picks == expected
    assert picks.count(W1) / 2000 == pytest.approx(p_w1, abs=0.03)
    # the override turns sampling off
    greedy = RequestView(**{**_fields(request), "overrides": RoutingOverrides(temperature=0.0)})
    assert {policy(greedy, views).worker for _ in range(50)} == {W1}


def test_kv_temperature_with_equal_costs_is_uniform() -> None:
    request = _kv_request()
    policy = KvCostPolicy(temperature=0.5, rng=random.Random(3))
    picks = Counter(policy(request, [WorkerView(W1), WorkerView(W2)]).worker for _ in range(400))
    assert 160 <= picks[W1] <= 240


def test_random_and_round_robin() -> None:
    request = _kv_request()
    views = [WorkerView(W3), WorkerView(W1), WorkerView(W2)]
    rr = make_policy("round_robin")
    assert [rr(request, views).worker for _ in range(4)] == [W1, W2, W3, W1]
    rand = make_policy("random", rng=random.Random(0))
    picks = Counter(rand(request, views).worker for _ in range(300))
    assert set(picks) == {W1, W2, W3}
    decision = rand(request, views)
    assert decision.policy == "random"
    assert all(c.score is None for c in decision.candidates)
    lines = decision.explain()
    assert sum(line.endswith("(Selected)") for line in lines) == 1
    assert not any("->" in line for line in lines)  # nothing is scored


def test_direct() -> None:
    views = [WorkerView(W1), WorkerView(W2)]
    direct = make_policy("direct")
    target = RequestView("r", 16, 1, {}, 16, target=W2)
    decision = direct(target, views)
    assert (decision.worker, decision.policy) == (W2, "direct")
    with pytest.raises(InvalidRequest, match="unknown worker"):
        direct(RequestView("r", 16, 1, {}, 16, target=W3), views)
    with pytest.raises(InvalidRequest, match="needs a target"):
        direct(RequestView("r", 16, 1, {}, 16), views)


def test_least_loaded_and_power_of_two() -> None:
    request = _kv_request()
    views = [
        WorkerView(W1, active_blocks=50, total_blocks=100),  # 50%
        WorkerView(W2, reported_load=0.2),  # 20%
        WorkerView(W3, active_blocks=10, total_blocks=100, reported_load=0.4),  # 40%
    ]
    assert [v.load for v in views] == [0.5, 0.2, 0.4]
    least = make_policy("least_loaded", rng=random.Random(0))
    decision = least(request, views)
    assert decision.worker == W2
    assert decision.explain()[1] == "Worker 2: 0% cache hit, 20% load -> load 0.20 (Selected)"
    p2c = make_policy("power_of_two", rng=random.Random(5))
    for _ in range(50):
        d = p2c(request, views)
        assert len(d.candidates) == 2
        chosen = next(c for c in d.candidates if c.selected)
        other = next(c for c in d.candidates if not c.selected)
        assert chosen.load <= other.load
    # the most loaded worker is always drawn against a less loaded one, so never wins
    assert all(p2c(request, views).worker != W1 for _ in range(50))
    single = p2c(request, views[:1])
    assert single.worker == W1


def test_least_loaded_falls_back_to_router_counts() -> None:
    request = _kv_request()
    views = [WorkerView(W1, prefill_tokens=100), WorkerView(W2, prefill_tokens=10)]
    assert make_policy("least_loaded")(request, views).worker == W2


def test_custom_policy_by_import_path() -> None:
    policy = load_policy("tests.unit.routing.custom_policy_mod:prefer_cache_then_idle")
    assert policy.name == "tests.unit.routing.custom_policy_mod:prefer_cache_then_idle"
    request, views = _seed_views()
    # longest match is worker 3 (75%, load 0.8 <= 0.9)
    assert policy(request, views).worker == W3
    hot = [*views[:2], WorkerView(W3, metrics=_endpoint(3, 0.95), reported_load=0.95)]
    assert policy(request, hot).worker == W2
    # make_policy routes a path to load_policy, dotted paths work too
    dotted = make_policy("tests.unit.routing.custom_policy_mod:prefer_cache_then_idle")
    assert dotted(request, views).worker == W3
    assert (
        load_policy("tests.unit.routing.custom_policy_mod.prefer_cache_then_idle")(
            request, views
        ).worker
        == W3
    )


def test_custom_policy_picks_the_rank_with_the_longest_match() -> None:
    a, b = WorkerKey(4, 0), WorkerKey(4, 1)
    request = RequestView("r", 64, 4, {a: 1, b: 3}, 16)
    policy = CustomPolicy(lambda matches, metrics: 4, name="four")
    assert policy(request, [WorkerView(a), WorkerView(b)]).worker == b
    assert CustomPolicy(lambda m, x: b)(request, [WorkerView(a), WorkerView(b)]).worker == b


def test_custom_policy_errors() -> None:
    bad = load_policy("tests.unit.routing.custom_policy_mod:returns_unknown")
    request, views = _seed_views()
    with pytest.raises(ConfigError, match="999"):
        bad(request, views)
    with pytest.raises(ConfigError, match="cannot import"):
        load_policy("tests.unit.routing.no_such_module:func")
    with pytest.raises(ConfigError, match="no callable"):
        load_policy("tests.unit.routing.custom_policy_mod:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="must look like"):
        load_policy("nodots")


def test_make_policy_registry() -> None:
    assert POLICY_NAMES == (
        "random",
        "round_robin",
        "direct",
        "power_of_two",
        "least_loaded",
        "kv",
        "score",
        "prefix_affinity",
    )
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    kv = make_policy("kv", overlap_weight=2.0, temperature=0.5)
    assert isinstance(kv, KvCostPolicy)
    assert (kv.overlap_weight, kv.temperature) == (2.0, 0.5)
    with pytest.raises(ValueError, match=r"unknown policy 'fastest'; valid: random, round_robin"):
        make_policy("fastest")
    with pytest.raises(ConfigError, match="bad parameters for policy 'kv'"):
        make_policy("kv", nonsense=1)
    with pytest.raises(ConfigError, match="overlap_weight must be >= 0"):
        make_policy("kv", overlap_weight=-1.0)


def test_overrides_from_mapping() -> None:
    assert RoutingOverrides.from_mapping({"temperature": 1, "overlap_weight": None}) == (
        RoutingOverrides(temperature=1.0)
    )
    with pytest.raises(InvalidRequest, match="unknown routing override"):
        RoutingOverrides.from_mapping({"temp": 1.0})
    with pytest.raises(InvalidRequest, match="must be a number"):
        RoutingOverrides.from_mapping({"temperature": "hot"})


def test_large_fleets_keep_the_best_rows() -> None:
    workers = [WorkerKey(i) for i in range(40)]
    views = [WorkerView(w, active_blocks=100 - i) for i, w in enumerate(workers)]
    request = RequestView("r", 64, 4, {workers[0]: 4}, 16)
    decision = KvCostPolicy()(request, views)
    # worker 0: 0 + 100 + 4 = 104; worker i > 0: 4 + (100 - i) + 4 -> worker 39 wins (69)
    assert decision.worker == workers[39]
    assert decision.num_candidates == 40
    assert len(decision.candidates) == MAX_ROWS
    shown = [c.worker.worker_id for c in decision.candidates]
    assert shown == list(range(24, 40))  # the 16 cheapest, in worker order
    lines = decision.explain()
    assert lines[-1] == "... and 24 more candidates"
    assert lines[-2].endswith("cost 69.00 (Selected)")


CWD_PACKAGE = "kvr_cwd_policy_pkg"


@pytest.fixture
def in_policy_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's policy package in the working directory, which (as under the ``kvrouter``
    console script) is not on ``sys.path``."""
    package = tmp_path / CWD_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "routing.py").write_text(
        "def lowest_id(matches, metrics):\n    return min(matches)\n"
    )
    (package / "needs_more.py").write_text("import kvr_not_installed_dep\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [n for n in sys.modules if n.partition(".")[0] == CWD_PACKAGE]:
        del sys.modules[name]


def test_user_policy_is_found_in_the_working_directory(in_policy_dir: Path) -> None:
    assert importlib.util.find_spec(CWD_PACKAGE) is None  # not on sys.path
    policy = load_policy(f"{CWD_PACKAGE}.routing:lowest_id")
    request, views = _seed_views()
    lowest = min(view.worker.worker_id for view in views)
    assert policy(request, views).worker.worker_id == lowest
    # It stays there: the module may import its siblings later on.
    assert sys.path[0] == str(in_policy_dir)
    assert (
        make_policy(f"{CWD_PACKAGE}.routing:lowest_id").name == f"{CWD_PACKAGE}.routing:lowest_id"
    )


def test_user_policy_missing_everywhere(in_policy_dir: Path) -> None:
    before = list(sys.path)
    with pytest.raises(ConfigError) as caught:
        load_policy("kvr_no_such_pkg.routing:func")
    assert str(caught.value) == (
        "cannot import policy module 'kvr_no_such_pkg.routing' (looked on sys.path and in "
        f"{in_policy_dir}): No module named 'kvr_no_such_pkg'"
    )
    assert sys.path == before


def test_user_policy_with_a_missing_dependency(in_policy_dir: Path) -> None:
    before = list(sys.path)
    with pytest.raises(ConfigError, match="No module named 'kvr_not_installed_dep'"):
        load_policy(f"{CWD_PACKAGE}.needs_more:func")
    assert sys.path == before
