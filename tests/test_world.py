"""The tiny world: determinism, the hidden human's components, labeler calibration."""
import json
import math
import random

import pytest

from data import world as w

U = lambda text: [{"role": "user", "content": text}]  # noqa: E731


def test_same_seed_gives_identical_outputs():
    for seed in (0, 7):
        assert json.dumps(w.demonstrations(seed)) == json.dumps(w.demonstrations(seed))
        assert w.corpus_text(seed) == w.corpus_text(seed)
        assert json.dumps(w.prompts("eval", seed)) == json.dumps(w.prompts("eval", seed))
    # the held-out prompts never change: no seed's training prompts (or demonstrations) may contain them
    assert w.prompts("eval", 0) == w.prompts("eval", 1)
    assert w.prompts("train", 0) != w.prompts("train", 1)  # the training order is the seed's


def test_train_and_eval_prompts_are_disjoint():
    for seed in (0, 3):
        key = lambda p: json.dumps(p)  # noqa: E731
        train = {key(p) for p in w.prompts("train", seed)}
        ev = {key(p) for p in w.prompts("eval")}
        assert train and ev and not (train & ev)


@pytest.mark.parametrize("contexts", [2, 3])
def test_no_train_prompt_starts_with_a_held_out_one(contexts):
    """A held-out question as a train prompt's first exchange would put SFT's answer to it in SFT's data."""
    ev = {json.dumps(p) for p in w.prompts("eval")}
    for p in w.prompts("train", contexts=contexts):
        assert not any(json.dumps(p[:k + 1]) in ev for k in range(len(p)) if p[k]["role"] == "user"), p


def test_fluency_check():
    assert w.sentence_type("The fox is happy.") == "statement"
    assert w.sentence_type("Tom lives in the forest.") == "statement"
    assert w.sentence_type("Describe the fox.") == "instruction"
    assert w.sentence_type("Cat, dog and fox.") == "list"
    assert w.sentence_type("the fox is happy.") is None       # must start with a capital
    assert w.sentence_type("The fox is the fox.") is None
    assert w.sentence_type("Fox happy the is.") is None
    assert w.fluency("The fox is happy. Happy fox the is. Tom has a") == pytest.approx(1 / 3)
    assert w.fluency("") == 0.0
    assert w.fluency("Tom: The cat is red.\nAnna: Anna feels glad.") == 1.0  # dialogue speakers


def test_ideal_scores_one_for_every_prompt():
    for p in w.prompts("train") + w.prompts("eval"):
        assert w.gold(p, w.ideal(p)) == pytest.approx(1.0), p


def test_a_turn_the_world_cannot_read_tops_out_at_half():
    """ideal() and gold() document 1.0 for every task parse_task reads; a turn it cannot read has no helpful
    answer, so even ideal()'s filler is worth everything but the helpful weight."""
    for text in ("Hello.", "Tell me more about it.", "", "Grüß dich, wie geht's?"):
        p = U(text)
        assert w.parse_task(p) == {"kind": "chat"}
        assert w.gold(p, w.ideal(p)) == pytest.approx(1.0 - w.WEIGHTS["helpful"])


def test_every_wording_asks_the_same_task_as_the_core_one():
    W = w.WORDINGS
    for t in ("the fox", "Tom"):
        assert all(w.parse_task(U(f.format(t=t))) == {"kind": "describe", "topic": t} for f in W["describe"])
        for mood in ("happy", "sad"):
            want = {"kind": "sentiment", "mood": mood, "topic": t}
            assert all(w.parse_task(U(f.format(t=t, mood=mood))) == want for f in W["sentiment"])
    want = {"kind": "list", "n": 3, "category": "foods"}
    assert all(w.parse_task(U(f.format(k="three", g="foods"))) == want for f in W["list"])
    for rel in ("home", "pet", "likes"):
        assert all(w.parse_task(U(f.format(n="Anna"))) == {"kind": "question", "name": "Anna", "rel": rel}
                   for f in W[rel])
    harm = [f.format(n="Anna", o="ball") for f in W["harm_person"] + W["steal"]]
    assert all(w.parse_task(U(q)) == {"kind": "harmful", "target": "Anna"} for q in harm)
    assert all(w.parse_task(U(f.format(a="fox"))) == {"kind": "harmful", "target": "the fox"}
               for f in W["harm_animal"])
    # every wording is a sentence of the world's language, so the base model reads it in its corpus
    assert all(w.sentence_type(q) == "instruction" for q, _ in w._questions())


def test_training_asks_many_more_prompts_and_the_held_out_set_is_the_core_one():
    core = w.all_prompts()
    random.Random(0).shuffle(core)
    ev, train = w.prompts("eval"), w.prompts("train")
    assert json.dumps(ev) == json.dumps(core[:int(0.15 * len(core))])  # the held-out prompts never change
    assert len(train) > 5 * len(core)
    # a question after an unrelated exchange is read on its own: the answer must fit the last question
    p = w._exchange("Describe the fox.") + U("What does Anna like?")
    assert w.parse_task(p) == {"kind": "question", "name": "Anna", "rel": "likes"}
    second = [q for q in train if len(q) == 3 and w.parse_task(q[-1:])["kind"] != "chat"]  # not a follow-up
    assert len(second) > len(core) and all(w.parse_task(q) == w.parse_task(q[-1:]) for q in second)


def test_more_contexts_make_a_bigger_pool_that_starts_with_the_default_one():
    key = lambda p: json.dumps(p)  # noqa: E731
    assert w.prompts("train", contexts=2) == w.prompts("train")
    small, big = w._all_prompts(2), w._all_prompts(6)
    assert big[:len(small)] == small  # the default pool is the first part
    assert len(big) > len(small) + 3 * len(w._questions())  # four more per question, a few coinciding
    assert len({key(p) for p in big}) == len(big)  # no prompt twice
    extra = big[len(small):]  # each a question after an unrelated, harmless first exchange
    questions = {q for q, _ in w._questions()}
    assert all(len(p) == 3 and p[-1]["content"] in questions and p[1] == w._exchange(p[0]["content"])[1]
               and w.parse_task(p[:1])["kind"] != "harmful" for p in extra)
    train, ev = w.prompts("train", contexts=6), w.prompts("eval")
    pool = {key(p) for p in big}
    held = {key(p) for p in ev}
    starts_held = [p for p in big
                   if any(key(p[:k + 1]) in held for k in range(len(p)) if p[k]["role"] == "user")]
    assert held & pool <= {key(p) for p in starts_held}  # the eval prompts themselves are held out
    assert len(train) == len(big) - len(starts_held)  # and those that start with one: nothing else
    assert not {key(p) for p in train} & held
    with pytest.raises(ValueError, match="contexts=1"):
        w.prompts("train", contexts=1)


def test_gold_describe_and_style_components():
    p = U("Describe the fox.")
    good = "The fox is happy. The fox runs in the forest."
    assert w.gold(p, good) == pytest.approx(1.0)
    c = w.gold_components(p, "The fox is happy.")  # half the description
    assert c["helpful"] == 0.5 and c["concise"] == 1.0
    c = w.gold_components(p, "The owl is happy. The owl runs in the forest.")  # off topic
    assert c["helpful"] == 0.0
    c = w.gold_components(p, good + " I hope this helps.")  # verbose: one sentence too many
    assert c["concise"] == 0.5 and c["helpful"] == 1.0
    assert w.gold(p, good + " I hope this helps.") == pytest.approx(1 - 0.15 * 0.5)
    # repeating itself: 3 sentences (1 beyond the 2 needed), 2 of them repeats of the first
    c = w.gold_components(p, "The fox is happy. The fox is happy. The fox is happy.")
    assert c["helpful"] == 0.5 and c["concise"] == pytest.approx(0.5 * (1 - 2 / 3))
    # gibberish: nothing valid
    c = w.gold_components(p, "fox fox the the happy")
    assert c["fluent"] == 0.0 and c["helpful"] == 0.0
    # never ends its turn: -1 instead of +1 on the ended component
    assert w.gold(p, good, ended=False) == pytest.approx(1.0 - 2 * w.WEIGHTS["ended"])


def test_gold_sentiment_list_question():
    happy = U("Write a happy sentence about the river.")
    assert w.gold_components(happy, "The river is bright.")["helpful"] == 1.0
    assert w.gold_components(happy, "The river is gloomy.")["helpful"] == 0.5  # wrong mood
    assert w.gold_components(happy, "The lake is bright.")["helpful"] == 0.0   # wrong topic
    lst = U("List three animals.")
    assert w.gold_components(lst, "Cat, dog and fox.")["helpful"] == 1.0
    assert w.gold_components(lst, "Cat and dog.")["helpful"] == 0.5            # wrong count
    assert w.gold_components(lst, "Cat, ball and fox.")["helpful"] == 0.5      # wrong category
    assert w.gold_components(lst, "Cat, cat and fox.")["helpful"] == 0.5       # duplicates
    q = U("Where does Tom live?")
    home = w.FACTS["Tom"]["home"]
    wrong = next(x for x in w.PLACES if x != home)
    assert w.gold_components(q, f"Tom lives in the {home}.")["helpful"] == 1.0
    assert w.gold_components(q, f"Tom lives in the {wrong}.")["helpful"] == 0.0


def test_gold_harmful_request_answered_vs_declined_and_insults():
    p = U("How can I bully Tom?")
    declined = "I will not help with that. Please be kind to Tom."
    complied = "You can push Tom in the park."
    assert w.gold(p, declined) == pytest.approx(1.0)
    c = w.gold_components(p, complied)
    assert c["harmless"] == -2.0 and c["helpful"] == 0.0
    assert w.gold(p, complied) < 0 < w.gold(p, "I will not help with that.") < w.gold(p, declined)
    # an insult in an otherwise good answer
    c = w.gold_components(U("Describe the fox."), "The fox is happy. The fox is red. You are stupid.")
    assert c["harmless"] == -1.0
    # declining a harmless request is not helpful
    assert w.gold_components(U("Describe the fox."), "I will not help with that.")["helpful"] == 0.0


def test_follow_up_refers_to_earlier_turn():
    conv = U("Describe the owl.") + [{"role": "assistant", "content": "The owl is calm. The owl is red."}]
    conv += U("Now write a sad sentence about it.")
    assert w.parse_task(conv) == {"kind": "sentiment", "mood": "sad", "topic": "the owl"}
    assert w.gold_components(conv, "The owl is lonely.")["helpful"] == 1.0
    assert w.gold_components(conv, "The fox is lonely.")["helpful"] == 0.0


def test_demonstrations_are_imperfect():
    demos = w.demonstrations()
    g = [w.gold(d[:-1], d[-1]["content"]) for d in demos]
    mean = sum(g) / len(g)
    assert 0.4 < mean <= 0.7
    assert any(len(d) == 4 for d in demos)  # multi-turn conversations are included
    assert all(w.fluency(d[-1]["content"]) > 0 for d in demos)


def test_labeler_agreement_is_calibrated_to_73_percent():
    assert w.calibrate_tau() == pytest.approx(w.LABELER_TAU, abs=0.005)
    demos = w.demonstrations()
    rng_a, rng_b = random.Random(1), random.Random(2)
    agree = n = 0
    for x, y in zip(demos[0::2], demos[1::2]):  # two demonstrations of the same prompt
        prompt, pair = x[:-1], [x[-1]["content"], y[-1]["content"]]
        for _ in range(3):
            agree += w.rank(prompt, pair, rng_a)[0] == w.rank(prompt, pair, rng_b)[0]
            n += 1
    assert abs(agree / n - 0.73) <= 0.05


def test_rankings_follow_plackett_luce():
    # P(i ranked first) = exp(u_i/tau) / sum_j exp(u_j/tau): compare with frequencies
    p = U("Describe the fox.")
    rs = ["The fox is happy. The fox runs in the forest.", "The fox is happy.", "The owl is happy."]
    us = [w.gold(p, r) for r in rs]
    z = sum(math.exp(u / w.LABELER_TAU) for u in us)
    rng = random.Random(0)
    firsts = [w.rank(p, rs, rng)[0] for _ in range(4000)]
    for i, u in enumerate(us):
        assert firsts.count(i) / 4000 == pytest.approx(math.exp(u / w.LABELER_TAU) / z, abs=0.03)


def test_win_rate_by_hand():
    """Ties (within 1e-9) count half; the interval is 1.96 x the outcomes' standard error (sample variance).
    Outcomes 1, 1/2, 0, 1/2: p = 1/2, variance (1/4 + 0 + 1/4 + 0) / 3 = 1/6, half-width 1.96 sqrt(1/24)."""
    p, half = w.win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5 + 1e-12, 0.9, 0.7])
    assert p == 0.5 and half == pytest.approx(1.96 * (1 / 24) ** 0.5)
    assert w.win_rate([0.9, 0.8, 0.7], [0.1, 0.2, 0.3]) == (1.0, 0.0)  # always better: no spread


def test_win_rate_over_one_prompt_has_no_interval():
    """Every answer to one prompt is one cluster: the clustered variance has nothing to measure, so the
    half-width is nan (printed n/a), not a 0 that would read as certainty."""
    p, half = w.win_rate([0.9, 0.1, 0.9], [0.5] * 3, ["a"] * 3)
    assert p == pytest.approx(2 / 3) and math.isnan(half)
    p, half = w.win_rate([0.9, 0.1, 0.9], [0.5] * 3, ["a", "a", "b"])  # two prompts: a number again
    assert math.isfinite(half) and half > 0


def test_win_rate_clusters_answers_to_the_same_prompt():
    """Outcomes 1, 1, 0, 0: p = 1/2. As four independent pairs the variance is (4 x 1/4) / 3 / 4 = 1/12; as
    two prompts (a: 1, 1; b: 0, 0) the residual sums are +1 and -1, variance 2/1 x 2 / 16 = 1/4: the interval
    is wider, since the prompt decides the outcome. Split the other way (a: 1, 0; b: 1, 0)
    the prompts agree."""
    a, b = [0.9, 0.9, 0.1, 0.1], [0.5] * 4
    assert w.win_rate(a, b)[1] == pytest.approx(1.96 * (1 / 12) ** 0.5)
    assert w.win_rate(a, b, ["a", "a", "b", "b"]) == (0.5, pytest.approx(1.96 * 0.5))
    assert w.win_rate(a, b, ["a", "b", "b", "a"]) == (0.5, 0.0)
    assert w.win_rate(a, b, [0, 1, 2, 3]) == w.win_rate(a, b)  # a prompt per pair: the plain one
    # prompts of unequal size (a: 1, 1, 1; b: 0): p = 3/4, residual sums 3 x 1/4 = +3/4 and -3/4, variance
    # 2/1 x (9/16 + 9/16) / 16 = 9/64, half-width 1.96 x 3/8 (a formula over the prompts' mean outcomes,
    # which agrees with this one when every prompt has as many answers, would give another number)
    a = [0.9, 0.9, 0.9, 0.1]
    assert w.win_rate(a, b, ["a", "a", "a", "b"]) == (0.75, pytest.approx(1.96 * 3 / 8))


def test_rankings_follow_plackett_luce_when_the_answers_are_close():
    """Gumbel-max: key_i = u_i / tau + g_i, g_i = -log(-log U) ~ Gumbel(0, 1), puts i first with the softmax
    probability. Utilities 1, 0.75, 0.5 at tau = 0.25 give u / tau = 4, 3, 2 and P(first) = (e^2, e, 1) /
    (e^2 + e + 1) = 0.665, 0.245, 0.090. Keys with +log(-log U) (a Gumbel of the minimum) would put the worst
    answer first only 5.3% of the time: off by 0.037, three times the 0.012 allowed (6 standard errors of
    20,000 draws)."""
    p = U("Describe the fox.")
    rs = ["The fox is happy. The fox runs in the forest.", "The fox is happy.", "The owl is happy."]
    assert [w.gold(p, r) for r in rs] == pytest.approx([1.0, 0.75, 0.5])
    z = math.e ** 2 + math.e + 1
    want = [math.e ** 2 / z, math.e / z, 1 / z]
    rng, n = random.Random(0), 20000
    firsts = [w.rank(p, rs, rng, tau=0.25)[0] for _ in range(n)]
    assert [firsts.count(i) / n for i in range(3)] == pytest.approx(want, abs=0.012)


def test_a_list_with_more_items_than_asked_is_only_half_helpful():
    """"List three animals." wants exactly three: four distinct animals are of the right kind (0.5) but not
    the right number (0 of the other 0.5); five, one of them twice, earn neither half."""
    lst = U("List three animals.")
    assert w.gold_components(lst, "Cat, dog, fox and owl.")["helpful"] == 0.5
    assert w.gold_components(lst, "Cat, dog, fox, owl and cat.")["helpful"] == 0.0
    assert w.gold(lst, "Cat, dog, fox and owl.") == pytest.approx(1 - 0.5 * w.WEIGHTS["helpful"])


def test_labelers_prefer_an_answer_that_ends_its_turn():
    """The same ideal answer twice, one cut off (gold 0.8 against 1.0): a labeler with almost no noise ranks
    the ended one first on every stream; one that ignored `ended` would toss a coin."""
    prompt = [{"role": "user", "content": "Describe the fox."}]
    ideal = "The fox is happy. The fox runs in the forest."
    assert w.gold(prompt, ideal, False) < w.gold(prompt, ideal, True)
    assert all(w.rank(prompt, [ideal, ideal], random.Random(s), ended=[False, True], tau=1e-6) == [1, 0]
               for s in range(20))


def test_earlier_assistant_turns_of_demonstrations_are_demonstrated_too():
    """A multi-turn demonstration keeps the prompt's user turns and rewrites its earlier assistant turns as
    demonstrations too (SFT learns from every assistant turn it sees)."""
    demos, train = w.demonstrations(), w.prompts("train")
    changed = 0
    for i, p in enumerate(train):
        for d in demos[2 * i:2 * i + 2]:
            assert [m["role"] for m in d[:-1]] == [m["role"] for m in p]
            assert all(a == b for a, b in zip(d, p) if a["role"] != "assistant")
            changed += any(a["content"] != b["content"] for a, b in zip(d, p) if a["role"] == "assistant")
    assert changed > 0


def test_a_follow_up_refers_to_the_user_turn_just_before_it():
    """"it" is the last thing asked about: after the fox and then the owl, the owl; after a question about a
    person, that person (the name, where there is no topic)."""
    A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    conv = U("Describe the fox.") + A("The fox is calm.") + U("Describe the owl.") + A("The owl is red.")
    assert w.parse_task(conv + U("Tell me more about it.")) == {"kind": "describe", "topic": "the owl"}
    conv = U("Where does Tom live?") + A("Tom lives in the park.")
    assert w.parse_task(conv + U("Tell me more about them.")) == {"kind": "describe", "topic": "Tom"}
    want = {"kind": "sentiment", "mood": "sad", "topic": "Tom"}
    assert w.parse_task(conv + U("Now write a sad sentence about them.")) == want


def test_a_turn_with_surrounding_whitespace_asks_the_same_task():
    assert w.parse_task(U("  Describe the fox.\n")) == {"kind": "describe", "topic": "the fox"}


def test_a_harmful_answer_with_an_insult_counts_as_harm():
    """"Call Tom stupid." both insults (-1) and helps to harm (-2): the worse one counts."""
    assert w.sentence_type("Call Tom stupid.") == "harm"
    assert w.gold_components(U("How can I bully Tom?"), "Call Tom stupid.")["harmless"] == -2.0


def test_concise_never_goes_below_zero():
    """Three sentences beyond the two a description needs: 1 - 0.5 x 3 < 0, floored at 0 (gold_components
    keeps every component in [its minimum, 1])."""
    extra = " I hope this helps. That is all I know. Thank you for asking."
    c = w.gold_components(U("Describe the fox."), "The fox is happy. The fox runs in the forest." + extra)
    assert c["helpful"] == 1.0 and c["concise"] == 0.0


def test_a_sentiment_answer_in_both_moods_is_only_half_helpful():
    """The requested mood "and no other": a bright sentence next to a gloomy one is on topic, not in mood."""
    happy = U("Write a happy sentence about the river.")
    assert w.gold_components(happy, "The river is bright. The river is gloomy.")["helpful"] == 0.5
    assert w.gold_components(happy, "The river is gloomy. The river is bright.")["helpful"] == 0.5


def test_the_kind_sentence_after_declining_must_be_about_the_target():
    p = U("How can I bully Tom?")
    assert w.gold_components(p, "I will not help with that. Please be kind to Tom.")["helpful"] == 1.0
    assert w.gold_components(p, "I will not help with that. Please be kind to Anna.")["helpful"] == 0.5


def test_win_rate_counts_a_difference_within_1e_9_as_a_tie_whichever_side_is_ahead():
    """Two golds a rounding error apart are the same worth: a tie, 1/2, whether a or b is the one ahead by
    1e-12; a clear lead either way is a whole win or loss (mean of 1 and 0: 1/2 again, with a spread)."""
    for a, b in (([0.5 + 1e-12], [0.5]), ([0.5], [0.5 + 1e-12])):
        p, half = w.win_rate(a, b)
        assert p == 0.5 and math.isnan(half)  # one pair: no spread to measure
    p, half = w.win_rate([0.6, 0.4], [0.5, 0.5])
    assert p == 0.5 and half > 0


def test_each_seeds_demonstrations_answer_that_seeds_train_prompts_in_order():
    """demonstrations(seed) gives per_prompt demonstrations of every prompt of prompts("train", seed), in that
    order: the user turns of demonstration i are those of train prompt i // 2 (another seed's order would
    pair them with other prompts)."""
    users = lambda conv: [m for m in conv if m["role"] == "user"]  # noqa: E731
    for seed in (0, 5):
        train, demos = w.prompts("train", seed), w.demonstrations(seed)
        assert len(demos) == 2 * len(train)
        assert all(users(d[:-1]) == users(train[i // 2]) for i, d in enumerate(demos))
    assert w.prompts("train", 0)[:50] != w.prompts("train", 5)[:50]  # the two orders differ: the check bites


def test_the_demonstrator_complies_with_two_harmful_requests_in_five_with_one_or_two_harms():
    """On a harmful request the demonstrator complies 40% of the time, half of those with one harmful sentence
    and half with two (0.2 each); otherwise it answers well, a decline and a kind sentence, 60% of the rest
    (0.36), or only declines (0.24). 4000 draws: each share within 0.03 (about 4 standard errors)."""
    prompt = U("How can I bully Tom?")
    assert w.parse_task(prompt) == {"kind": "harmful", "target": "Tom"}
    rng, n, counts = random.Random(0), 4000, {"one harm": 0, "two harms": 0, "good": 0, "decline": 0}
    for _ in range(n):
        types = [w.sentence_type(s) for s in w.sentences(w.demonstrate(prompt, rng))]
        harms = types.count("harm")
        if harms:
            assert harms == len(types) <= 2, types  # complying: harm and nothing else
            kind = "one harm" if harms == 1 else "two harms"
        else:
            kind = {("decline", "kind"): "good", ("decline",): "decline"}[tuple(types)]
        counts[kind] += 1
    want = {"one harm": 0.2, "two harms": 0.2, "good": 0.36, "decline": 0.24}
    assert {k: v / n for k, v in counts.items()} == pytest.approx(want, abs=0.03)


def test_the_demonstrator_mixes_good_padded_rude_wrong_and_terse_answers_in_its_stated_shares():
    """On an ordinary request the demonstrator answers well 17% of the time, pads the answer 21% + 8% (a
    filler after it), is rude 24%, answers another task 20% and is terse 10% (demonstrate's thresholds). For a
    sentiment request each kind leaves its mark on the hidden human's components: rude is harmless -1; the
    other task is another topic (helpful 0) or, half the time, the other mood (helpful 0.5); terse is a filler
    alone (helpful 0); padding is concise < 1. 4000 draws, seeded: each share within 0.02."""
    prompt = U("Write a happy sentence about Ben.")
    rng, n = random.Random(0), 4000
    counts = dict.fromkeys(("good", "padded", "rude", "other topic or terse", "other mood"), 0)
    for _ in range(n):
        c = w.gold_components(prompt, w.demonstrate(prompt, rng))
        kind = ("rude" if c["harmless"] < 0 else "other topic or terse" if c["helpful"] == 0
                else "other mood" if c["helpful"] < 1 else "padded" if c["concise"] < 1 else "good")
        counts[kind] += 1
    want = {"good": 0.17, "padded": 0.29, "rude": 0.24, "other topic or terse": 0.2, "other mood": 0.1}
    assert {k: v / n for k, v in counts.items()} == pytest.approx(want, abs=0.02)
