"""The quality benchmark's case generator: deterministic, spread over depths, every answer planted once.

No servers and no model: the cases are read back with regular expressions, and each planted value
is counted in the prefix.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import FrozenInstanceError, fields
from itertools import pairwise

import pytest

from contiguouskv.bench import quality_tasks as qt
from contiguouskv.bench.quality_tasks import TASKS, Case, make_cases

LENGTHS = [600, 3000]
PER_LENGTH = 14  # two cases of each task per length
WRAPPER = len(qt._chat(""))
SLACK = 500  # characters between a depth and its plant: back to a sentence or top-level line start


@pytest.fixture(scope="module", params=[1, 7], ids=["own-prefix", "shared-prefix"])
def cases(request: pytest.FixtureRequest) -> list[Case]:
    """Every test below holds for one prefix per case and for up to seven questions per prefix."""
    return make_cases(LENGTHS, PER_LENGTH, seed=7, per_prefix=request.param)


def _of(cases: list[Case], task: str) -> list[Case]:
    found = [c for c in cases if c.task == task]
    assert found, task
    return found


def _count(prefix: str, value: str) -> int:
    return prefix.lower().count(value.lower())


def _at(case: Case, needle: str) -> float:
    """Where ``needle`` starts in the prefix, as a fraction of the planted document."""
    return (case.prefix.index(needle) - WRAPPER) / (len(case.prefix) - WRAPPER)


def _near(case: Case, spot: float, depth: float) -> bool:
    """``spot`` within a sentence or a few lines (500 characters) of ``depth``."""
    return abs(spot - depth) * (len(case.prefix) - WRAPPER) <= SLACK


def test_tasks_and_case_fields() -> None:
    assert TASKS == ("needle", "passkey", "multi_key", "multi_value", "variable_tracking", "code_constant",
                     "aggregation")
    assert [f.name for f in fields(Case)] == ["task", "prefix", "question", "answer", "depth",
                                              "prefix_tokens_target", "answers"]
    case = Case("needle", "p", "q", "a", 0.5, 100)
    assert case.answers == () and case.expected == ("a",)
    with pytest.raises(FrozenInstanceError):
        case.answer = "b"  # type: ignore[misc]


def test_same_seed_same_cases_other_seed_other_cases(cases: list[Case]) -> None:
    shared = len({c.prefix for c in cases}) < len(cases)
    assert make_cases(LENGTHS, PER_LENGTH, seed=7, per_prefix=7 if shared else 1) == cases
    other = make_cases(LENGTHS, PER_LENGTH, seed=8, per_prefix=7 if shared else 1)
    assert [c.task for c in other] == [c.task for c in cases]
    for a, b in zip(cases, other, strict=True):
        assert a.prefix != b.prefix and a.answer != b.answer


def test_count_tasks_round_robin_and_targets(cases: list[Case]) -> None:
    assert len(cases) == len(LENGTHS) * PER_LENGTH
    assert [c.task for c in cases] == [TASKS[i % len(TASKS)] for i in range(PER_LENGTH)] * len(LENGTHS)
    assert [c.prefix_tokens_target for c in cases] == [n for n in LENGTHS for _ in range(PER_LENGTH)]
    assert len(make_cases([500], 9, 0)) == 9 and {c.task for c in make_cases([500], 9, 0)} == set(TASKS)
    few = make_cases([500, 700], 3, 0, tasks=("passkey", "aggregation"))
    assert [c.task for c in few] == ["passkey", "aggregation", "passkey"] * 2


def test_shared_prefixes_group_distinct_tasks_of_one_haystack_kind(cases: list[Case]) -> None:
    by_prefix: dict[str, list[Case]] = {}
    for c in cases:
        by_prefix.setdefault(c.prefix, []).append(c)
    shared = len(by_prefix) < len(cases)
    for group in by_prefix.values():
        assert len(group) <= (7 if shared else 1)
        unkeyed = [c.task for c in group if c.task not in qt.KEYED_TASKS]
        assert len(set(unkeyed)) == len(unkeyed)  # never two passphrases (pass keys, word counts) in one prefix
        assert len({c.task == "code_constant" for c in group}) == 1  # prose and code never mixed
        assert len({c.prefix_tokens_target for c in group}) == 1
    if shared:  # 14 cases a length: six prose questions per prefix, the two code questions on a third
        assert sorted(len(g) for g in by_prefix.values()) == [2, 2, 6, 6, 6, 6]
        for group in by_prefix.values():  # the questions of a prefix are asked at depths far apart
            depths = sorted(c.depth for c in group)
            assert all(b - a > 0.1 for a, b in pairwise(depths))


def test_documents_partition_the_cases() -> None:
    tasks = [TASKS[i % len(TASKS)] for i in range(30)]
    assert qt.documents(tasks, 1) == [[i] for i in range(30)]
    for per_prefix in (2, 3, 5, 7, 40):
        docs = qt.documents(tasks, per_prefix)
        assert sorted(i for d in docs for i in d) == list(range(30))
        for d in docs:
            assert d == sorted(d) and len(d) <= per_prefix
            unkeyed = [tasks[i] for i in d if tasks[i] not in qt.KEYED_TASKS]
            assert len(set(unkeyed)) == len(unkeyed)
            assert len({tasks[i] == "code_constant" for i in d}) == 1
    assert len(qt.documents(tasks, 5)) == 7  # 30 questions on 7 prefixes, the 4 code ones on one
    assert qt.documents(["needle"] * 4, 4) == [[0], [1], [2], [3]]  # "the passphrase" must be unique
    four = [("needle", "passkey", "aggregation", "code_constant")[i % 4] for i in range(16)]
    docs = qt.documents(four, 5)  # stride 5, not 4: a stride of 4 would give every group one task
    assert len(docs) == 6 and min(map(len, docs)) == 2 and [3, 7, 11, 15] in docs
    assert qt.documents(["code_constant"] * 5, 4) == [[0, 1, 2, 3], [4]]  # named constants can share


def test_one_question_per_prefix_is_the_default() -> None:
    assert make_cases([700], 7, 2, per_prefix=1) == make_cases([700], 7, 2)
    with pytest.raises(ValueError, match="per_prefix"):
        make_cases([700], 7, 2, per_prefix=0)


def test_unknown_task_or_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        make_cases([500], 2, 0, tasks=("needle", "haystack"))
    with pytest.raises(ValueError):
        make_cases([500], 2, 0, tasks=())
    with pytest.raises(ValueError):
        make_cases([0], 2, 0)


def test_depths_spread_evenly_and_per_task(cases: list[Case]) -> None:
    for length in LENGTHS:
        mine = [c for c in cases if c.prefix_tokens_target == length]
        depths = sorted(c.depth for c in mine)
        assert depths == pytest.approx([(k + 0.5) / PER_LENGTH for k in range(PER_LENGTH)])
        assert depths[0] < 0.2 and depths[-1] > 0.8
        for task in TASKS:
            a, b = sorted(c.depth for c in mine if c.task == task)
            assert b - a == pytest.approx(0.5)  # each task's two cases half the prefix apart
    assert any(a.depth != b.depth for a, b in zip(cases[:PER_LENGTH], cases[PER_LENGTH:], strict=True))


@pytest.mark.parametrize("length", [300, 2000, 9000])
def test_prefix_length_close_to_target(length: int) -> None:
    for case in make_cases([length], len(TASKS), 3):
        chars = int(length * 3.6)
        assert case.prefix.startswith("<|im_start|>system\n")
        assert abs(len(case.prefix) - WRAPPER - chars) <= 0.2 * chars, case.task


def test_needle(cases: list[Case]) -> None:
    for case in _of(cases, "needle"):
        assert re.fullmatch(r"[a-z]+-[a-z]+-\d\d", case.answer) and len(case.answer) <= 20
        sentence = f"The secret passphrase is {case.answer}."
        assert case.prefix.count(sentence) == 1 and _count(case.prefix, case.answer) == 1
        assert _near(case, _at(case, sentence), case.depth)
        assert case.question == "What is the secret passphrase?"


def test_passkey(cases: list[Case]) -> None:
    for case in _of(cases, "passkey"):
        assert re.fullmatch(r"\d{5}", case.answer)
        sentence = f"The pass key is {case.answer}. Remember it. {case.answer} is the pass key."
        assert case.prefix.count(sentence) == 1
        assert _count(case.prefix, case.answer) == 2  # both inside the planted sentence, nowhere else
        assert _near(case, _at(case, sentence), case.depth)
        assert case.question == "What is the pass key?"


def _asked(cases: list[Case], case: Case) -> int:
    """How many questions of ``case``'s task its prefix holds."""
    return sum(c.prefix == case.prefix and c.task == case.task for c in cases)


def test_multi_key(cases: list[Case]) -> None:
    for case in _of(cases, "multi_key"):
        found = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is (\d{7})\.", case.prefix)
        assert _asked(cases, case) == 1  # (the groups of this fixture hold one of each prose task)
        assert len(found) == 4 and len({k for k, _ in found}) == 4 and len({v for _, v in found}) == 4
        key = re.fullmatch(r"What is the special magic number for ([a-z]+-[a-z]+)\?", case.question)
        assert key and dict(found)[key.group(1)] == case.answer
        assert all(v != case.answer for k, v in found if k != key.group(1))
        for k, v in found:
            assert _count(case.prefix, k) == 1 and _count(case.prefix, v) == 1
        assert _near(case, _at(case, f"for {key.group(1)} is"), case.depth)
        spots = sorted(_at(case, f"for {k} is") for k, _ in found)
        assert min(b - a for a, b in pairwise(spots)) > (0.1 if case.prefix_tokens_target >= 3000 else 0)


def test_multi_value(cases: list[Case]) -> None:
    for case in _of(cases, "multi_value"):
        key = re.fullmatch(r"What are all the special magic numbers for ([a-z]+-[a-z]+)\? "
                           r"List them in the order they appear\.", case.question)
        assert key
        found = re.findall(rf"One of the special magic numbers for {key.group(1)} is (\d{{6}})\.", case.prefix)
        assert tuple(found) == case.answers and len(set(found)) == 3
        assert case.answer == ", ".join(case.answers)
        assert all(_count(case.prefix, v) == 1 for v in case.answers)
        spots = [_at(case, v) for v in case.answers]
        assert spots == sorted(spots)
        assert min(b - a for a, b in pairwise(spots)) > (0.15 if case.prefix_tokens_target >= 3000 else 0)
        assert any(_near(case, s, case.depth) for s in spots)


def test_variable_tracking(cases: list[Case]) -> None:
    for case in _of(cases, "variable_tracking"):
        value = re.fullmatch(r"Which variables are assigned the value (\d{5})\? Answer with the variable names\.",
                             case.question)
        assert value
        assigned = re.findall(r"VAR ([A-Z]{5}) = (\d{5}|VAR [A-Z]{5})\.", case.prefix)
        assert len(assigned) == 8 and len({n for n, _ in assigned}) == 8
        source = dict(assigned)
        chain = [n for n, _ in assigned if _resolve(source, n) == value.group(1)]
        assert len(case.answers) == 4 and set(chain) == set(case.answers)
        assert case.answer == ", ".join(case.answers)
        others = {_resolve(source, n) for n, _ in assigned} - {value.group(1)}
        assert len(others) == 1  # one distractor chain with another value
        assert _count(case.prefix, value.group(1)) == 1
        for name in source:
            assert _count(case.prefix, name) == (1 if name not in {s[4:] for s in source.values()} else 2)
        spots = [_at(case, f"VAR {n} = ") for n in case.answers]
        assert spots == sorted(spots)  # the chain in order, from about the case depth on
        assert _near(case, spots[0], min(max(case.depth, 0.02), 0.98))


def _resolve(source: dict[str, str], name: str) -> str:
    """The value a variable ends up with, following ``VAR X = VAR Y`` assignments."""
    value = source[name]
    return _resolve(source, value[4:]) if value.startswith("VAR ") else value


def test_code_constant(cases: list[Case]) -> None:
    for case in _of(cases, "code_constant"):
        assert case.prefix.startswith(qt._chat("Source code:\n")) and "\n# file: " in case.prefix
        planted = re.findall(r"^(CKV_[A-Z_]+) = (\d{4})$", case.prefix, flags=re.MULTILINE)
        many = 3 * _asked(cases, case)  # three look-alikes per question on this prefix
        assert len(planted) == many and len({n for n, _ in planted}) == many and len({v for _, v in planted}) == many
        name = re.fullmatch(r"What is the value of (CKV_[A-Z_]+) in the source code\?", case.question)
        assert name and dict(planted)[name.group(1)] == case.answer
        for n, v in planted:
            assert _count(case.prefix, n) == 1 and _count(case.prefix, v) == 1
        assert _near(case, _at(case, f"\n{name.group(1)} = "), case.depth)


def test_aggregation(cases: list[Case]) -> None:
    for case in _of(cases, "aggregation"):
        counts = Counter(re.findall(r"Today's word is ([a-z]+)\.", case.prefix))
        assert sorted(counts.values()) == [2, 3, 5] and counts[case.answer] == 5
        for word, n in counts.items():
            assert word in qt.RARE_WORDS and _count(case.prefix, word) == n
        spots = [(m.start() - WRAPPER) / (len(case.prefix) - WRAPPER)
                 for m in re.finditer(rf"Today's word is {case.answer}\.", case.prefix)]
        assert any(_near(case, s, case.depth) for s in spots)
        assert case.question == "Which word appears most often as today's word?"


def test_answers_short_and_absent_from_questions_only_where_asked(cases: list[Case]) -> None:
    for case in cases:
        assert all(0 < len(v) <= 20 for v in case.expected), case
        assert all(v.lower() not in case.question.lower() for v in case.expected), case


def test_correct() -> None:
    one = Case("passkey", "", "q", "12345", 0.5, 10)
    assert one.correct("12345") and one.correct("The pass key is 12345.")
    assert not one.correct("12346") and not one.correct("")
    word = Case("needle", "", "q", "amber-falcon-42", 0.5, 10)
    assert word.correct("AMBER-FALCON-42") and not word.correct("amber-falcon-24")
    many = Case("multi_value", "", "q", "111111, 222222, 333333", 0.5, 10, ("111111", "222222", "333333"))
    assert many.correct("111111, 222222, 333333") and many.correct("333333 and 111111 then 222222")
    assert not many.correct("111111, 222222") and not many.correct("111111, 222222, 333334")
    for case in make_cases([400], len(TASKS), 1):
        assert case.correct(case.answer) and case.correct(f"Answer: {case.answer.upper()}.")
        assert not case.correct("I do not know.")
        assert not case.correct(case.expected[0][:-1])


def test_collision_draws_another_value(monkeypatch: pytest.MonkeyPatch) -> None:
    [passkey, aggregation] = make_cases([600], 2, 5, tasks=("passkey", "aggregation"))
    original = qt._haystack

    def salted(chars: int, rng: random.Random) -> str:
        hay = original(chars, rng)
        return f"Room {passkey.answer}, the {aggregation.answer} room. " + hay

    monkeypatch.setattr(qt, "_haystack", salted)
    [passkey2, aggregation2] = make_cases([600], 2, 5, tasks=("passkey", "aggregation"))
    assert passkey2.answer != passkey.answer and _count(passkey2.prefix, passkey2.answer) == 2
    assert aggregation2.answer != aggregation.answer and _count(aggregation2.prefix, aggregation2.answer) == 5


def test_no_fresh_value_fails_loudly() -> None:
    with pytest.raises(AssertionError):
        qt._fresh(lambda: "12345", "the value 12345 is taken", [])
    taken = ["777"]
    assert qt._fresh(iter(["1777", "777", "42"]).__next__, "", taken) == "42" and taken == ["777", "42"]
