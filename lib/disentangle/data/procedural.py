"""Procedural bAbI-style reasoning tasks with ground-truth supporting sentences (the default data).

A small world is narrated in short lower-case sentences (each ending with ``"."``), followed by one
question (ending with ``"?"``) whose answer is a single token. Everything is generated here, offline and
deterministically from ``DataConfig.seed``. Unlike the real bAbI files, every example knows exactly which
sentences its answer depends on (``Story.supporting``, sorted ids), so the analyses can score attention.

==============  ==============================================  ==================  ==========================
task            question (example)                              answers             supporting sentences
==============  ==============================================  ==================  ==========================
where_person    where is mary ?                                 8 places            (1) mary's last move
where_object    where is the football ?                         8 places            (2) see below
coreference     where is mary ?   (moves told with "then she")  8 places            (1-2) see below
counting        how many objects is john carrying ?             none .. three       (1+) see below
majority        are there more boys or girls in the kitchen ?   boys/girls/equal    (2+) see below
deduction       what is gertrude afraid of ?                    8 plural species    (2) see below
==============  ==============================================  ==================  ==========================

Supporting sentences:

* where_object: a held object -> the grab by its holder and the holder's last move (before or after the
  grab); a dropped object -> the drop and the dropper's last move before it.
* coreference: the person's last move; when that move is told with a pronoun, also the previous sentence,
  which names the person (the antecedent).
* counting: every sentence in which the person grabs or drops an object, as bAbI qa7/qa8 do (a grab later
  undone by a drop is needed to read the drop).
* majority: the last move of every person who is in the place at the end. Moves that took other people
  away are not marked: they matter only by no longer placing anyone there.
* deduction: "gertrude is a wolf ." and "every wolf is afraid of cats ." (the answer is the plural as
  written, and the species token links the two facts).

World rules (checked both by the generator and by :func:`solve`): a person's place is unknown until they
move; a move never goes to the place the person is already in; an object can be grabbed when nobody holds
it and, if it was dropped somewhere known, only by a person who is there; only its holder can drop it, and
it then stays where the holder was. A held object is wherever its holder is. A pronoun ("then she went
...") refers to the subject of the previous sentence, which names that person (as in bAbI qa11), so
binding needs recency, not just gender (in ~60 % of pronoun questions another person of the same gender
is in the story).

Answer classes are balanced by rejection sampling: for each story a target class is drawn first (among
those possible at the story's length), then worlds are drawn until the question can be asked with that
answer. Targets: where_object: the object was carried off after being grabbed 60 %, dropped 25 %, grabbed
where its holder already was 15 % (so most questions compose two facts across time); coreference: the
last move is told with a pronoun 75 %, with the name 25 %; counting: none / one / two / three uniform
among the possible ones (three needs three sentences; "none" means grabbed, then dropped); majority: boys
/ girls / equal uniform, always about a place with at least two people (stories of two or more
sentences, casts of three or more). Places and species are uniform by symmetry; a deduction story with
three or more sentences states at least two fear facts. With the default config the train split comes
out as: counting none 27 % / one 27 % / two 27 % / three 19 % (three is impossible in 2-sentence stories);
majority ~1/3 each, 86 % of the places holding two people and 14 % three; where_object carried 63 % /
dropped 21 % / static 16 %; coreference pronoun 75 %; places and species 11-14 % each.
``TaskData.info["answers"]`` has the counts per split and task.

Entities: each story draws n_people people (half boys, half girls, a coin for an odd one) from 16 names,
n_places places and n_objects objects from pools of 8. Deduction draws n_people animals and n_objects
species instead, more when a long story needs more distinct facts. The vocabulary and the answer classes
are the full pools, so they are the same whatever is sampled.

Distractors (``n_distractors`` per story) are extra sentences about entities the question does not
involve, inserted at random positions; each one is kept only if replaying the world gives the same answer
and the same supporting sentences, so they never change the answer (nor split a pronoun from its
antecedent).

Public API: :func:`generate` (DataConfig -> TaskData), :func:`make_story` (one story, for tests and
notebooks), :func:`solve` (the reference solver, which reads only the story's text), :func:`format_story`
/ :func:`story_html` (pretty printers), :func:`build_vocab` / :func:`answer_vocab_for` (the fixed
vocabularies) and :func:`describe` (split statistics for ``info``).
"""

from __future__ import annotations

import html
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import PROCEDURAL_TASKS, DataConfig
from .core import Story, TaskData, Vocab, describe, encode, stack

# ------------------------------------------------------------------------------------------ lexicon

BOYS = ("john", "daniel", "fred", "bill", "jeff", "sumit", "yann", "jason")
GIRLS = ("mary", "sandra", "julie", "kate", "anna", "sophie", "lucy", "emma")
PRONOUN = {**{b: "he" for b in BOYS}, **{g: "she" for g in GIRLS}}
PLACES = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office", "cellar", "library")
OBJECTS = ("football", "apple", "milk", "book", "key", "umbrella", "hat", "phone")
# Deduction: named animals, and species. The species token links the two facts of the chain
# ("gertrude is a wolf ." / "every wolf is afraid of cats ."); the answer is the plural as written.
ANIMALS = ("gertrude", "winona", "emily", "jessica", "bernhard", "brian", "julius", "lily")
PLURAL = {"cat": "cats", "dog": "dogs", "mouse": "mice", "wolf": "wolves", "goat": "goats",
          "lion": "lions", "frog": "frogs", "swan": "swans"}  # fmt: skip
SPECIES = tuple(PLURAL)
NUMBERS = ("none", "one", "two", "three")  # counting answers; stories are drawn so counts stay <= three
MAJORITY = ("boys", "girls", "equal")

# Several wordings per action, as in bAbI, so that a model cannot key on one verb.
MOVE_VERBS = (("went",), ("journeyed",), ("moved",), ("travelled",))
GRAB_VERBS = (("picked", "up"), ("got",), ("grabbed",), ("took",))
DROP_VERBS = (("dropped",), ("put", "down"), ("left",), ("discarded",))
CONNECTIVES = (("then",), ("after", "that"), ("afterwards",), ("following", "that"))
FEAR_VERBS = (("is", "afraid", "of"), ("fears",))
MEMBER_VERB = ("is", "a")

ANSWERS: dict[str, tuple[str, ...]] = {
    "where_person": PLACES,
    "where_object": PLACES,
    "coreference": PLACES,
    "counting": NUMBERS,
    "majority": MAJORITY,
    "deduction": tuple(PLURAL.values()),
}

# Words of the templates that are not entities (questions included).
_FUNCTION_WORDS = ("to", "the", "every", "where", "how", "many", "objects", "is", "carrying", "are", "there",
                   "more", "boys", "or", "girls", "in", "what", "afraid", "of", "he", "she", ".", "?")  # fmt: skip

SPLITS = ("train", "val", "test", "ood")

# Fewest narrative sentences a task can be told in (where_object: a grab and a move; deduction: both facts).
MIN_LENGTH = {"where_person": 1, "where_object": 2, "coreference": 1, "counting": 1, "majority": 1, "deduction": 2}


def build_vocab() -> Vocab:
    """Input vocabulary of all procedural tasks: the full lexicon plus function words.

    It does not depend on what is sampled (or on which tasks are selected), so models trained on different
    task subsets or seeds share token ids.
    """
    verbs = [w for group in (MOVE_VERBS, GRAB_VERBS, DROP_VERBS, CONNECTIVES, FEAR_VERBS) for v in group for w in v]
    words = [*BOYS, *GIRLS, *PLACES, *OBJECTS, *ANIMALS, *SPECIES, *PLURAL.values(), *verbs, *MEMBER_VERB,
             *_FUNCTION_WORDS]  # fmt: skip
    return Vocab(words)


def answer_vocab_for(tasks: Sequence[str]) -> Vocab:
    """Answer classes: every answer the given tasks can have (not only those that were sampled)."""
    _check_tasks(tasks)
    return Vocab((a for t in tasks for a in ANSWERS[t]), specials=())


# ------------------------------------------------------------------------------- world (generator side)


@dataclass(frozen=True)
class _Event:
    """One narrated fact, before it is rendered to tokens."""

    kind: str  # "move", "grab", "drop" (subject: a person), "member" (an animal), "fear" (a species)
    subject: str
    target: str  # place, object, species (member) or the feared species, singular (fear)
    verb: tuple[str, ...]
    lead: tuple[str, ...] = ()  # connective of a pronoun sentence ("then"); empty when the subject is named

    @property
    def pronoun(self) -> bool:
        return bool(self.lead)

    def tokens(self) -> tuple[str, ...]:
        if self.kind == "move":
            who = (*self.lead, PRONOUN[self.subject]) if self.pronoun else (self.subject,)
            return (*who, *self.verb, "to", "the", self.target, ".")
        if self.kind in ("grab", "drop"):
            return (self.subject, *self.verb, "the", self.target, ".")
        if self.kind == "member":
            return (self.subject, *self.verb, self.target, ".")
        return ("every", self.subject, *self.verb, PLURAL[self.target], ".")


class _Impossible(Exception):
    """An event the world does not allow (e.g. dropping what one does not hold)."""


class _World:
    """The generator's bookkeeping: applies events in order, rejects impossible ones, and records which
    sentences establish each fact (those become the supporting sentences)."""

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.place: dict[str, str] = {}  # person -> current place
        self.placed_by: dict[str, tuple[int, ...]] = {}  # person -> sentence(s) of the last move
        self.holder: dict[str, str] = {}  # object -> person holding it
        self.grabbed_at: dict[str, int] = {}  # held object -> sentence of the grab
        self.dropped: dict[str, tuple[str | None, tuple[int, ...]]] = {}  # object -> (place, sentences)
        self.touched: defaultdict[str, list[int]] = defaultdict(list)  # person -> their grab/drop sentences
        self.kind: dict[str, tuple[str, int]] = {}  # animal -> (species, sentence)
        self.fear: dict[str, tuple[str, int]] = {}  # species -> (feared species, sentence)

    def apply(self, e: _Event) -> None:
        i = len(self.events)
        prev = self.events[-1] if self.events else None
        if e.kind == "move":
            # A pronoun binds to the previous sentence's subject, so that sentence must name this person.
            if e.pronoun and (prev is None or prev.pronoun or prev.kind not in ("move", "grab", "drop")
                              or prev.subject != e.subject):  # fmt: skip
                raise _Impossible
            if self.place.get(e.subject) == e.target:
                raise _Impossible
            self.place[e.subject] = e.target
            self.placed_by[e.subject] = (i - 1, i) if e.pronoun else (i,)
        elif e.kind == "grab":
            lies_at = self.dropped.get(e.target, (None, ()))[0]
            if e.target in self.holder or (lies_at is not None and self.place.get(e.subject) != lies_at):
                raise _Impossible
            self.holder[e.target] = e.subject
            self.grabbed_at[e.target] = i
            self.dropped.pop(e.target, None)
            self.touched[e.subject].append(i)
        elif e.kind == "drop":
            if self.holder.get(e.target) != e.subject:
                raise _Impossible
            del self.holder[e.target], self.grabbed_at[e.target]
            at = self.place.get(e.subject)
            self.dropped[e.target] = (at, (*self.placed_by[e.subject], i) if at else (i,))
            self.touched[e.subject].append(i)
        elif e.kind == "member":
            if e.subject in self.kind:
                raise _Impossible
            self.kind[e.subject] = (e.target, i)
        else:
            if e.subject in self.fear or e.subject == e.target:
                raise _Impossible
            self.fear[e.subject] = (e.target, i)
        self.events.append(e)

    # Answers (answer, sorted supporting sentence ids) to each kind of question.

    def where_person(self, person: str) -> tuple[str, tuple[int, ...]]:
        return self.place[person], tuple(sorted(self.placed_by[person]))

    def object_status(self, obj: str) -> str | None:
        """"carried" (holder moved after grabbing it), "static" (holder has not moved since), "dropped"
        (at a known place), or None when its place is unknown."""
        if obj in self.holder:
            holder = self.holder[obj]
            if holder not in self.place:
                return None
            return "carried" if max(self.placed_by[holder]) > self.grabbed_at[obj] else "static"
        if obj in self.dropped and self.dropped[obj][0] is not None:
            return "dropped"
        return None

    def where_object(self, obj: str) -> tuple[str, tuple[int, ...]]:
        if obj in self.holder:
            holder = self.holder[obj]
            return self.place[holder], tuple(sorted({self.grabbed_at[obj], *self.placed_by[holder]}))
        at, ids = self.dropped[obj]
        assert at is not None, f"asked where {obj} is, but it was dropped at an unknown place"
        return at, tuple(sorted(ids))

    def carrying(self, person: str) -> int:
        return sum(h == person for h in self.holder.values())

    def count(self, person: str) -> tuple[str, tuple[int, ...]]:
        return NUMBERS[self.carrying(person)], tuple(self.touched[person])

    def people_at(self, place: str) -> list[str]:
        return [p for p, at in self.place.items() if at == place]

    def majority(self, place: str) -> tuple[str, tuple[int, ...]] | None:
        here = self.people_at(place)
        if not here:
            return None
        boys = sum(PRONOUN[p] == "he" for p in here)
        girls = len(here) - boys
        answer = "boys" if boys > girls else "girls" if girls > boys else "equal"
        return answer, tuple(sorted(i for p in here for i in self.placed_by[p]))

    def afraid(self, animal: str) -> tuple[str, tuple[int, ...]]:
        species, i = self.kind[animal]
        feared, j = self.fear[species]
        return PLURAL[feared], tuple(sorted((i, j)))


def _replay(events: Sequence[_Event]) -> _World:
    world = _World()
    for e in events:
        world.apply(e)
    return world


# ------------------------------------------------------------------------------------------ drafting

# Tries per sentence before a draft is abandoned, and drafts per story before giving up.
_PROPOSALS = 30
_ATTEMPTS = 2000
_PRONOUN_RATE = 0.5  # coreference: chance that a move right after a named move is told with a pronoun
_PROTAGONIST = 0.5  # where_object, counting: share of actions by one person (see _actor)
# Relative weights of move / grab / drop in narratives with objects.
_ACTION_WEIGHTS = {"where_object": (4, 4, 2), "counting": (2, 5, 3)}
# Target answer classes (see the module docstring) and the shortest story each needs.
_TARGETS: dict[str, dict[str, float]] = {
    "where_object": {"carried": 0.60, "dropped": 0.25, "static": 0.15},
    "coreference": {"pronoun": 0.75, "named": 0.25},
    "counting": dict.fromkeys(NUMBERS, 1.0),
    "majority": dict.fromkeys(MAJORITY, 1.0),
}
_TARGET_MIN_LENGTH = {"carried": 2, "dropped": 3, "static": 2, "pronoun": 2, "named": 1,
                      "none": 2, "one": 1, "two": 2, "three": 3, "boys": 1, "girls": 1, "equal": 2}  # fmt: skip


@dataclass
class _Draft:
    events: list[_Event]  # the narrative
    question: tuple[str, ...]
    answer: Callable[[_World], tuple[str, tuple[int, ...]]]  # answer and supporting ids from a replayed world
    distractor: Callable[[], _Event] | None  # proposes a sentence about entities the question does not involve


def _cast(rng: random.Random, cfg: DataConfig) -> tuple[list[str], list[str], list[str]]:
    """The people (half boys, half girls; a coin decides an odd one), places and objects of one story."""
    n_boys = cfg.n_people // 2 + (cfg.n_people % 2 if rng.random() < 0.5 else 0)
    people = rng.sample(BOYS, n_boys) + rng.sample(GIRLS, cfg.n_people - n_boys)
    rng.shuffle(people)  # people[0] is the protagonist of _actor, of either gender
    return people, rng.sample(PLACES, cfg.n_places), rng.sample(OBJECTS, cfg.n_objects)


def _move(rng: random.Random, person: str, places: Sequence[str], lead: tuple[str, ...] = ()) -> _Event:
    return _Event("move", person, rng.choice(places), rng.choice(MOVE_VERBS), lead)


def _action(rng: random.Random, person: str, places: Sequence[str], objects: Sequence[str],
            weights: tuple[int, int, int], world: _World | None = None) -> _Event:  # fmt: skip
    """A move, grab or drop by ``person``. With a world, grabs need a free object and drops a held one;
    without one (a distractor, whose position is not known yet) the replay sorts out what is possible."""
    moves, grabs, drops = weights
    held = [o for o in objects if world.holder.get(o) == person] if world is not None else []
    if world is not None:
        grabs *= any(o not in world.holder for o in objects)
        drops *= bool(held)
    kind = rng.choices(("move", "grab", "drop"), (moves, grabs, drops))[0]
    if kind == "move":
        return _move(rng, person, places)
    if kind == "grab":
        return _Event("grab", person, rng.choice(objects), rng.choice(GRAB_VERBS))
    return _Event("drop", person, rng.choice(held or objects), rng.choice(DROP_VERBS))


def _actor(rng: random.Random, people: Sequence[str]) -> str:
    """Who acts next: people[0] half of the time, otherwise anyone. Short stories then often hold the
    chains that rarer answer classes need (three grabs by one person, a grab and a drop), which keeps
    rejection sampling cheap; the question may still be about anyone."""
    return people[0] if rng.random() < _PROTAGONIST else rng.choice(people)


def _narrate(length: int, propose: Callable[[_World], _Event]) -> _World | None:
    """Apply ``length`` proposed events, redrawing impossible ones; None if the world gets stuck."""
    world = _World()
    while len(world.events) < length:
        for _ in range(_PROPOSALS):
            try:
                world.apply(propose(world))
                break
            except _Impossible:
                continue
        else:
            return None
    return world


def _draft_where_person(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    people, places, _ = _cast(rng, cfg)
    world = _narrate(length, lambda w: _move(rng, rng.choice(people), places))
    if world is None:
        return None
    person = rng.choice(list(world.place))
    others = [p for p in people if p != person]
    return _Draft(world.events, ("where", "is", person, "?"), lambda w: w.where_person(person),
                  lambda: _move(rng, rng.choice(others), places))  # fmt: skip


def _draft_coreference(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    people, places, _ = _cast(rng, cfg)

    def propose(w: _World) -> _Event:
        prev = w.events[-1] if w.events else None
        if prev is not None and not prev.pronoun and rng.random() < _PRONOUN_RATE:
            return _move(rng, prev.subject, places, lead=rng.choice(CONNECTIVES))
        return _move(rng, rng.choice(people), places)

    world = _narrate(length, propose)
    if world is None:
        return None
    candidates = [p for p in world.place if (len(world.placed_by[p]) == 2) == (target == "pronoun")]
    if not candidates:
        return None
    person = rng.choice(candidates)
    others = [p for p in people if p != person]
    return _Draft(world.events, ("where", "is", person, "?"), lambda w: w.where_person(person),
                  lambda: _move(rng, rng.choice(others), places))  # fmt: skip


def _draft_where_object(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    people, places, objects = _cast(rng, cfg)
    weights = _ACTION_WEIGHTS["where_object"]
    world = _narrate(length, lambda w: _action(rng, _actor(rng, people), places, objects, weights, w))
    if world is None:
        return None
    candidates = [o for o in objects if world.object_status(o) == target]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    # Anyone who ever handled the object is involved in the question, even if they no longer hold it.
    involved = {e.subject for e in world.events if e.target == obj}
    others = [p for p in people if p not in involved]
    rest = [o for o in objects if o != obj]
    distractor = (lambda: _action(rng, rng.choice(others), places, rest, weights)) if others and rest else None
    return _Draft(world.events, ("where", "is", "the", obj, "?"), lambda w: w.where_object(obj), distractor)


def _draft_counting(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    people, places, objects = _cast(rng, cfg)
    weights = _ACTION_WEIGHTS["counting"]
    world = _narrate(length, lambda w: _action(rng, _actor(rng, people), places, objects, weights, w))
    if world is None:
        return None
    wanted = NUMBERS.index(target)
    candidates = [p for p in people if world.touched[p] and world.carrying(p) == wanted]
    if not candidates:
        return None
    person = rng.choice(candidates)
    others = [p for p in people if p != person]
    return _Draft(world.events, ("how", "many", "objects", "is", person, "carrying", "?"),
                  lambda w: w.count(person),
                  lambda: _action(rng, rng.choice(others), places, objects, weights))  # fmt: skip


def _draft_majority(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    people, places, _ = _cast(rng, cfg)
    world = _narrate(length, lambda w: _move(rng, rng.choice(people), places))
    if world is None:
        return None
    # At least two people in the place, so the answer always aggregates over several last moves (a cast
    # of two, one boy and one girl, could then only ever answer "equal").
    crowd = 2 if length >= 2 and cfg.n_people >= 3 else 1
    candidates = [pl for pl in places if (m := world.majority(pl)) is not None and m[0] == target
                  and len(world.people_at(pl)) >= crowd]  # fmt: skip
    if not candidates:
        return None
    place = rng.choice(candidates)
    others = [p for p in people if world.place.get(p) != place]
    distractor = (lambda: _move(rng, rng.choice(others), places)) if others else None
    question = ("are", "there", "more", "boys", "or", "girls", "in", "the", place, "?")
    return _Draft(world.events, question, lambda w: w.majority(place), distractor)


def _zoo_size(cfg: DataConfig, n_facts: int) -> tuple[int, int]:
    """Animals (n_people) and species (n_objects) of a deduction story, grown when it needs more facts
    than they give: every animal has one membership fact and every species one fear fact."""
    if n_facts > len(ANIMALS) + len(SPECIES):
        raise ValueError(f"a deduction story has at most {len(ANIMALS) + len(SPECIES)} distinct facts, "
                         f"not {n_facts} (sentences + n_distractors)")  # fmt: skip
    names, species = min(cfg.n_people, len(ANIMALS)), min(cfg.n_objects, len(SPECIES))
    while names + species < n_facts:
        if names <= species and names < len(ANIMALS) or species == len(SPECIES):
            names += 1
        else:
            species += 1
    return names, species


def _draft_deduction(rng: random.Random, cfg: DataConfig, length: int, target: str | None) -> _Draft | None:
    n_names, n_species = _zoo_size(cfg, length + cfg.n_distractors)
    names, species = rng.sample(ANIMALS, n_names), rng.sample(SPECIES, n_species)
    members = [_Event("member", n, rng.choice(species), MEMBER_VERB) for n in names]
    fears = [_Event("fear", s, rng.choice([t for t in SPECIES if t != s]), rng.choice(FEAR_VERBS)) for s in species]
    asked = members[0]  # names are in random order already
    chain = next(f for f in fears if f.subject == asked.target)
    spare_fears = [f for f in fears if f is not chain]
    spare = spare_fears + members[1:]
    rng.shuffle(spare)
    # At least two fear facts whenever the story is long enough: with a single one, the answer could be
    # read off it without following the chain.
    if length >= 3 and spare_fears and not any(e.kind == "fear" for e in spare[: length - 2]):
        spare.insert(0, spare.pop(next(i for i, e in enumerate(spare) if e.kind == "fear")))
    extra, rest = spare[: length - 2], spare[length - 2 :]
    events = [asked, chain, *extra]
    rng.shuffle(events)
    rest_fears = [e for e in rest if e.kind == "fear"]
    pool = rest_fears if rest_fears and not any(e.kind == "fear" for e in extra) else rest
    distractor = (lambda: rng.choice(pool)) if pool else None
    return _Draft(events, ("what", "is", asked.subject, "afraid", "of", "?"), lambda w: w.afraid(asked.subject),
                  distractor)  # fmt: skip


_DRAFTERS: dict[str, Callable[[random.Random, DataConfig, int, str | None], _Draft | None]] = {
    "where_person": _draft_where_person,
    "where_object": _draft_where_object,
    "coreference": _draft_coreference,
    "counting": _draft_counting,
    "majority": _draft_majority,
    "deduction": _draft_deduction,
}


def _with_distractors(rng: random.Random, draft: _Draft, n: int) -> list[_Event] | None:
    """The narrative with ``n`` distractors at random positions, each kept only if the answer and the
    supporting sentences (shifted by the insertion) stay the same; None if none could be placed."""
    events = list(draft.events)
    expected = draft.answer(_replay(events))
    for _ in range(n):
        if draft.distractor is None:
            return None
        for _ in range(_PROPOSALS):
            pos = rng.randint(0, len(events))
            trial = [*events[:pos], draft.distractor(), *events[pos:]]
            try:
                got = draft.answer(_replay(trial))
            except _Impossible:
                continue
            shifted = (expected[0], tuple(i + (i >= pos) for i in expected[1]))
            if got == shifted:
                events, expected = trial, shifted
                break
        else:
            return None
    return events


def _target(task: str, rng: random.Random, cfg: DataConfig, length: int) -> str | None:
    """The answer class this story must have (rejection sampling balances classes), among those possible."""
    if task not in _TARGETS:
        return None
    options = {t: w for t, w in _TARGETS[task].items() if _TARGET_MIN_LENGTH[t] <= length
               and not (task == "counting" and NUMBERS.index(t) > cfg.n_objects)}  # fmt: skip
    return rng.choices(list(options), list(options.values()))[0]


def _check_tasks(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if t not in _DRAFTERS]
    if bad:
        raise ValueError(f"tasks: {bad} are not procedural tasks (allowed: {list(PROCEDURAL_TASKS)})")


def make_story(task: str, rng: random.Random, cfg: DataConfig, length: int | None = None) -> Story:
    """One story of ``task``: ``length`` narrative sentences (default: uniform in cfg.story_min..story_max)
    plus cfg.n_distractors distractors, a question, its answer and the supporting sentence ids (sorted).

    Uses only ``rng`` for randomness, so a seeded ``random.Random`` gives a reproducible story.
    """
    _check_tasks([task])
    if length is None:
        length = rng.randint(cfg.story_min, cfg.story_max)
    if length < MIN_LENGTH[task]:
        raise ValueError(f"length={length} is too short for task {task!r}: it needs at least {MIN_LENGTH[task]} sentences")
    target = _target(task, rng, cfg, length)
    for _ in range(_ATTEMPTS):
        draft = _DRAFTERS[task](rng, cfg, length, target)
        events = _with_distractors(rng, draft, cfg.n_distractors) if draft is not None else None
        if events is not None:
            answer, supporting = draft.answer(_replay(events))
            return Story(tuple(e.tokens() for e in events), draft.question, answer, task, supporting)
    raise RuntimeError(
        f"could not draw a {task} story of {length} sentences with answer class {target!r} in {_ATTEMPTS} "
        f"attempts (n_people={cfg.n_people}, n_places={cfg.n_places}, n_objects={cfg.n_objects}, "
        f"n_distractors={cfg.n_distractors}); use more entities or fewer distractors"
    )


# -------------------------------------------------------------------------------------------- splits


def check(cfg: DataConfig) -> None:
    """Raise ValueError when the procedural generator cannot honour ``cfg`` (beyond DataConfig's own checks)."""
    problems = []
    if cfg.source != "procedural":
        problems.append(f"source={cfg.source!r}: data.procedural.generate makes procedural data (use data.babi.load for bAbI files)")
    problems += [f"tasks: {t!r} is not one of {list(PROCEDURAL_TASKS)}" for t in cfg.tasks if t not in _DRAFTERS]
    limits = {"n_people": len(BOYS) + len(GIRLS), "n_places": len(PLACES), "n_objects": len(OBJECTS)}
    problems += [f"{name}={getattr(cfg, name)} must be <= {most} (the size of its pool)"
                 for name, most in limits.items() if getattr(cfg, name) > most]  # fmt: skip
    if cfg.n_places < 2:
        problems.append(f"n_places={cfg.n_places} must be >= 2 (people move between places)")
    for task in cfg.tasks:
        if task in MIN_LENGTH and cfg.story_min < MIN_LENGTH[task]:
            problems.append(f"story_min={cfg.story_min} is too short for task {task!r} (needs >= {MIN_LENGTH[task]})")
    facts = len(ANIMALS) + len(SPECIES)
    if "deduction" in cfg.tasks and max(cfg.story_max, cfg.ood_story_max) + cfg.n_distractors > facts:
        problems.append(f"deduction stories have at most {facts} distinct facts: ood_story_max + n_distractors="
                        f"{cfg.ood_story_max + cfg.n_distractors} is too many")  # fmt: skip
    if problems:
        raise ValueError("cannot generate procedural data:\n  - " + "\n  - ".join(problems))


def _narrative(story: Story) -> str:
    return " ".join(" ".join(s) for s in story.sentences)


def generate(cfg: DataConfig) -> TaskData:
    """Train / val / test / ood splits of every task in ``cfg.tasks`` (in that order), deterministic in cfg.

    Each (task, split) has its own random stream seeded from (cfg.seed, task, split), so adding a task or
    resizing one split leaves the others' stories unchanged (up to deduplication). Splits are drawn in the
    order train, val, test, ood; a story whose narrative already occurs in an earlier split is redrawn, so
    the splits never share a story (the count is ``info["redrawn_duplicates"]``). ``ood`` stories have
    ood_story_min..ood_story_max narrative sentences; it is left out when n_ood is 0.
    """
    check(cfg)
    vocab, answers = build_vocab(), answer_vocab_for(cfg.tasks)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "ood": cfg.n_ood}
    stories: dict[str, list[Story]] = {s: [] for s in SPLITS}
    redrawn = {}
    for task in cfg.tasks:
        seen: set[str] = set()
        redrawn[task] = 0
        for split in SPLITS:
            low, high = (cfg.ood_story_min, cfg.ood_story_max) if split == "ood" else (cfg.story_min, cfg.story_max)
            rng = random.Random(f"{cfg.seed}:{task}:{split}")
            drawn: list[Story] = []
            while len(drawn) < sizes[split]:
                story = make_story(task, rng, cfg, rng.randint(low, high))
                if _narrative(story) in seen:
                    redrawn[task] += 1
                    if redrawn[task] > 20 * sum(sizes.values()) + 1000:
                        raise RuntimeError(f"{task}: too few distinct stories for n_train + n_val + n_test; "
                                           "use longer stories or more entities")  # fmt: skip
                    continue
                drawn.append(story)
            seen.update(_narrative(s) for s in drawn)
            stories[split] += drawn
    splits = {s: stack([encode(st, vocab, answers) for st in stories[s]], cfg.tasks) for s in SPLITS if stories[s]}
    info = {"source": "procedural", "vocab_size": len(vocab), "n_answers": len(answers),
            "redrawn_duplicates": redrawn, **describe(splits, cfg.tasks)}  # fmt: skip
    return TaskData(vocab=vocab, answers=answers, tasks=tuple(cfg.tasks), splits=splits, info=info)


def _alternatives(options: Sequence[tuple[str, ...]]) -> str:
    return "|".join(re.escape(" ".join(o)) for o in options)


# The solver's own reading of the language; it shares the word lists with the generator, nothing else.
_SENTENCES = {
    "move": re.compile(rf"(?:(?:{_alternatives(CONNECTIVES)}) (?P<pronoun>he|she)|(?P<name>\w+)) "
                       rf"(?:{_alternatives(MOVE_VERBS)}) to the (?P<place>\w+) \."),  # fmt: skip
    "grab": re.compile(rf"(?P<name>\w+) (?:{_alternatives(GRAB_VERBS)}) the (?P<object>\w+) \."),
    "drop": re.compile(rf"(?P<name>\w+) (?:{_alternatives(DROP_VERBS)}) the (?P<object>\w+) \."),
    "member": re.compile(r"(?P<animal>\w+) is a (?P<species>\w+) \."),
    "fear": re.compile(rf"every (?P<species>\w+) (?:{_alternatives(FEAR_VERBS)}) (?P<feared>\w+) \."),
}
_QUESTIONS = {
    "object": re.compile(r"where is the (?P<object>\w+) \?"),
    "person": re.compile(r"where is (?P<name>\w+) \?"),
    "count": re.compile(r"how many objects is (?P<name>\w+) carrying \?"),
    "majority": re.compile(r"are there more boys or girls in the (?P<place>\w+) \?"),
    "afraid": re.compile(r"what is (?P<animal>\w+) afraid of \?"),
}
_LEXICON = {"name": set(PRONOUN), "place": set(PLACES), "object": set(OBJECTS), "animal": set(ANIMALS),
            "species": set(SPECIES), "feared": set(PLURAL.values())}  # fmt: skip


def _match(patterns: dict[str, re.Pattern], tokens: Sequence[str], what: str) -> tuple[str, dict[str, str]]:
    text = " ".join(tokens)
    for kind, pattern in patterns.items():
        m = pattern.fullmatch(text)
        if m and all(v in _LEXICON[k] for k, v in m.groupdict().items() if v is not None and k in _LEXICON):
            return kind, m.groupdict()
    raise ValueError(f"{what} {text!r} is not in the language of the procedural tasks")


def solve(story: Story) -> tuple[str, tuple[int, ...]]:
    """Answer a procedural story from its text alone: parse each sentence, replay the world, answer.

    Written independently of the generator (it never sees its events or state), so agreement with the
    stored answer and supporting ids checks the generator, the rendering and the distractor placement.
    Returns (answer, sorted supporting sentence ids); raises ValueError on text it cannot parse, a pronoun
    without a matching antecedent, an impossible action, or an unanswerable question.
    """
    at: dict[str, str] = {}  # person -> place
    why_at: dict[str, set[int]] = {}  # person -> sentences that put them there
    held: dict[str, tuple[str, int]] = {}  # object -> (holder, grab sentence)
    lying: dict[str, tuple[str | None, set[int]]] = {}  # dropped object -> (place, sentences)
    handled: defaultdict[str, list[int]] = defaultdict(list)  # person -> grab/drop sentences
    is_a: dict[str, tuple[str, int]] = {}
    fears: dict[str, tuple[str, int]] = {}
    antecedent = None  # the person named as subject of the previous sentence
    for i, sentence in enumerate(story.sentences):
        kind, m = _match(_SENTENCES, sentence, f"sentence {i}")
        who, thing = m.get("name"), m.get("object")
        if kind == "move":
            if m["pronoun"]:
                if antecedent is None or PRONOUN[antecedent] != m["pronoun"]:
                    raise ValueError(f"sentence {i}: {m['pronoun']!r} does not refer to the previous sentence's subject")
                who, why = antecedent, {i - 1, i}
            else:
                why = {i}
            if at.get(who) == m["place"]:
                raise ValueError(f"sentence {i}: {who} goes to the {m['place']}, where they already are")
            at[who], why_at[who] = m["place"], why
        elif kind == "grab":
            if thing in held:
                raise ValueError(f"sentence {i}: {who} grabs the {thing}, which {held[thing][0]} holds")
            if thing in lying and lying[thing][0] not in (None, at.get(who)):
                raise ValueError(f"sentence {i}: {who} grabs the {thing}, which lies in the {lying[thing][0]}")
            held[thing] = (who, i)
            lying.pop(thing, None)
            handled[who].append(i)
        elif kind == "drop":
            if held.get(thing, ("",))[0] != who:
                raise ValueError(f"sentence {i}: {who} drops the {thing} without holding it")
            del held[thing]
            lying[thing] = (at.get(who), why_at.get(who, set()) | {i})
            handled[who].append(i)
        elif kind == "member":
            if m["animal"] in is_a:
                raise ValueError(f"sentence {i}: {m['animal']} was already said to be a {is_a[m['animal']][0]}")
            is_a[m["animal"]] = (m["species"], i)
        else:
            if m["species"] in fears or PLURAL[m["species"]] == m["feared"]:
                raise ValueError(f"sentence {i}: a second or self-referring fear of the {m['species']}")
            fears[m["species"]] = (m["feared"], i)
        antecedent = who if kind in ("move", "grab", "drop") and not m.get("pronoun") else None

    kind, q = _match(_QUESTIONS, story.question, "question")
    try:
        if kind == "person":
            return at[q["name"]], tuple(sorted(why_at[q["name"]]))
        if kind == "object":
            if q["object"] in held:
                holder, grab = held[q["object"]]
                return at[holder], tuple(sorted(why_at[holder] | {grab}))
            place, why = lying[q["object"]]
            if place is None:
                raise KeyError(q["object"])
            return place, tuple(sorted(why))
        if kind == "count":
            return NUMBERS[sum(h == q["name"] for h, _ in held.values())], tuple(handled[q["name"]])
        if kind == "majority":
            here = [p for p, place in at.items() if place == q["place"]]
            if not here:
                raise KeyError(q["place"])
            boys = sum(PRONOUN[p] == "he" for p in here)
            answer = "boys" if 2 * boys > len(here) else "girls" if 2 * boys < len(here) else "equal"
            return answer, tuple(sorted(i for p in here for i in why_at[p]))
        species, i = is_a[q["animal"]]
        feared, j = fears[species]
        return feared, tuple(sorted((i, j)))
    except (KeyError, IndexError) as err:
        raise ValueError(f"the story does not answer {' '.join(story.question)!r} (nothing known about {err})") from None


# ---------------------------------------------------------------------------------------- printing


def format_story(story: Story) -> str:
    """Plain-text view: numbered sentences (ids as in ``story.supporting``), supporting ones marked "*"."""
    lines = [f"[{story.task}]"]
    if story.n_truncated:
        lines.append(f"      ({story.n_truncated} earlier sentences cut)")
    supporting = set(story.supporting)
    lines += [f"{'*' if i in supporting else ' '} {i:>3}  {' '.join(s)}" for i, s in enumerate(story.sentences)]
    lines.append(f"   Q:  {' '.join(story.question)}   A: {story.answer}")
    return "\n".join(lines)


def story_html(story: Story) -> str:
    """HTML snippet (inline CSS only, no external resources) with supporting sentences highlighted."""
    supporting = set(story.supporting)
    rows = [f'<div style="color:#666;margin-bottom:4px">{html.escape(story.task)}</div>']
    if story.n_truncated:
        rows.append(f'<div style="color:#999">({story.n_truncated} earlier sentences cut)</div>')
    for i, sentence in enumerate(story.sentences):
        style = "background:#ffe58a;font-weight:bold" if i in supporting else ""
        rows.append(f'<div style="{style}"><span style="color:#999;display:inline-block;width:3em">{i}</span>'
                    f"{html.escape(' '.join(sentence))}</div>")  # fmt: skip
    rows.append(f'<div style="margin-top:4px"><b>Q:</b> {html.escape(" ".join(story.question))} '
                f"&nbsp; <b>A:</b> {html.escape(story.answer)}</div>")  # fmt: skip
    return f'<div style="font-family:monospace;line-height:1.5">{"".join(rows)}</div>'
