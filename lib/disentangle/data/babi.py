"""Reader for the real bAbI v1.2 files (Weston et al. 2015, CC BY 3.0), e.g. ``../shared/data/babi/en``.

File format: one line per sentence, ``"<id> <text>"``; a question line is
``"<id> <question>?<TAB><answer><TAB><supporting ids>"``. A story restarts when the id resets to 1. Ids
count question lines too, so supporting ids are *line* ids; they are mapped here to positions in the
story as the question sees it: a question in the middle of a story sees only the sentences before it,
and its :class:`~disentangle.data.Story` holds exactly those (questions themselves are not sentences).
Supporting ids keep the file's order, which follows the reasoning chain (qa3 lists "23 17 5").

Answers are lower-cased. Tasks 8 (lists-sets) and 19 (path-finding) have list answers such as
``"apple,football"`` or ``"n,w"``; each whole list is one joint answer class. In qa8 the list is a set,
so its items are sorted (``"milk,apple"`` and ``"apple,milk"`` are one class; without this, one en/ test
answer would be missing from the training answers); in qa19 the order is the path, so it is kept.

Long stories are cut to their last ``babi_max_sentences`` sentences, but older supporting sentences are
always kept (so a kept story can exceed the limit by its number of old supporting facts);
``Story.n_truncated`` counts the sentences cut, and ``TaskData.info`` has the totals.

Nothing is skipped silently: a missing file, a malformed line or a supporting id that is not an earlier
sentence of the story raises an error that names the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import DataConfig
from ..paths import REPO
from .core import SSEP, Story, TaskData, Vocab, describe, encode, encode_published, stack, tokenize

SET_ANSWER_TASKS = ("qa8",)  # list answers whose order carries no meaning: sorted into one canonical class

_LINE = re.compile(r"(\d+) (.*)")
_ANSWER = re.compile(r"[a-z0-9]+(?:,[a-z0-9]+)*")


class BabiFormatError(ValueError):
    """A malformed line in a bAbI file; the message starts with ``path:line:``."""

    def __init__(self, path: Path, line: int, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class _Question:
    story: Story  # not truncated
    story_no: int  # index of its story in the file: questions of one story share sentences
    line: int  # line number of the question in the file (1-based)


def task_of(path: Path) -> str:
    """Task id from a bAbI file name: ``qa15_basic-deduction_train.txt`` -> ``"qa15"`` (else the stem)."""
    m = re.match(r"(qa\d+)_", path.name)
    return m.group(1) if m else path.stem


def _tokens(text: str, end: str, path: Path, line: int) -> tuple[str, ...]:
    tokens = tokenize(text)
    if "".join(tokens) != "".join(text.lower().split()):
        raise BabiFormatError(path, line, f"{text!r} has characters the tokenizer would drop (allowed: a-z 0-9 ' . ? ,)")
    if not tokens or tokens[-1] != end:
        kind = "a statement" if end == "." else "a question"
        raise BabiFormatError(path, line, f"{kind} must end with {end!r}: {text!r}")
    return tuple(tokens)


def _answer(text: str, task: str, path: Path, line: int) -> str:
    answer = text.strip().lower()
    if not _ANSWER.fullmatch(answer):
        raise BabiFormatError(path, line, f"answer {text!r} is not a word or a comma-separated list of words")
    if task in SET_ANSWER_TASKS:
        answer = ",".join(sorted(answer.split(",")))
    return answer


def _read(path: Path) -> tuple[list[_Question], set[str]]:
    """The questions of one file (with their full stories) and every word of its sentences and questions."""
    if not path.is_file():
        raise FileNotFoundError(f"bAbI file not found: {path}")
    task = task_of(path)
    questions: list[_Question] = []
    words: set[str] = set()
    sentences: list[tuple[str, ...]] = []
    sentence_of_line: dict[int, int] = {}  # line id -> position among the story's sentences
    story_no, last_id = -1, 0
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise BabiFormatError(path, data.count(b"\n", 0, err.start) + 1,
                              f"byte 0x{data[err.start]:02x} at column {err.start - line_start + 1} is not UTF-8 "
                              "(bAbI files are UTF-8 text)") from None
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            text = raw.rstrip("\r\n")
            m = _LINE.fullmatch(text)
            if m is None:
                raise BabiFormatError(path, line_no, f"expected '<id> <text>', got {text!r}")
            line_id, body = int(m.group(1)), m.group(2)
            if line_id == 1:
                story_no, sentences, sentence_of_line = story_no + 1, [], {}
            elif line_id != last_id + 1:
                raise BabiFormatError(path, line_no, f"line id {line_id} follows {last_id} (ids count up from 1 within a story)")
            last_id = line_id
            if "\t" not in body:
                tokens = _tokens(body, ".", path, line_no)
                sentence_of_line[line_id] = len(sentences)
                sentences.append(tokens)
                words.update(tokens)
                continue
            fields = body.split("\t")
            if len(fields) != 3:
                raise BabiFormatError(path, line_no, f"a question line needs 3 tab-separated fields "
                                      f"(question, answer, supporting ids), got {len(fields)}")  # fmt: skip
            question = _tokens(fields[0], "?", path, line_no)
            answer = _answer(fields[1], task, path, line_no)
            ids = fields[2].split()
            if not ids or not all(i.isdigit() for i in ids):
                raise BabiFormatError(path, line_no, f"supporting ids must be one or more line ids, got {fields[2]!r}")
            stray = [int(i) for i in ids if int(i) not in sentence_of_line]
            if stray:
                raise BabiFormatError(path, line_no, f"supporting id(s) {stray} are not earlier statement lines of this story")
            supporting = tuple(sentence_of_line[int(i)] for i in ids)
            words.update(question)
            questions.append(_Question(Story(tuple(sentences), question, answer, task, supporting), story_no, line_no))
    return questions, words


def truncate(story: Story, max_sentences: int) -> Story:
    """Keep the last ``max_sentences`` sentences and every older supporting one; count the rest as cut."""
    n = len(story.sentences)
    if n <= max_sentences:
        return story
    kept = sorted(set(range(n - max_sentences, n)) | set(story.supporting))
    position = {old: new for new, old in enumerate(kept)}
    return replace(
        story,
        sentences=tuple(story.sentences[i] for i in kept),
        supporting=tuple(position[i] for i in story.supporting),
        n_truncated=story.n_truncated + n - len(kept),
    )


def truncate_published(story: Story, max_sentences: int) -> Story:
    """The original study's cut: the last ``max_sentences`` sentences, supporting or not (a supporting fact
    cut off is dropped from ``supporting``)."""
    n = len(story.sentences)
    if n <= max_sentences:
        return story
    first = n - max_sentences
    return replace(story, sentences=story.sentences[first:], n_truncated=story.n_truncated + first,
                   supporting=tuple(i - first for i in story.supporting if i >= first))


def read_file(path: str | Path, max_sentences: int | None = None) -> list[Story]:
    """One :class:`Story` per question of a bAbI file, in file order; the task is taken from the file name.

    With ``max_sentences``, long stories are cut as described in :func:`truncate`.
    """
    stories = [q.story for q in _read(Path(path))[0]]
    return [truncate(s, max_sentences) for s in stories] if max_sentences else stories


def resolve_dir(babi_dir: str) -> Path:
    """``babi_dir`` as given, or, when it is relative and not found from the working directory, relative to
    the repository root (so ``../shared/data/babi/en`` works from notebooks/ too)."""
    path = Path(babi_dir).expanduser()
    if path.is_absolute() or path.is_dir():
        return path
    from_repo = REPO / path
    if from_repo.is_dir():
        return from_repo
    raise FileNotFoundError(f"babi_dir={babi_dir!r}: no such directory (looked in {path.resolve()} and {from_repo})")


def find_file(directory: Path, task: str, kind: str) -> Path:
    """The ``{task}_*_{kind}.txt`` file of a bAbI directory (kind: "train" or "test")."""
    if not directory.is_dir():
        raise FileNotFoundError(f"bAbI directory not found: {directory}")
    matches = sorted(directory.glob(f"{task}_*_{kind}.txt"))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise FileNotFoundError(f"expected one file {task}_*_{kind}.txt in {directory}, found {found}")
    return matches[0]


def _unknown_words(story: Story, vocab: Vocab) -> int:
    return sum(w not in vocab for sentence in (*story.sentences, story.question) for w in sentence)


def load(cfg: DataConfig) -> TaskData:
    """Train / val / test splits of the bAbI tasks ``cfg.tasks`` (ids like "qa1", kept as task names).

    Per task: "val" is the last ``n_val`` questions of the train file and "train" the questions before
    them, less those of the story that straddles the boundary (they would share sentences with val
    questions; ``info["dropped_at_val_boundary"]`` counts them); "test" is the test file. ``n_train`` and
    ``n_test`` keep the first that many questions (0 = all). The vocabulary is every word of the train
    files (test words never seen there become ``<unk>``: ``info["unk_tokens"]``); the answer classes are
    the train files' answers, and a test answer outside them is an error. Stories longer than
    ``babi_max_sentences`` are cut (see :func:`truncate`; totals in ``info["truncated_sentences"]``).

    ``n_val=0`` holds no validation questions out: "train" is the whole train file and "val" is the test
    split (for the learning curve only; ``info["val_is_test"]``). ``babi_format="published"`` lays inputs out
    as the original study (:func:`~disentangle.data.core.encode_published`, :func:`truncate_published`),
    with the vocabulary of the train *and* test files (so no test word is ``<unk>``).
    """
    if cfg.source != "babi":
        raise ValueError(f"source={cfg.source!r}: data.babi.load reads bAbI files (use data.procedural.generate for procedural data)")
    root = resolve_dir(cfg.babi_dir)
    words: set[str] = set()
    answers: set[str] = set()
    chosen: dict[str, dict[str, list[_Question]]] = {"train": {}, "val": {}, "test": {}}
    files, dropped = {}, {}
    for task in cfg.tasks:
        train_path, test_path = find_file(root, task, "train"), find_file(root, task, "test")
        files[task] = {"train": train_path.name, "test": test_path.name}
        train_q, train_words = _read(train_path)
        test_q = _read(test_path)[0]
        if not test_q:
            raise ValueError(f"{test_path} has no questions")
        val = train_q[-cfg.n_val :] if cfg.n_val else []
        before = [q for q in train_q[: -cfg.n_val] if q.story_no != val[0].story_no] if cfg.n_val else list(train_q)
        if not before:
            raise ValueError(f"n_val={cfg.n_val} leaves no training questions in {train_path} ({len(train_q)} "
                             "questions; those of the story that continues into val are dropped too)")  # fmt: skip
        dropped[task] = len(train_q) - cfg.n_val - len(before)
        chosen["train"][task] = before[: cfg.n_train] if cfg.n_train else before
        chosen["val"][task] = val
        chosen["test"][task] = test_q[: cfg.n_test] if cfg.n_test else test_q
        words |= train_words | (_read(test_path)[1] if cfg.babi_format == "published" else set())
        answers |= {q.story.answer for q in train_q}
    for task in cfg.tasks:
        for q in chosen["test"][task]:
            if q.story.answer not in answers:
                raise ValueError(f"{root / files[task]['test']}:{q.line}: answer {q.story.answer!r} never occurs in "
                                 f"the training files of {list(cfg.tasks)}, so no answer class can predict it")  # fmt: skip

    published = cfg.babi_format == "published"
    vocab, answer_vocab = Vocab(words | {SSEP} if published else words), Vocab(answers, specials=())
    cut = truncate_published if published else truncate
    splits, info = {}, {"truncated_sentences": {}, "truncated_stories": {}, "unk_tokens": {}}
    for split, by_task in chosen.items():
        if not by_task[cfg.tasks[0]]:  # n_val=0: no validation split
            continue
        stories = {t: [cut(q.story, cfg.babi_max_sentences) for q in by_task[t]] for t in cfg.tasks}
        info["truncated_sentences"][split] = {t: sum(s.n_truncated for s in stories[t]) for t in cfg.tasks}
        info["truncated_stories"][split] = {t: sum(s.n_truncated > 0 for s in stories[t]) for t in cfg.tasks}
        info["unk_tokens"][split] = {t: sum(_unknown_words(s, vocab) for s in stories[t]) for t in cfg.tasks}
        examples = [encode_published(s, vocab, answer_vocab, cfg.babi_max_tokens) if published else encode(s, vocab, answer_vocab)
                    for t in cfg.tasks for s in stories[t]]
        splits[split] = stack(examples, cfg.tasks)
    if "val" not in splits:
        splits["val"] = splits["test"]
    info = {"source": "babi", "babi_dir": str(root.resolve()), "files": files, "vocab_size": len(vocab),
            "n_answers": len(answer_vocab), "dropped_at_val_boundary": dropped, "val_is_test": cfg.n_val == 0, "babi_format": cfg.babi_format, **info,
            **describe(splits, cfg.tasks)}  # fmt: skip
    return TaskData(vocab=vocab, answers=answer_vocab, tasks=tuple(cfg.tasks), splits=splits, info=info)
