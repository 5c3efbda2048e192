"""The max-QPS search both clocks use (serving/search.py): a bracket by doubling and halving,
then bisection; the rates tried, in order, against a server that passes up to a known rate."""

from hstu_exp.serving.search import MAX_BRACKET_TRIALS, max_rate


def server(limit):
    tried = []

    def passes(rate):
        tried.append(rate)
        return rate <= limit

    return passes, tried


def test_doubles_to_a_failure_then_bisects_to_a_tenth():
    passes, tried = server(700)
    assert max_rate(passes, 100, lowest=12.5, steps=3, digits=1) == (700, 750)
    assert tried == [100, 200, 400, 800, 600, 700, 750]


def test_halves_while_failing_and_stops_at_the_lowest_rate():
    passes, tried = server(30)
    assert max_rate(passes, 100, lowest=12.5, steps=0) == (25, 50)
    assert tried == [100, 50, 25]
    passes, tried = server(1)
    assert max_rate(passes, 100, lowest=12.5, steps=3) == (None, 12.5)
    assert tried == [100, 50, 25, 12.5]  # 6.25 is below the lowest rate: not tried


def test_a_server_that_never_fails_is_tried_a_bounded_number_of_times():
    passes, tried = server(float("inf"))
    assert max_rate(passes, 1, lowest=0.1, steps=5) == (2 ** (MAX_BRACKET_TRIALS - 1), None)
    assert len(tried) == MAX_BRACKET_TRIALS


def test_bisection_stops_once_rounding_repeats_an_end():
    passes, tried = server(1.04)
    assert max_rate(passes, 1.0, lowest=0.1, steps=6, digits=1) == (1.0, 1.1)
    assert tried == [1.0, 2.0, 1.5, 1.2, 1.1]  # then 1.05 rounds to 1.1, an end: no 6th step
