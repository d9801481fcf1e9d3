"""bAbI reader: the real en/ files (via the babi_en fixture) and small hand-written files for the edge cases."""

import os
import re

import pytest

from conftest import REPO
from disentangle.data.babi import BabiFormatError, load, read_file, resolve_dir, task_of, truncate
from disentangle.config import DataConfig
from disentangle.data import UNK, Story

ALL_TASKS = [f"qa{i}" for i in range(1, 21)]
PRONOUNS = {"he", "she"}


@pytest.fixture(scope="module")
def en(babi_en):
    """Every question of every en/ file: {"train" | "test": {"qa1": [Story, ...], ...}}."""
    return {kind: {task_of(p): read_file(p) for p in babi_en.glob(f"qa*_{kind}.txt")} for kind in ("train", "test")}


def write(directory, name: str, lines: list[str]):
    path = directory / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------- real files


def test_every_en_file_has_1000_questions(en):
    for kind in ("train", "test"):
        assert sorted(en[kind]) == sorted(ALL_TASKS)
        assert {t: len(stories) for t, stories in en[kind].items()} == dict.fromkeys(ALL_TASKS, 1000)


def test_every_question_is_well_formed(en):
    for kind in en.values():
        for task, stories in kind.items():
            for s in stories:
                assert s.task == task and s.question[-1] == "?" and s.supporting
                assert all(sent[-1] == "." for sent in s.sentences)
                assert all(0 <= i < len(s.sentences) for i in s.supporting)


def test_supporting_ids_point_at_the_right_sentences(en):
    for s in en["train"]["qa1"] + en["test"]["qa1"]:  # "Where is Mary?": her last move
        (fact,) = (s.sentences[i] for i in s.supporting)
        assert s.question[2] in fact and s.answer in fact
    for s in en["train"]["qa2"]:  # "Where is the football?": who has it, and where they went
        facts = [s.sentences[i] for i in s.supporting]
        assert len(facts) == 2 and any(s.question[-2] in f for f in facts) and any(s.answer in f for f in facts)
    for s in en["train"]["qa11"]:  # antecedent, then the pronoun sentence with the answer
        antecedent, pronoun = (s.sentences[i] for i in s.supporting)
        assert s.question[2] == antecedent[0] and PRONOUNS & set(pronoun) and s.answer in pronoun
        assert s.supporting[1] == s.supporting[0] + 1
    for s in en["train"]["qa15"]:  # "gertrude is a mouse ." then "mice are afraid of wolves ."
        member, fear = (s.sentences[i] for i in s.supporting)
        assert member[0] == s.question[2] and member[1:3] == ("is", "a") and "afraid" in fear
    for s in en["train"]["qa7"]:  # counting: every supporting sentence is about the person asked about
        assert all(s.question[4] in s.sentences[i] for i in s.supporting)  # "daniel handed the apple to mary ."


def test_the_first_qa1_questions(en):
    first, second, third = en["train"]["qa1"][:3]
    assert first.sentences == (("mary", "moved", "to", "the", "bathroom", "."), ("john", "went", "to", "the", "hallway", "."))
    assert (first.question, first.answer, first.supporting) == (("where", "is", "mary", "?"), "bathroom", (0,))
    # The second question sees four sentences (line 4 is the third sentence: line 3 was a question).
    assert len(second.sentences) == 4 and second.supporting == (2,) and second.answer == "hallway"
    assert third.sentences[:4] == second.sentences and len(third.sentences) == 6


def test_list_answers_are_one_joint_class(en):
    qa8 = {s.answer for s in en["train"]["qa8"] + en["test"]["qa8"]}
    lists = {a for a in qa8 if "," in a}
    assert "apple,football" in lists and all(a.split(",") == sorted(a.split(",")) for a in lists)  # sets: sorted
    qa19 = {s.answer for s in en["train"]["qa19"]}
    assert {"n,w", "w,n"} <= qa19  # paths: order kept


def test_load_real_tasks(babi_en):
    cfg = DataConfig(source="babi", tasks=("qa1", "qa8", "qa15", "qa19"), babi_dir=str(babi_en), n_train=0, n_val=100, n_test=0)
    data = load(cfg)
    assert data.tasks == cfg.tasks
    assert data.info["sizes"]["val"] == dict.fromkeys(cfg.tasks, 100)
    assert data.info["sizes"]["test"] == dict.fromkeys(cfg.tasks, 1000)
    for t in cfg.tasks:  # train: the rest of the file, less the story that continues into val
        assert data.info["sizes"]["train"][t] == 900 - data.info["dropped_at_val_boundary"][t]
    val_qa1 = [s for s in data.splits["val"].stories if s.task == "qa1"]
    assert val_qa1 == read_file(babi_en / "qa1_single-supporting-fact_train.txt", cfg.babi_max_sentences)[-100:]
    test_answers = {s.answer for s in data.splits["test"].stories}
    assert test_answers <= set(data.answers.itos) and {"bathroom", "wolf", "apple,milk", "n,w"} <= test_answers
    assert all(s.answer in data.vocab for s in data.splits["test"].stories if s.task in ("qa1", "qa15"))
    assert data.info["unk_tokens"]["train"] == dict.fromkeys(cfg.tasks, 0)


def test_load_caps_the_number_of_questions(babi_en):
    cfg = DataConfig(source="babi", tasks=("qa2",), babi_dir=str(babi_en), n_train=50, n_val=20, n_test=30)
    assert {k: len(v) for k, v in load(cfg).splits.items()} == {"train": 50, "val": 20, "test": 30}


def test_truncation_keeps_supporting_facts_and_counts_cuts(en, babi_en):
    for full in en["test"]["qa3"]:
        cut = truncate(full, 5)
        old = [i for i in full.supporting if i < len(full.sentences) - 5]
        assert len(cut.sentences) == min(len(full.sentences), 5 + len(set(old)))
        assert cut.n_truncated == len(full.sentences) - len(cut.sentences)
        assert [cut.sentences[i] for i in cut.supporting] == [full.sentences[i] for i in full.supporting]
        assert cut.sentences[-5:] == full.sentences[-5:] and cut.answer == full.answer
    cfg = DataConfig(source="babi", tasks=("qa3",), babi_dir=str(babi_en), n_val=10, n_test=0, babi_max_sentences=5)
    data = load(cfg)
    expected = sum(len(s.sentences) - len(truncate(s, 5).sentences) for s in en["test"]["qa3"])
    assert data.info["truncated_sentences"]["test"]["qa3"] == expected > 0
    assert sum(s.n_truncated for s in data.splits["test"].stories) == expected


# ------------------------------------------------------------------------------- hand-made files


def test_truncate_known_story():
    story = Story(tuple((f"s{i}", ".") for i in range(6)), ("q", "?"), "a", "qa1", supporting=(4, 0))
    cut = truncate(story, 3)
    assert cut.sentences == (("s0", "."), ("s3", "."), ("s4", "."), ("s5", "."))
    assert (cut.supporting, cut.n_truncated) == ((2, 0), 2)  # the file's order of supporting ids is kept
    assert truncate(story, 6) is story


@pytest.fixture
def tiny(tmp_path):
    write(tmp_path, "qa1_tiny_train.txt", [
        "1 Mary moved to the bathroom.", "2 Where is Mary? \tbathroom\t1",
        "1 John went to the hallway.", "2 Where is John?\thallway\t1",
        "3 John went to the garden.", "4 Where is John?\tgarden\t3",
    ])  # fmt: skip
    write(tmp_path, "qa1_tiny_test.txt", ["1 Sandra went to the cellar.", "2 Where is Sandra?\tbathroom\t1"])
    return tmp_path


def test_val_is_held_out_from_the_end_without_sharing_a_story(tiny):
    data = load(DataConfig(source="babi", tasks=("qa1",), babi_dir=str(tiny), n_val=1))
    assert [s.answer for s in data.splits["val"].stories] == ["garden"]
    assert [s.answer for s in data.splits["train"].stories] == ["bathroom"]  # "hallway" shares John's story
    assert data.info["dropped_at_val_boundary"] == {"qa1": 1}
    test = data.splits["test"]
    assert data.info["unk_tokens"]["test"] == {"qa1": 3}  # sandra (twice), cellar
    assert data.vocab.decode(test.tokens[0, 1:3]) == [UNK, "went"]


def test_test_answer_unseen_in_training_names_file_and_line(tiny):
    write(tiny, "qa1_tiny_test.txt", ["1 Mary went to the garden.", "2 Mary went to the zoo.", "3 Where is Mary?\tzoo\t2"])
    with pytest.raises(ValueError, match=r"qa1_tiny_test.txt:3: answer 'zoo'"):
        load(DataConfig(source="babi", tasks=("qa1",), babi_dir=str(tiny), n_val=1))


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        (["1 Mary moved to the bathroom.", "3 John went to the hallway."], 2, "line id 3 follows 1"),
        (["2 Mary moved to the bathroom."], 1, "line id 2 follows 0"),
        (["Mary moved to the bathroom."], 1, "expected '<id> <text>'"),
        (["1 Mary moved to the bathroom.", ""], 2, "expected '<id> <text>'"),
        (["1 Mary moved to the bathroom"], 1, "must end with '.'"),
        (["1 Mary moved to the bath-room."], 1, "characters the tokenizer would drop"),
        (["1 Mary moved to the bathroom.", "2 Where is Mary?\tbathroom"], 2, "3 tab-separated fields"),
        (["1 Mary moved to the bathroom.", "2 Where is Mary\tbathroom\t1"], 2, "must end with '\\?'"),
        (["1 Mary moved to the bathroom.", "2 Where is Mary?\t\t1"], 2, "answer '' is not a word"),
        (["1 Mary moved to the bathroom.", "2 Where is Mary?\tbathroom\t"], 2, "one or more line ids"),
        (["1 Mary moved to the bathroom.", "2 Where is Mary?\tbathroom\t3"], 2, r"\[3\] are not earlier statement"),
        (["1 Mary went home.", "2 Where is Mary?\thome\t1", "3 Is Mary home?\tyes\t2"], 3, r"\[2\] are not earlier"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, lines, line, message):
    path = write(tmp_path, "qa1_bad_train.txt", lines)
    with pytest.raises(BabiFormatError, match=f"^{re.escape(str(path))}:{line}: .*{message}") as err:
        read_file(path)
    assert (err.value.path, err.value.line) == (path, line)


def test_missing_files_are_named(tiny):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_file(tiny / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"qa2_\*_train.txt in .*found none"):
        load(DataConfig(source="babi", tasks=("qa1", "qa2"), babi_dir=str(tiny), n_val=1))
    with pytest.raises(FileNotFoundError, match="babi_dir='no/such/dir'"):
        load(DataConfig(source="babi", tasks=("qa1",), babi_dir="no/such/dir", n_val=1))
    with pytest.raises(ValueError, match="n_val=3 leaves no training questions"):
        load(DataConfig(source="babi", tasks=("qa1",), babi_dir=str(tiny), n_val=3))
    with pytest.raises(ValueError, match="data.procedural.generate"):
        load(DataConfig())


def test_relative_babi_dir_is_also_looked_up_from_the_repository(babi_en, tmp_path, monkeypatch):
    relative = os.path.relpath(babi_en, REPO)
    monkeypatch.chdir(tmp_path)
    assert resolve_dir(relative).resolve() == babi_en.resolve()
