"""Cost of routing and morphing one instance: decide() and apply(), in µs per instance.

Run: ``.venv/bin/python bench/bench_rules.py [--rounds N]``

Targets (issue 3): 100 rules evaluated in under 1 ms per instance; the full
Basic Profile applied to a CT header in under 5 ms. Each figure is the median
of several rounds, each round timing a batch of instances, so a noisy
neighbour on a shared machine moves one round, not the result.

The rule sets look like a real site's: equality on Modality and AE titles,
globs on descriptions, date ranges, SourceIP networks, one nested any/not;
the instance matches only a few of them, so most rules are evaluated in full.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pydicom
from pydicom.data import get_testdata_file

from rules.context import MorphContext
from rules.facts import AssociationFacts
from rules.matcher import decide
from rules.models import Rule
from rules.morph import apply

FACTS = AssociationFacts("CT_SCANNER_1", "DICOM_ROUTER", "10.20.30.40")


def make_rules(n: int) -> list[Rule]:
    """``n`` rules in the shapes PACS administrators write; a few match the CT."""
    shapes = [
        lambda i: {"Modality": ["MR", "US"][i % 2], "CallingAETitle": f"SCANNER_{i}"},
        lambda i: {"StudyDescription": {"glob": f"*PROTOCOL {i}*"}},
        lambda i: {"StudyDate": {"between": ["2001-01-01", f"20{10 + i % 10}-12-31"]}, "Modality": "XA"},
        lambda i: {"SourceIP": f"192.168.{i % 250}.0/24"},
        lambda i: {"any": [{"PatientID": {"regex": f"^RES{i}-"}}, {"not": {"SeriesNumber": {"lt": 10_000 + i}}}]},
        lambda i: {"InstitutionName": {"contains": f"site {i}"}, "BodyPartExamined": {"exists": True}},
    ]
    rules = [
        Rule.model_validate({"name": f"rule {i}", "when": shapes[i % len(shapes)](i), "forward": [f"dest{i % 7}"]})
        for i in range(n - 2)
    ]
    rules.append(Rule.model_validate({"name": "ct", "when": {"Modality": "CT"}, "forward": ["pacs"]}))
    rules.append(Rule.model_validate({
        "name": "research", "when": {"Modality": "CT", "SourceIP": "10.0.0.0/8"},
        "morph": [{"anonymize": {"options": ["retain-longitudinal-modified-dates"]}}], "forward": ["research"],
    }))  # fmt: skip
    return rules


def per_instance_us(work: Callable[[], object], batch: int, rounds: int) -> tuple[float, float]:
    """Median and worst round, in µs per call."""
    work()  # warm caches (compiled patterns, the profile table)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            work()
        times.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    path = get_testdata_file("CT_small.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    ctx = MorphContext(b"benchmark-secret-0123456789abcdef")
    basic = Rule.model_validate({"name": "b", "forward": [], "morph": ["anonymize"]}).morph
    uid_only = Rule.model_validate({"name": "u", "forward": [], "morph": ["uid_remap"]}).morph

    rows: list[tuple[str, float, float, str]] = []
    for n in (10, 100):
        rules = make_rules(n)
        median, worst = per_instance_us(lambda r=rules: decide(r, "keep", header, FACTS), 200, args.rounds)
        rows.append((f"decide(), {n} rules, CT header", median, worst, "< 1000" if n == 100 else ""))

    # apply() receives a freshly read dataset in the worker; read a batch up front so that
    # the figure is the morph, not the disk, and each call sees undecoded elements as in production.
    def fresh(n: int) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(path, stop_before_pixels=True) for _ in range(n)]

    for label, morph, target in (("apply(), Basic Profile, CT header", basic, "< 5000"),
                                 ("apply(), uid_remap only, CT header", uid_only, "")):  # fmt: skip
        times = []
        for _ in range(args.rounds):
            batch = fresh(50)
            start = time.perf_counter()
            for ds in batch:
                apply(ds, morph, ctx)
            times.append((time.perf_counter() - start) / len(batch) * 1e6)
        rows.append((label, statistics.median(times), max(times), target))

    print(f"{'operation':<38} {'median µs':>10} {'worst µs':>10}  target µs")
    for label, median, worst, target in rows:
        print(f"{label:<38} {median:>10.0f} {worst:>10.0f}  {target}")
    print(f"({args.rounds} rounds; CT_small.dcm header from the pydicom wheel, {len(header)} top-level elements)")


if __name__ == "__main__":
    main()
