"""Procedural tasks: answers and supporting facts (checked by an independent solver), splits, balance, printing."""

import random
from collections import Counter

import pytest
import torch

from disentangle.config import PROCEDURAL_TASKS, DataConfig
from disentangle.data import CLS, SEP, UNK, Story, encode
from disentangle.data.procedural import (
    ANSWERS,
    CONNECTIVES,
    DROP_VERBS,
    GRAB_VERBS,
    MAJORITY,
    NUMBERS,
    PLACES,
    PRONOUN,
    answer_vocab_for,
    build_vocab,
    format_story,
    generate,
    make_story,
    solve,
    story_html,
)

# The richer world of params/full.yaml (all six tasks, longer stories, a distractor): the generator's
# guarantees are checked there; the CPU default (DataConfig()) is a special case of it.
RICH = dict(tasks=PROCEDURAL_TASKS, n_people=4, story_min=2, story_max=6, n_distractors=1, ood_story_min=8, ood_story_max=12)


def rich(**kw) -> DataConfig:
    return DataConfig(**{**RICH, **kw})


SMALL = rich(n_train=120, n_val=30, n_test=30, n_ood=30)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


def sample(task: str, n: int, cfg: DataConfig = rich(), seed: int = 0) -> list[Story]:
    rng = random.Random(f"test:{task}:{seed}")
    return [make_story(task, rng, cfg) for _ in range(n)]


def story(text: str, question: str, task: str = "where_person") -> Story:
    """A hand-written story: sentences separated by " . ", answer and supporting left for solve()."""
    sentences = tuple(tuple(f"{s.strip()} .".split()) for s in text.split(".") if s.strip())
    return Story(sentences, tuple(question.split()), "", task, ())


# ------------------------------------------------------------------------------ answers are right


@pytest.mark.parametrize("task", PROCEDURAL_TASKS)
def test_solver_agrees_with_generator_on_every_story(task):
    default, crowded = rich(), rich(n_people=6, n_places=5, n_objects=5, n_distractors=3)
    rng = random.Random(task)
    stories = sample(task, 300) + sample(task, 150, crowded)
    stories += [make_story(task, rng, default, rng.randint(8, 12)) for _ in range(100)]  # OOD lengths
    for s in stories:
        assert solve(s) == (s.answer, s.supporting), format_story(s)
        assert s.answer in ANSWERS[task]


@pytest.mark.parametrize(
    ("text", "question", "answer", "supporting"),
    [
        # where_person: the last move counts
        ("mary went to the kitchen . john moved to the garden . mary travelled to the office", "where is mary ?", "office", (2,)),
        # coreference: "she" is the previous sentence's subject (sandra), not the first girl named
        ("mary went to the kitchen . sandra went to the hallway . then she went to the garden", "where is mary ?", "kitchen", (0,)),
        ("mary went to the kitchen . sandra went to the hallway . then she went to the garden", "where is sandra ?", "garden", (1, 2)),
        # where_object: carried by its holder, then dropped where the holder was
        ("john picked up the football . john went to the kitchen", "where is the football ?", "kitchen", (0, 1)),
        ("john went to the office . john got the football . john went to the kitchen . john dropped the football . john went to the garden",
         "where is the football ?", "kitchen", (2, 3)),
        ("john went to the office . john got the apple . john put down the apple . mary went to the office . mary took the apple . mary went to the cellar",
         "where is the apple ?", "cellar", (4, 5)),
        # counting: every grab and drop by that person, however it nets out
        ("john got the apple . mary took the milk . john dropped the apple . john grabbed the key . john picked up the hat",
         "how many objects is john carrying ?", "two", (0, 2, 3, 4)),
        ("john got the apple . john left the apple", "how many objects is john carrying ?", "none", (0, 1)),
        # majority: last moves of the people who are in the place at the end
        ("john went to the kitchen . mary went to the kitchen . fred went to the kitchen . fred went to the garden",
         "are there more boys or girls in the kitchen ?", "equal", (0, 1)),
        ("john went to the kitchen . mary went to the kitchen . sandra went to the kitchen",
         "are there more boys or girls in the kitchen ?", "girls", (0, 1, 2)),
        # deduction: two hops through the species
        ("every wolf is afraid of cats . winona is a cat . every mouse fears wolves . gertrude is a mouse",
         "what is gertrude afraid of ?", "wolves", (2, 3)),
    ],
)
def test_solver_known_answers(text, question, answer, supporting):
    assert solve(story(text, question)) == (answer, supporting)


@pytest.mark.parametrize(
    ("text", "question", "message"),
    [
        ("then she went to the kitchen", "where is mary ?", "does not refer"),
        ("john went to the kitchen . then she went to the garden", "where is john ?", "does not refer"),
        ("mary went to the kitchen . then she went to the garden . then she went to the office", "where is mary ?", "does not refer"),
        ("john dropped the apple", "where is the apple ?", "without holding"),
        ("john got the apple . mary got the apple", "where is the apple ?", "which john holds"),
        ("john got the apple", "where is the apple ?", "does not answer"),
        ("john went to the office . john got the apple . john dropped the apple . mary went to the garden . "
         "mary took the apple", "where is the apple ?", "which lies in the office"),
        ("john went to the office . john moved to the office", "where is john ?", "already are"),
        ("gertrude is a cat . gertrude is a dog", "what is gertrude afraid of ?", "already said to be a cat"),
        ("every cat fears dogs . every cat fears mice", "what is winona afraid of ?", "second or self-referring"),
        ("every cat fears cats", "what is winona afraid of ?", "second or self-referring"),
        ("john went to the moon", "where is john ?", "not in the language"),
        ("gertrude is a sheep", "what is gertrude afraid of ?", "sentence 0 .* not in the language"),
        ("john went to the kitchen", "why is john ?", "not in the language"),
    ],
)
def test_solver_rejects_impossible_or_unanswerable_stories(text, question, message):
    with pytest.raises(ValueError, match=message):
        solve(story(text, question))


def test_pronouns_need_recency_not_just_gender():
    stories = sample("coreference", 400)
    bound = [s for s in stories if len(s.supporting) == 2]
    assert len(bound) / len(stories) > 0.6  # the target share is 75 %
    for s in bound:
        antecedent, pronoun_sentence = (s.sentences[i] for i in s.supporting)
        assert pronoun_sentence[: len(pronoun_sentence) - 6] in CONNECTIVES
        assert pronoun_sentence[-6] == PRONOUN[antecedent[0]]
    # In a good share, another person of the same gender is mentioned, so gender alone cannot bind.
    confusable = [s for s in bound if any(w in PRONOUN and w != s.question[2] and PRONOUN[w] == PRONOUN[s.question[2]]
                                          for sent in s.sentences for w in sent)]  # fmt: skip
    assert len(confusable) / len(bound) > 0.2


def test_where_object_mostly_needs_composition():
    stories = sample("where_object", 400)
    kinds = Counter()
    for s in stories:
        first, second = (s.sentences[i] for i in s.supporting)
        assert first[0] == second[0]  # one person's sentences
        if second[-2] in PLACES:  # grabbed it, then moved: the object was carried off
            assert first[1:-3] in GRAB_VERBS and first[-2] == s.question[3]
            kinds["carried"] += 1
        elif second[1:-3] in DROP_VERBS:  # moved, then dropped it there
            kinds["dropped"] += 1
        else:  # moved, then grabbed it where they already were
            kinds["static"] += 1
    assert kinds["carried"] / len(stories) > 0.5
    assert 0.1 < kinds["dropped"] / len(stories) < 0.35


def test_deduction_states_several_fears_and_the_answer_in_a_supporting_fact():
    for s in sample("deduction", 300):
        assert sum(sent[0] == "every" for sent in s.sentences) >= 2
        assert any(s.answer in s.sentences[i] for i in s.supporting)
        assert s.question[2] in s.sentences[min(i for i in s.supporting if s.sentences[i][0] != "every")]


def test_majority_aggregates_over_at_least_two_people():
    for s in sample("majority", 300):
        assert len(s.supporting) >= 2  # one last move per person in the place
        place = s.question[-2]
        assert all(s.sentences[i][-2] == place for i in s.supporting)


@pytest.mark.parametrize("task", ["where_person", "where_object", "coreference"])
def test_place_answers_appear_in_a_supporting_sentence(task):
    for s in sample(task, 200):
        assert any(s.answer in s.sentences[i] for i in s.supporting)


# ---------------------------------------------------------------------------------- balance, length


def test_answer_classes_are_balanced():
    shares = {t: Counter(s.answer for s in sample(t, 600)) for t in PROCEDURAL_TASKS}
    for task, counts in shares.items():
        top = max(counts.values()) / 600
        assert top < {"counting": 0.35, "majority": 0.42}.get(task, 0.2), (task, counts)
    assert set(shares["counting"]) == set(NUMBERS)
    assert set(shares["majority"]) == set(MAJORITY)
    assert min(shares["counting"].values()) / 600 > 0.15


def test_default_inputs_are_short():
    vocab, answers = build_vocab(), answer_vocab_for(PROCEDURAL_TASKS)
    lengths = sorted(len(encode(s, vocab, answers).tokens) for t in PROCEDURAL_TASKS for s in sample(t, 100))
    assert 30 <= lengths[len(lengths) // 2] <= 60
    assert lengths[-1] <= 64


@pytest.mark.parametrize("n_distractors", [0, 2])
def test_story_lengths_follow_the_config(n_distractors):
    cfg = rich(story_min=3, story_max=4, n_distractors=n_distractors)
    for task in PROCEDURAL_TASKS:
        assert {len(s.sentences) for s in sample(task, 60, cfg)} == {3 + n_distractors, 4 + n_distractors}


# ------------------------------------------------------------------------------ splits, determinism


def test_splits_sizes_order_and_lengths(small):
    assert small.tasks == PROCEDURAL_TASKS
    assert set(small.splits) == {"train", "val", "test", "ood"}
    for name, n in [("train", 120), ("val", 30), ("test", 30), ("ood", 30)]:
        split = small.splits[name]
        assert small.info["sizes"][name] == dict.fromkeys(PROCEDURAL_TASKS, n)
        assert torch.equal(split.task_ids.bincount(), torch.full((6,), n))
        assert all(small.tasks[i] == st.task for i, st in zip(split.task_ids.tolist(), split.stories, strict=True))
        low, high = (8, 12) if name == "ood" else (2, 6)
        assert {len(st.sentences) - 1 for st in split.stories} <= set(range(low, high + 1))
    assert small.info["sentences"]["ood"]["min"] > small.info["sentences"]["train"]["max"]


def test_splits_never_share_a_story():
    # Few people and places, so that many short stories collide and deduplication has work to do.
    cramped = rich(tasks=("where_person",), n_people=2, n_places=2, story_min=1, story_max=2, n_distractors=0,
                         ood_story_min=3, ood_story_max=3, n_train=60, n_val=20, n_test=20, n_ood=5)  # fmt: skip
    data = generate(cramped)
    assert data.info["redrawn_duplicates"]["where_person"] > 0
    texts = {name: {" ".join(map(" ".join, st.sentences)) for st in split.stories} for name, split in data.splits.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]


def test_same_config_same_data_other_seed_other_data(small):
    again, other = generate(SMALL), generate(SMALL.replace(seed=1))
    for name, split in small.splits.items():
        assert torch.equal(split.tokens, again.splits[name].tokens)
        assert split.stories == again.splits[name].stories
        assert split.stories != other.splits[name].stories
    assert small.vocab.itos == other.vocab.itos and small.answers.itos == other.answers.itos
    assert make_story("counting", random.Random(7), SMALL) == make_story("counting", random.Random(7), SMALL)


def test_each_task_has_its_own_random_stream(small):
    alone = generate(SMALL.replace(tasks=["deduction"]))
    ours = [st for st in small.splits["test"].stories if st.task == "deduction"]
    assert alone.splits["test"].stories == ours


# ----------------------------------------------------------------------------- vocabulary, encoding


def test_vocabularies_are_fixed_lexicons():
    assert answer_vocab_for(["counting", "majority"]).itos == sorted(NUMBERS + MAJORITY)
    assert answer_vocab_for(["where_person", "coreference"]).itos == sorted(PLACES)
    with pytest.raises(ValueError, match="allowed"):
        answer_vocab_for(["where_is"])


def test_encoding_round_trips_and_support_mask_marks_supporting_tokens(small):
    split = small.splits["train"]
    for i in range(0, len(split), 7):
        st, tokens = split.stories[i], split.tokens[i][~split.padding_mask[i]]
        words = small.vocab.decode(tokens)
        assert UNK not in words
        assert words == [CLS, *(w for s in st.sentences for w in s), SEP, *st.question, SEP]
        mask = split.support_mask[i][~split.padding_mask[i]].tolist()
        expected = [w for j in range(len(st.sentences)) for w in [j in st.supporting] * len(st.sentences[j])]
        assert mask == [False, *expected, *[False] * (len(st.question) + 2)]
        assert small.answers.itos[split.answers[i]] == st.answer


def test_info_reports_answers_and_lengths(small):
    info = small.info
    assert sum(info["answers"]["test"]["counting"].values()) == 30
    assert set(info["answers"]["train"]["majority"]) == set(MAJORITY)
    assert 20 < info["tokens"]["train"]["median"] < 60
    chance = small.chance("test")
    assert all(0 < c < 0.5 for c in chance.values())


# ---------------------------------------------------------------------------------------- errors


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="where_is.*allowed"):
        make_story("where_is", random.Random(0), rich())
    with pytest.raises(ValueError, match="too short for task 'deduction'"):
        make_story("deduction", random.Random(0), rich(), length=1)
    with pytest.raises(ValueError, match="at most 16 distinct facts, not 18"):
        make_story("deduction", random.Random(0), rich(), length=17)
    with pytest.raises(ValueError, match="babi.load"):
        generate(rich(source="babi", tasks=("qa1",), babi_dir="somewhere"))
    with pytest.raises(ValueError, match="n_places=9 must be <= 8"):
        generate(rich(n_places=9))
    with pytest.raises(ValueError, match="story_min=1 is too short for task 'where_object'"):
        generate(rich(story_min=1))


# --------------------------------------------------------------------------------------- printing


KNOWN = Story(
    sentences=(("mary", "went", "to", "the", "kitchen", "."), ("then", "she", "went", "to", "the", "garden", ".")),
    question=("where", "is", "mary", "?"),
    answer="garden",
    task="coreference",
    supporting=(0, 1),
)


def test_format_story_marks_supporting_sentences():
    other = Story(KNOWN.sentences, KNOWN.question, "kitchen", "where_person", (0,), n_truncated=3)
    assert format_story(other) == (
        "[where_person]\n"
        "      (3 earlier sentences cut)\n"
        "*   0  mary went to the kitchen .\n"
        "    1  then she went to the garden .\n"
        "   Q:  where is mary ?   A: kitchen"
    )


def test_story_html_highlights_supporting_sentences_without_external_resources():
    page = story_html(Story(KNOWN.sentences, ("where", "is", "<b>", "?"), "garden", "coreference", (1,)))
    rows = page.split("<div")
    highlighted = [r for r in rows if "background" in r]
    assert len(highlighted) == 1 and "then she went to the garden ." in highlighted[0]
    assert "&lt;b&gt;" in page and "<b>?" not in page
    assert not any(bad in page.lower() for bad in ("http", "<script", "<link", "<style", "url("))
