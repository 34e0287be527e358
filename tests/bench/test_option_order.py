"""The option-order task: generated questions, consistent tokenisation, flips measured (a tiny run)."""

from attnkit.bench import option_order


def test_questions_are_seeded_and_well_formed():
    a, b = option_order.questions(8, seed=1), option_order.questions(8, seed=1)
    assert a == b and a != option_order.questions(8, seed=2)
    for q, opts, right in a:
        assert len(opts) == 4 == len(set(opts)) and 0 <= right < 4 and q.endswith("?")


def test_each_option_has_the_same_tokens_in_every_order(smollm2):
    _, tok = smollm2
    q, opts, _ = option_order.questions(1)[0]
    one = option_order.encode(tok, q, opts)
    other = option_order.encode(tok, q, opts[::-1])
    seg = lambda enc, i: enc["ids"][slice(*enc["spans"][i])]  # noqa: E731
    assert [seg(one, i) for i in range(4)] == [seg(other, 3 - i) for i in range(4)]
    assert one["spans"][0][1] == one["spans"][1][0]  # contiguous segments


def test_tiny_run_pine_removes_the_flips(smollm2):
    model, tok = smollm2
    res = option_order.run(model, tok, n=2)
    dense, pine = res["rows"]
    assert pine["flip_rate"] == 0.0 and pine["pairwise_flips"] == 0.0
    assert abs(sum(dense["places"]) - 1) < 1e-9
    assert "| PINE" in option_order.markdown(res)
