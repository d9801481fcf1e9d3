"""Data structures shared by the procedural tasks (``procedural.py``) and the bAbI reader (``babi.py``).

A question-answering example goes through two stages:

* :class:`Story` — text: sentences, a question, a one-word answer, the task name and the ids of the
  supporting sentences. Generators and readers produce these.
* :class:`Example` — the model's input: ``[CLS] story [SEP] question [SEP]`` as token ids, the
  answer's class id, and masks aligned with the tokens (supporting tokens, the sentence each token
  belongs to, question tokens).

:class:`Split` stacks examples into padded tensors; :class:`TaskData` holds the vocabularies and the
train / val / test (/ ood) splits that one run trains and evaluates on.

Conventions: ``padding_mask`` is True on padding (PyTorch's key-padding convention); sentence ids are
0-based positions in the (possibly truncated) story; ``-1`` marks tokens outside the story.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

PAD, CLS, SEP, UNK = "<pad>", "<cls>", "<sep>", "<unk>"
SPECIALS = (PAD, CLS, SEP, UNK)
# Tokens that carry no content; attention on them is counted as "sink" mass by the analyses.
PUNCTUATION = (".", "?", ",")

_TOKEN_RE = re.compile(r"[a-z0-9']+|[.?,]")


def tokenize(text: str) -> list[str]:
    """Lower-case words and punctuation: ``"Mary went home."`` -> ``["mary", "went", "home", "."]``."""
    return _TOKEN_RE.findall(text.lower())


class Vocab:
    """Token <-> id mapping. Ids are stable: specials first, then the given words in sorted order."""

    def __init__(self, words: Iterable[str], specials: Sequence[str] = SPECIALS):
        self.specials = tuple(specials)
        rest = sorted(set(words) - set(self.specials))
        self.itos: list[str] = [*self.specials, *rest]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def id(self, word: str) -> int:
        try:
            return self.stoi[word]
        except KeyError:
            if UNK in self.stoi:
                return self.stoi[UNK]
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self)} tokens)") from None

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.id(w) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def to_list(self) -> list[str]:
        return list(self.itos)

    @classmethod
    def from_list(cls, itos: Sequence[str], specials: Sequence[str] = SPECIALS) -> Vocab:
        vocab = cls(itos, specials)
        if vocab.itos != list(itos):
            raise ValueError("token list is not in canonical order (specials, then sorted words)")
        return vocab


@dataclass(frozen=True)
class Story:
    """One question about one story, as text."""

    sentences: tuple[tuple[str, ...], ...]  # each sentence tokenised, ending with "."
    question: tuple[str, ...]  # tokenised, ending with "?"
    answer: str  # a single token
    task: str
    supporting: tuple[int, ...]  # ids (0-based positions in `sentences`) of the supporting sentences
    n_truncated: int = 0  # sentences dropped from the front of a long story (bAbI)

    def text(self) -> str:
        return " ".join(" ".join(s) for s in self.sentences) + " | " + " ".join(self.question)


@dataclass(frozen=True)
class Example:
    """One model input with its ground truth, aligned token by token."""

    tokens: tuple[int, ...]  # [CLS] story [SEP] question [SEP]
    answer: int  # class id in the answer vocabulary
    task: str
    supporting: tuple[int, ...]  # supporting sentence ids
    support_mask: tuple[bool, ...]  # True on every token of a supporting sentence
    sentence_ids: tuple[int, ...]  # story sentence of each token; -1 for CLS, SEP and question tokens
    question_mask: tuple[bool, ...]  # True on question tokens (not the SEPs)
    story: Story = field(compare=False, repr=False)


SSEP = "<ssep>"  # the sentence separator of the original study's input format (encode_published); a word, not a special


def encode_published(story: Story, vocab: Vocab, answers: Vocab, max_tokens: int) -> Example:
    """The original study's layout: ``s_0 <ssep> s_1 <ssep> ... s_n <ssep> [SEP] question``, no CLS (its
    readout is the mean over tokens), cut to the *last* ``max_tokens`` tokens (the masks with it: a story cut
    inside a sentence keeps that sentence's tail). Separators are outside every sentence (sentence id -1)."""
    tokens, sent_ids = [], []
    for i, sentence in enumerate(story.sentences):
        tokens += [*vocab.encode(sentence), vocab.id(SSEP)]
        sent_ids += [i] * len(sentence) + [-1]
    tokens.append(vocab.id(SEP))
    sent_ids.append(-1)
    qmask = [False] * len(tokens) + [True] * len(story.question)
    tokens += vocab.encode(story.question)
    sent_ids += [-1] * len(story.question)
    tokens, sent_ids, qmask = tokens[-max_tokens:], sent_ids[-max_tokens:], qmask[-max_tokens:]
    kept = set(sent_ids)
    supporting = tuple(s for s in story.supporting if s in kept)  # a supporting fact cut off is gone (as published)
    if story.answer not in answers:
        raise KeyError(f"answer {story.answer!r} of a {story.task} story is not in the answer vocabulary")
    return Example(
        tokens=tuple(tokens),
        answer=answers.stoi[story.answer],
        task=story.task,
        supporting=supporting,
        support_mask=tuple(s in set(supporting) for s in sent_ids),
        sentence_ids=tuple(sent_ids),
        question_mask=tuple(qmask),
        story=story,
    )


def encode(story: Story, vocab: Vocab, answers: Vocab) -> Example:
    """Lay out ``[CLS] s_0 ... s_n [SEP] question [SEP]`` and build the aligned masks."""
    tokens, sent_ids, qmask = [vocab.id(CLS)], [-1], [False]
    for i, sentence in enumerate(story.sentences):
        tokens += vocab.encode(sentence)
        sent_ids += [i] * len(sentence)
        qmask += [False] * len(sentence)
    tokens.append(vocab.id(SEP))
    sent_ids.append(-1)
    qmask.append(False)
    tokens += vocab.encode(story.question)
    sent_ids += [-1] * len(story.question)
    qmask += [True] * len(story.question)
    tokens.append(vocab.id(SEP))
    sent_ids.append(-1)
    qmask.append(False)
    supporting = set(story.supporting)
    support_mask = tuple(s in supporting for s in sent_ids)
    if story.answer not in answers:
        raise KeyError(f"answer {story.answer!r} of a {story.task} story is not in the answer vocabulary")
    return Example(
        tokens=tuple(tokens),
        answer=answers.stoi[story.answer],
        task=story.task,
        supporting=tuple(story.supporting),
        support_mask=support_mask,
        sentence_ids=tuple(sent_ids),
        question_mask=tuple(qmask),
        story=story,
    )


@dataclass
class Split:
    """A split as padded tensors (N examples, T = longest sequence)."""

    tokens: torch.Tensor  # (N, T) long
    padding_mask: torch.Tensor  # (N, T) bool, True on padding
    answers: torch.Tensor  # (N,) long, answer class ids
    task_ids: torch.Tensor  # (N,) long, index into TaskData.tasks
    support_mask: torch.Tensor  # (N, T) bool
    sentence_ids: torch.Tensor  # (N, T) long, -1 outside the story
    question_mask: torch.Tensor  # (N, T) bool
    segments: torch.Tensor  # (N, T) long: sentence id + 1 on story tokens, 0 on CLS, SEPs and the question
    stories: list[Story]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def batch(self, idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """Tensors of a subset, trimmed to the subset's longest sequence (no all-padding columns)."""
        out = {name: getattr(self, name)[idx] for name in TENSOR_FIELDS}
        real = ~out["padding_mask"]
        length = int(real.any(0).nonzero().max()) + 1 if real.any() else 1
        return {k: (v[:, :length] if v.dim() == 2 else v) for k, v in out.items()}

    def subset(self, idx: torch.Tensor) -> Split:
        idx_list = idx.tolist()
        return Split(**{n: getattr(self, n)[idx] for n in TENSOR_FIELDS}, stories=[self.stories[i] for i in idx_list])


TENSOR_FIELDS = ("tokens", "padding_mask", "answers", "task_ids", "support_mask", "sentence_ids", "question_mask", "segments")


def stack(examples: Sequence[Example], tasks: Sequence[str], pad_id: int = 0) -> Split:
    """Pad a list of examples into a :class:`Split`; ``tasks`` fixes the task-id order."""
    if not examples:
        raise ValueError("cannot build a split from zero examples")
    task_index = {t: i for i, t in enumerate(tasks)}
    n, t = len(examples), max(len(e.tokens) for e in examples)
    tokens = torch.full((n, t), pad_id, dtype=torch.long)
    padding = torch.ones(n, t, dtype=torch.bool)
    support = torch.zeros(n, t, dtype=torch.bool)
    sent = torch.full((n, t), -1, dtype=torch.long)
    question = torch.zeros(n, t, dtype=torch.bool)
    for i, e in enumerate(examples):
        k = len(e.tokens)
        tokens[i, :k] = torch.tensor(e.tokens)
        padding[i, :k] = False
        support[i, :k] = torch.tensor(e.support_mask)
        sent[i, :k] = torch.tensor(e.sentence_ids)
        question[i, :k] = torch.tensor(e.question_mask)
    return Split(
        tokens=tokens,
        padding_mask=padding,
        answers=torch.tensor([e.answer for e in examples]),
        task_ids=torch.tensor([task_index[e.task] for e in examples]),
        support_mask=support,
        sentence_ids=sent,
        question_mask=question,
        # The model's sentence-local layers attend within equal segment ids (model.ModelConfig.local_layers).
        segments=sent + 1,
        stories=[e.story for e in examples],
    )


def iter_batches(split: Split, batch_size: int, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
    """The split in order, ``batch_size`` examples at a time, as tensors on ``device``."""
    for start in range(0, len(split), batch_size):
        b = split.batch(slice(start, start + batch_size))
        yield {k: v.to(device) for k, v in b.items()}


@dataclass
class TaskData:
    """Everything one run needs from the data side."""

    vocab: Vocab  # input tokens
    answers: Vocab  # answer classes (no specials)
    tasks: tuple[str, ...]  # task names; Split.task_ids index this
    splits: dict[str, Split]  # "train", "val", "test" and, for procedural tasks, "ood"
    info: dict = field(default_factory=dict)  # e.g. how many sentences were truncated, per split

    @property
    def max_len(self) -> int:
        return max(s.seq_len for s in self.splits.values())

    def chance(self, split: str = "test") -> dict[str, float]:
        """Accuracy of always answering each task's most frequent answer (majority-class chance)."""
        s = self.splits[split]
        out = {}
        for i, task in enumerate(self.tasks):
            answers = s.answers[s.task_ids == i]
            out[task] = float(answers.bincount().max() / len(answers)) if len(answers) else float("nan")
        return out


def answer_vocab(stories: Iterable[Story]) -> Vocab:
    return Vocab((s.answer for s in stories), specials=())


def _stats(values: Sequence[int]) -> dict[str, float]:
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "p90": v[int(0.9 * (len(v) - 1))], "max": v[-1],
            "mean": round(sum(v) / len(v), 2)}  # fmt: skip


def describe(splits: dict[str, Split], tasks: Sequence[str]) -> dict:
    """Per-split statistics for ``TaskData.info`` (plain dicts, JSON-friendly): examples per task, answer
    counts per task, and the distribution of sentences per story and of tokens per encoded input."""
    out: dict[str, dict] = {"sizes": {}, "answers": {}, "sentences": {}, "tokens": {}}
    for name, split in splits.items():
        by_task = defaultdict(list)
        for story in split.stories:
            by_task[story.task].append(story)
        out["sizes"][name] = {t: len(by_task[t]) for t in tasks}
        out["answers"][name] = {t: dict(sorted(Counter(s.answer for s in by_task[t]).items())) for t in tasks}
        out["sentences"][name] = _stats([len(s.sentences) for s in split.stories])
        out["tokens"][name] = _stats((~split.padding_mask).sum(1).tolist())
    return out


# ------------------------------------------------------------------------------------ reference solver
