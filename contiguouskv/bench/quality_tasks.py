"""Long-context retrieval cases for ``contiguouskv bench quality``, generated from a seed alone.

Seven tasks, after needle-in-a-haystack and RULER: a single needle, a passkey, one key among several
(multi_key), every value of one key (multi_value), a chain of variable assignments
(variable_tracking), a constant planted in Python standard-library source (code_constant), and the
most frequent of three planted words (aggregation). Prose haystacks are the Paul Graham essays,
code haystacks the standard library. Every planted value is checked to occur nowhere else in the
prefix, so a substring match of the expected value in the model's answer is an unambiguous score.
"""

from __future__ import annotations

import math
import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

from contiguouskv.demo import essay_dir

TASKS: tuple[str, ...] = ("needle", "passkey", "multi_key", "multi_value", "variable_tracking", "code_constant",
                          "aggregation")
CHARS_PER_TOKEN = 3.6  # about 3.6 characters per token of English prose for these tokenizers
LOW, HIGH = 0.02, 0.98  # the depth range of scattered plants (never the very first or last sentence)
TRIES = 1000  # draws of a fresh random value before giving up
CODE_WINDOW = 400  # how far back a code plant looks for a top-level line

WORDS = ("amber", "falcon", "cobalt", "maple", "orbit", "quartz", "saffron", "tundra", "velvet", "zephyr",
         "garnet", "heron", "juniper", "lagoon", "nimbus", "onyx")
ADJECTIVES = ("quiet", "bright", "hollow", "silent", "rapid", "golden", "frozen", "gentle", "hidden", "crimson",
              "distant", "ancient")
NOUNS = ("river", "meadow", "lantern", "harbor", "canyon", "glacier", "orchard", "beacon", "thicket", "summit",
         "prairie", "island")
CODE_SUBJECTS = ("RETRY", "CACHE", "SOCKET", "FLUSH", "SHARD", "LEASE", "PREFETCH", "EVICTION", "REPLICA", "CHUNK")
CODE_UNITS = ("BUDGET_MS", "TIMEOUT_S", "LIMIT", "WINDOW", "THRESHOLD", "INTERVAL_MS", "QUOTA", "CAPACITY")
RARE_WORDS = ("quokka", "kumquat", "axolotl", "zeppelin", "marimba", "pangolin", "kazoo", "okapi", "tamarind",
              "nautilus", "dirigible", "wombat", "ocelot", "gondola", "lychee", "mandolin")
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
AGGREGATION_COUNTS = (5, 3, 2)


@dataclass(frozen=True)
class Case:
    """One prefix and question; ``answers`` (default ``(answer,)``) are the values a right answer contains."""

    task: str
    prefix: str
    question: str
    answer: str
    depth: float
    prefix_tokens_target: int
    answers: tuple[str, ...] = ()

    @property
    def expected(self) -> tuple[str, ...]:
        """Every value a right answer must contain."""
        return self.answers or (self.answer,)

    def correct(self, text: str) -> bool:
        """True when every expected value appears in ``text``, case-insensitive."""
        low = text.lower()
        return all(value.lower() in low for value in self.expected)


def make_cases(lengths: list[int], cases_per_length: int, seed: int, tasks: Sequence[str] = TASKS,
               per_prefix: int = 1) -> list[Case]:
    """``cases_per_length`` cases per length (approximate prefix tokens), tasks round-robin, depths spread.

    Case ``i`` of a length gets depth slot ``(i + offset) % cases_per_length`` (a rotation by a
    per-length offset drawn from the seed), so each task's cases sit ``len(tasks)`` slots apart and
    the task at a given depth changes from length to length. Same arguments, byte-identical cases.

    ``per_prefix`` > 1 asks up to that many questions of one prefix: cases ``j, j + D, j + 2D, ...``
    (``D`` the first stride from ``ceil(cases_per_length / per_prefix)`` up that is coprime to the
    number of tasks, so the group's tasks differ and its depths lie far apart) share a document that
    holds every one of their plants, as long as their tasks use the same kind of haystack (prose or
    code) and none repeats a task whose question does not name its key (see :func:`documents`); a
    case that would break that opens another document. Each question's plants are then
    distractors for the others. Registering a prefix (its full prefill)
    is most of a quality run's time; sharing it is what makes a run at 16K tokens affordable.
    ``per_prefix=1`` gives exactly the one-prefix-per-case suite.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown} (known: {', '.join(TASKS)})" if unknown else "no tasks")
    if cases_per_length < 0 or any(length <= 0 for length in lengths):
        raise ValueError("lengths must be positive and cases_per_length not negative")
    if per_prefix < 1:
        raise ValueError(f"per_prefix must be at least 1, got {per_prefix}")
    out: list[Case] = []
    for length in lengths:
        chars = int(length * CHARS_PER_TOKEN)
        offset = random.Random(f"{seed}-{length}").randrange(max(cases_per_length, 1))
        task_of = [tasks[i % len(tasks)] for i in range(cases_per_length)]
        depth_of = [((i + offset) % cases_per_length + 0.5) / cases_per_length for i in range(cases_per_length)]
        built: dict[int, Case] = {}
        for doc in documents(task_of, per_prefix):
            rng = random.Random(f"{seed}-{length}-{doc[0]}")
            for i, case in zip(doc, _compose([(task_of[i], depth_of[i]) for i in doc], chars, rng, length),
                               strict=True):
                built[i] = case
        out += [built[i] for i in range(cases_per_length)]
    return out


def documents(task_of: Sequence[str], per_prefix: int) -> list[list[int]]:
    """Case indices grouped into shared prefixes (see :func:`make_cases`), each group in ascending
    order and the groups ordered by their first case.

    Two questions of one task share a prefix only if the task names what it asks for
    (:data:`KEYED_TASKS`): two passphrases in one prefix would make "the" passphrase ambiguous,
    two magic-number keys do not. Groups left small (code questions, which prose cannot host) are
    then merged with earlier ones whose tasks are all keyed, up to ``per_prefix``.
    """
    n = len(task_of)
    if per_prefix == 1:
        return [[i] for i in range(n)]
    stride = -(-n // per_prefix) if n else 1
    kinds = len(set(task_of))  # tasks come round-robin: a stride coprime to their number puts
    while kinds > 1 and math.gcd(stride, kinds) != 1 and stride < n:  # different tasks in a group
        stride += 1

    def keyed(doc: list[int]) -> bool:
        return all(task_of[i] in KEYED_TASKS for i in doc)

    docs: list[list[int]] = []
    for j in range(stride):
        opened: list[list[int]] = []
        for i in range(j, n, stride):
            home = next((d for d in opened if _kind(task_of[d[0]]) == _kind(task_of[i])
                         and all(task_of[k] != task_of[i] for k in d)), None)
            if home is None:
                opened.append([i])
            else:
                home.append(i)
        docs += opened
    merged: list[list[int]] = []
    for doc in sorted(docs, key=lambda d: d[0]):
        home = next((d for d in merged if keyed(doc) and keyed(d) and len(d) + len(doc) <= per_prefix
                     and _kind(task_of[d[0]]) == _kind(task_of[doc[0]])), None)
        if home is None:
            merged.append(list(doc))
        else:
            home[:] = sorted(home + doc)
    return merged


# --- haystacks and planting ----------------------------------------------------------------------


def _chat(docs: str) -> str:
    """The prefix: a system prompt and the start of the user turn holding ``docs``."""
    return ("<|im_start|>system\nYou are a helpful assistant. Answer with the exact value only.<|im_end|>\n"
            f"<|im_start|>user\n{docs}")


def _haystack(chars: int, rng: random.Random) -> str:
    """``chars`` characters of the essays in a random order (repeated if the essays are too short)."""
    files = sorted(essay_dir().glob("*.txt"))
    rng.shuffle(files)
    parts: list[str] = []
    size = 0
    for f in cycle(files):
        if size >= chars:
            break
        parts.append(f.read_text(encoding="utf-8") + "\n\n")
        size += len(parts[-1])
    return "".join(parts)[:chars]


def _code(chars: int, rng: random.Random) -> str:
    """``chars`` characters of standard-library modules, up to 6000 characters from each."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts: list[str] = []
    size = 0
    while size < chars:
        f = rng.choice(files)
        parts.append(f"# file: {f.name}\n" + f.read_text(encoding="utf-8", errors="replace")[:6000] + "\n")
        size += len(parts[-1])
    return "".join(parts)[:chars]


def _cut(text: str, depth: float, code: bool) -> int:
    """Where to plant at ``depth``: after the last sentence or line (prose) or top-level line (code) before it."""
    pos = int(len(text) * depth)
    if not code:
        dot = text.rfind(". ", 0, pos)
        return max(dot + 2 if dot >= 0 else 0, text.rfind("\n", 0, pos) + 1)
    line = top = text.rfind("\n", 0, pos)
    while top >= 0 and pos - top < CODE_WINDOW and text[top + 1:top + 2] in (" ", "\t", "\n", "#"):
        top = text.rfind("\n", 0, top)
    return (top if top >= 0 and pos - top < CODE_WINDOW else line) + 1


def _plant(text: str, plants: Sequence[tuple[float, str]], code: bool = False) -> str:
    """Insert each (depth, sentence) at its depth; plants at the same spot keep their given order."""
    cuts = sorted((_cut(text, depth, code), k) for k, (depth, _) in enumerate(plants))
    parts: list[str] = []
    last = 0
    for cut, k in cuts:
        parts += [text[last:cut], plants[k][1] + ("\n" if code else " ")]
        last = cut
    return "".join(parts) + text[last:]


def _fill(chars: int, plants: Sequence[tuple[float, str]], hay: str, code: bool = False) -> str:
    """The haystack cut so that it and its plants take ``chars`` characters, with the plants in it."""
    extra = sum(len(s) + 1 for _, s in plants)
    return _plant(hay[:max(chars - extra, 0)], plants, code)


def _apart(value: str, seen: str, taken: list[str]) -> bool:
    """``value`` absent from ``seen`` (lower-case text), and neither inside nor around any of ``taken``."""
    low = value.lower()
    return low not in seen and all(low not in t.lower() and t.lower() not in low for t in taken)


def _fresh(draw: Callable[[], str], seen: str, taken: list[str]) -> str:
    """A drawn value :func:`_apart` from ``seen`` and ``taken``, which it joins."""
    for _ in range(TRIES):
        value = draw()
        if _apart(value, seen, taken):
            taken.append(value)
            return value
    raise AssertionError(f"no fresh value in {TRIES} draws")


def _expect(prefix: str, counts: dict[str, int]) -> None:
    """Fail unless each value occurs exactly ``counts[value]`` times in the prefix (case-insensitive)."""
    low = prefix.lower()
    for value, count in counts.items():
        if low.count(value.lower()) != count:
            raise AssertionError(f"{value!r} occurs {low.count(value.lower())} times in the prefix, not {count}")


def _digits(rng: random.Random, n: int) -> Callable[[], str]:
    """A drawer of ``n``-digit numbers (no leading zero)."""
    return lambda: str(rng.randrange(10 ** (n - 1), 10 ** n))


def _spread(depth: float, n: int) -> list[float]:
    """``n`` depths ``1/n`` apart starting at ``depth`` (wrapping round), kept in [LOW, HIGH]."""
    return [min(max((depth + k / n) % 1.0, LOW), HIGH) for k in range(n)]


def _seen(hay: str) -> str:
    """Everything a planted value must be absent from, lower-case: the chat wrapper and the haystack."""
    return (_chat("") + hay).lower()


# --- tasks ---------------------------------------------------------------------------------------
#
# Each task is a planter: given what its values must be absent from (``seen``, lower-case), the values
# already drawn for the same document (``taken``, which it joins), the case depth and the document's
# random generator, it returns its plants, the exact count of each value in the finished prefix, and
# its question and expected values.


@dataclass(frozen=True)
class _Plan:
    plants: list[tuple[float, str]]
    counts: dict[str, int]
    question: str
    answer: str
    answers: tuple[str, ...] = ()


Planter = Callable[[str, list[str], float, random.Random], _Plan]


def _needle(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """A passphrase sentence at the depth."""
    key = _fresh(lambda: f"{'-'.join(rng.sample(WORDS, 2))}-{rng.randrange(10, 100)}", seen, taken)
    return _Plan([(depth, f"The secret passphrase is {key}.")], {key: 1}, "What is the secret passphrase?", key)


def _passkey(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """A five-digit pass key, said twice in one passage at the depth."""
    code = _fresh(_digits(rng, 5), seen, taken)
    return _Plan([(depth, f"The pass key is {code}. Remember it. {code} is the pass key.")], {code: 2},
                 "What is the pass key?", code)


def _key_names(rng: random.Random, count: int, seen: str, taken: list[str]) -> list[str]:
    """``count`` distinct adjective-noun keys, apart from the document's other values."""
    if count == 1:
        names = [f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"]
    else:
        names = [f"{a}-{n}" for a, n in zip(rng.sample(ADJECTIVES, count), rng.sample(NOUNS, count), strict=True)]
    for k, name in enumerate(names):
        if _apart(name, seen, taken):
            taken.append(name)
        else:  # a clash with another question of the document: draw again
            names[k] = _fresh(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", seen, taken)
    return names


def _multi_key(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """Four keys with a number each; the asked one at the depth."""
    keys = _key_names(rng, 4, seen, taken)
    values = [_fresh(_digits(rng, 7), seen, taken) for _ in keys]
    plants = [(d, f"The special magic number for {k} is {v}.")
              for d, k, v in zip(_spread(depth, 4), keys, values, strict=True)]
    plants[0] = (depth, plants[0][1])  # the target exactly at the case depth, distractors a quarter apart
    return _Plan(plants, {**{k: 1 for k in keys}, **{v: 1 for v in values}},
                 f"What is the special magic number for {keys[0]}?", values[0])


def _multi_value(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """One key with three numbers a third of the prefix apart, one at the depth."""
    key = _key_names(rng, 1, seen, taken)[0]
    values = tuple(_fresh(_digits(rng, 6), seen, taken) for _ in range(3))
    depths = sorted([depth, *_spread(depth, 3)[1:]])  # in order of appearance, as the answer lists them
    return _Plan([(d, f"One of the special magic numbers for {key} is {v}.") for d, v in zip(depths, values, strict=True)],
                 {key: 3, **{v: 1 for v in values}},
                 f"What are all the special magic numbers for {key}? List them in the order they appear.",
                 ", ".join(values), values)


def _variable_tracking(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """A chain of four assignments from the depth on, and a decoy chain with another value."""
    names = [_fresh(lambda: "".join(rng.choices(UPPER, k=5)), seen, taken) for _ in range(8)]
    value, other = (_fresh(_digits(rng, 5), seen, taken) for _ in range(2))
    start = min(max(depth, LOW), HIGH)
    chain = [start, *sorted(rng.uniform(start, HIGH) for _ in range(3))]
    decoy = sorted(rng.uniform(LOW, HIGH) for _ in range(4))
    plants: list[tuple[float, str]] = []
    for chain_names, first, depths in ((names[:4], value, chain), (names[4:], other, decoy)):
        sources = [first] + [f"VAR {n}" for n in chain_names[:-1]]
        plants += [(d, f"VAR {n} = {s}.") for d, n, s in zip(depths, chain_names, sources, strict=True)]
    return _Plan(plants, {value: 1, other: 1, **{n: 2 for n in names[:3] + names[4:7]}, names[3]: 1, names[7]: 1},
                 f"Which variables are assigned the value {value}? Answer with the variable names.",
                 ", ".join(names[:4]), tuple(names[:4]))


def _code_constant(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """A constant in standard-library source at the depth, and two look-alikes a third apart."""
    for _ in range(TRIES):  # a name prefix another question of the document already uses: draw again
        subject, other_subject = rng.sample(CODE_SUBJECTS, 2)
        unit, other_unit = rng.sample(CODE_UNITS, 2)
        names = [f"CKV_{s}_{u}" for s, u in ((subject, unit), (subject, other_unit), (other_subject, unit))]
        if all(_apart(n, seen, taken) for n in names):
            break
    else:
        raise AssertionError(f"no fresh constant names in {TRIES} draws")
    taken += names
    values = [_fresh(_digits(rng, 4), seen, taken) for _ in names]
    plants = [(d, f"{n} = {v}") for d, n, v in zip(_spread(depth, 3), names, values, strict=True)]
    return _Plan(plants, {**{n: 1 for n in names}, **{v: 1 for v in values}},
                 f"What is the value of {names[0]} in the source code?", values[0])


def _aggregation(seen: str, taken: list[str], depth: float, rng: random.Random) -> _Plan:
    """Three words said 5, 3 and 2 times at random depths, the most frequent once at the depth."""
    words = [_fresh(lambda: rng.choice(RARE_WORDS), seen, taken) for _ in AGGREGATION_COUNTS]
    rng.shuffle(words)  # words[0] gets the top count
    plants = [(depth, f"Today's word is {words[0]}.")]  # one occurrence of the answer at the case depth
    plants += [(rng.uniform(LOW, HIGH), f"Today's word is {w}.")
               for w, count in zip(words, AGGREGATION_COUNTS, strict=True)
               for _ in range(count - 1 if w == words[0] else count)]
    return _Plan(plants, dict(zip(words, AGGREGATION_COUNTS, strict=True)),
                 "Which word appears most often as today's word?", words[0])


PLANTERS: dict[str, Planter] = {
    "needle": _needle, "passkey": _passkey, "multi_key": _multi_key, "multi_value": _multi_value,
    "variable_tracking": _variable_tracking, "code_constant": _code_constant, "aggregation": _aggregation,
}
CODE_TASKS = frozenset({"code_constant"})  # planted in source code; every other task in prose
# Tasks whose question names the key it asks about: several of them can share a prefix.
KEYED_TASKS = frozenset({"multi_key", "multi_value", "variable_tracking", "code_constant"})


def _kind(task: str) -> str:
    return "code" if task in CODE_TASKS else "prose"


def _compose(questions: Sequence[tuple[str, float]], chars: int, rng: random.Random, length: int) -> list[Case]:
    """One prefix of ``chars`` characters holding the plants of every (task, depth), and its cases.

    Every planted value is checked to occur exactly as often as its own task plants it, so no
    question's plants can answer (or break) another's."""
    code = _kind(questions[0][0]) == "code"
    hay = _code(chars, rng) if code else _haystack(chars, rng)
    seen = _seen(hay)
    taken: list[str] = []
    plans = [PLANTERS[task](seen, taken, depth, rng) for task, depth in questions]
    plants = [p for plan in plans for p in plan.plants]
    if code:
        header = "Source code:\n"
        prefix = _chat(header + _fill(chars - len(header), plants, hay, code=True))
    else:
        prefix = _chat(_fill(chars, plants, hay))
    for plan in plans:
        _expect(prefix, plan.counts)
    return [Case(task, prefix, plan.question, plan.answer, depth, length, plan.answers)
            for (task, depth), plan in zip(questions, plans, strict=True)]
