"""serving.routing.Router: queries of N-replica serving go to the replica holding the user's
cache; `least_loaded` places new users by outstanding work and moves a user off an overloaded
replica only between its queries."""

import collections
import random
import threading

import pytest

from hstu_exp.serving.routing import Router


def test_one_replica_takes_everything():
    router = Router(1, slack_rows=0)
    assert {router.route(u, 10) for u in range(50)} == {0}
    assert router.stats()["replica_queries"] == [50] and router.stats()["moves"] == 0


def test_hash_pins_each_user_for_good_and_spreads_many_users():
    router = Router(4, policy="hash", slack_rows=0)
    first = {u: router.route(u, 100) for u in range(2000)}
    for u in range(2000):  # however loaded the replicas are, a user keeps its replica
        assert router.route(u, 1) == first[u]
    counts = router.stats()["replica_users"]
    assert sum(counts) == 2000 and min(counts) > 400, counts  # 500 each, give or take
    assert Router(4, policy="hash", slack_rows=0).route(1234, 1) == first[1234]  # the same in every run


def test_new_users_go_to_the_least_loaded_replica():
    router = Router(3, slack_rows=0)
    assert [router.route(u, rows) for u, rows in [("a", 100), ("b", 50), ("c", 10)]] == [0, 1, 2]
    assert router.route("d", 5) == 2  # 100, 50, 10: the third has least
    assert router.load == [100, 50, 15]
    router.done("a", 0, 100)
    assert router.route("e", 1) == 0  # replica 0 drained


def test_a_pinned_user_stays_while_the_imbalance_is_within_bounds():
    router = Router(2, max_imbalance=0.5, slack_rows=0)
    assert router.route("a", 100) == 0
    assert router.route("b", 80) == 1
    router.done("a", 0, 100)
    router.route("x", 100)  # a new user: replica 0 (0 rows) -> loads 100, 80
    assert router.route("a", 10) == 0  # 100 <= 1.5 * 80: the cache wins
    assert router.stats()["moves"] == 0


def test_an_overloaded_replica_loses_a_user_between_its_queries():
    router = Router(2, max_imbalance=0.5, slack_rows=0)
    assert router.route("heavy", 1000) == 0
    assert router.route("a", 10) == 1
    router.done("a", 1, 10)
    assert router.route("a", 10) == 1  # replica 1 is the lighter one: a stays
    router.done("a", 1, 10)
    assert router.route("b", 10) == 1
    # "c" pinned on 0 before the load came
    router.done("heavy", 0, 1000)
    assert router.route("c", 5) == 0
    router.done("c", 0, 5)
    router.route("heavy", 1000)  # heavy stays home (0), loads 1000 vs 10
    assert router.route("c", 5) == 1  # 1000 > 1.5 * 10: c moves to replica 1
    stats = router.stats()
    assert stats["moves"] == 1 and stats["replica_moved_out"] == [1, 0]
    assert stats["replica_moved_in"] == [0, 1] and stats["replica_users"] == [1, 3]


def test_a_user_with_a_query_in_flight_is_not_moved():
    router = Router(2, max_imbalance=0.0, slack_rows=0)
    assert router.route("u", 500) == 0
    assert router.route("v", 1) == 1
    assert router.route("u", 5) == 0  # its first query is not answered: order comes first
    router.done("u", 0, 500)
    router.done("u", 0, 5)
    router.route("w", 400)  # loads: 400 (w, on the then-empty 0) ... and 1 on replica 1
    assert router.route("u", 5) == 1  # nothing in flight now, and 0 is the heavier
    assert router.stats()["moves"] == 1


def test_slack_rows_keep_small_differences_from_moving_users():
    router = Router(2, max_imbalance=0.0, slack_rows=64)
    router.route("a", 1)
    router.done("a", 0, 1)
    router.route("b", 50)  # on 0 (both empty; 0 first)
    assert router.route("a", 1) == 0  # 50 <= 0 * 1 + 64
    assert router.stats()["moves"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"replicas": 0},
        {"replicas": 2, "policy": "random"},
        {"replicas": 2, "max_imbalance": -1},
        {"replicas": 2, "slack_rows": -1},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Router(**{"slack_rows": 0, **bad})


def backlog(seed, ticks=300, capacity=700, replicas=4, **policy):
    """A closed loop in ticks: 20 random users a tick ask (those with nothing in flight), six
    of 200 users ask for 2000 rows, the rest for 50; each replica works off `capacity` rows a
    tick in arrival order (about 80 % busy in all). A moved user's query costs 4x its rows (its
    cache stayed behind). Returns the outstanding work of the busiest replica, averaged over the
    ticks (what the tail latency follows), and the moves."""
    rng = random.Random(seed)
    router = Router(replicas, **{"slack_rows": 0, **policy})
    rows_of = {u: 2000 if u < 6 else 50 for u in range(200)}
    home, queues = {}, [collections.deque() for _ in range(replicas)]
    in_flight, busiest = set(), []
    for _ in range(ticks):
        for u in rng.sample(range(200), 20):
            if u in in_flight:
                continue
            r = router.route(u, rows_of[u])
            rows = rows_of[u] * (4 if home.get(u, r) != r else 1)
            home[u] = r
            queues[r].append([u, rows])
            in_flight.add(u)
        busiest.append(max(router.load))
        for r, queue in enumerate(queues):
            budget = capacity
            while queue and budget:
                take = min(budget, queue[0][1])
                queue[0][1] -= take
                budget -= take
                if queue[0][1] == 0:
                    u, _ = queue.popleft()
                    router.done(u, r, rows_of[u])
                    in_flight.discard(u)
    return sum(busiest) / len(busiest), router.stats()["moves"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_loaded_with_slack_keeps_queues_shorter_than_hash_under_skew(seed):
    hashed, hash_moves = backlog(seed, policy="hash")
    eager, eager_moves = backlog(seed, policy="least_loaded")
    slack, slack_moves = backlog(seed, policy="least_loaded", slack_rows=4000)
    assert hash_moves == 0
    assert slack < hashed < eager, (slack, hashed, eager)  # moving on every difference costs
    assert slack_moves < eager_moves / 10, (slack_moves, eager_moves)


def test_route_and_done_from_several_threads_keep_the_books():
    router = Router(3, slack_rows=0)

    def client(k):
        for i in range(300):
            user = (k, i % 7)
            r = router.route(user, 3)
            router.done(user, r, 3)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert router.load == [0, 0, 0] and sum(router.stats()["replica_queries"]) == 1200
