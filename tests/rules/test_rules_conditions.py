"""Conditions: each operator, DICOM VR edge cases, and properties that must hold for any input."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rules.conditions import WhenError, from_yaml, glob_to_regex
from rules.facts import AssociationFacts

NOBODY = AssociationFacts.unknown()
CS_VALUE = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16)


def matches(when, ds, facts=NOBODY) -> bool:
    return from_yaml(when).test(ds, facts)


def ds_with(**attrs) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@given(values=st.lists(CS_VALUE, min_size=1, max_size=5), probe=CS_VALUE)
def test_equality_matches_when_any_value_of_a_multi_valued_element_does(values, probe):
    """ImageType A\\B\\C equals X exactly when X is one of the values."""
    ds = ds_with(ImageType=values)
    assert matches({"ImageType": probe}, ds) == (probe in values)


@given(values=st.lists(CS_VALUE, min_size=1, max_size=4), probes=st.lists(CS_VALUE, min_size=1, max_size=4))
def test_in_is_equality_with_any_operand(values, probes):
    """A YAML list (or {in: [...]}) matches when any value equals any operand."""
    ds = ds_with(ImageType=values)
    expected = bool(set(values) & set(probes))
    assert matches({"ImageType": probes}, ds) == expected
    assert matches({"ImageType": {"in": probes}}, ds) == expected


@given(text=st.text(alphabet="ABC^ .-0123", min_size=1, max_size=12), data=st.data())
def test_glob_matches_text_it_was_derived_from(text, data):
    """Replacing characters of a value by ? and runs by * gives a pattern that matches it."""
    assume(text.strip() == text)  # DICOM padding spaces are not part of a value
    chars = list(text)
    for i in data.draw(st.sets(st.integers(0, len(chars) - 1), max_size=3)):
        chars[i] = "?"
    pattern = "".join(chars)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(pattern)))
        pattern = pattern[:cut] + "*"
    assert glob_to_regex(pattern).fullmatch(text)
    assert matches({"PatientID": {"glob": pattern}}, ds_with(PatientID=text))


@given(a=st.text(alphabet="AB.()[]+", max_size=6), b=st.text(alphabet="AB.()[]+", max_size=6))
def test_glob_without_wildcards_is_equality(a, b):
    """Regex metacharacters are literal in DICOM wildcard matching."""
    assert bool(glob_to_regex(a).fullmatch(b)) == (a == b)


def test_glob_on_person_name_components():
    """PN values match on their DICOM form, components separated by ^."""
    ds = ds_with(PatientName="Doe^John^^Dr")
    assert matches({"PatientName": {"glob": "Doe^*"}}, ds)
    assert not matches({"PatientName": {"glob": "John*"}}, ds)
    assert matches({"PatientName": "Doe^John^^Dr"}, ds)


@given(value=st.integers(-10_000, 10_000), low=st.integers(-10_000, 10_000), high=st.integers(-10_000, 10_000))
def test_numeric_ranges_compare_numbers(value, low, high):
    """gt/lt/between on IS compare as numbers, not text ("10" > "9")."""
    ds = ds_with(SeriesNumber=value)
    assert matches({"SeriesNumber": {"gt": low}}, ds) == (value > low)
    assert matches({"SeriesNumber": {"lt": high}}, ds) == (value < high)
    assert matches({"SeriesNumber": {"between": [low, high]}}, ds) == (low <= value <= high)


@given(
    day=st.dates(dt.date(1900, 1, 1), dt.date(2100, 1, 1)),
    low=st.dates(dt.date(1900, 1, 1), dt.date(2100, 1, 1)),
    high=st.dates(dt.date(1900, 1, 1), dt.date(2100, 1, 1)),
    iso=st.booleans(),
)
def test_date_ranges_on_da(day, low, high, iso):
    """DA ranges accept YYYYMMDD and YYYY-MM-DD operands and compare as dates."""
    fmt = "%Y-%m-%d" if iso else "%Y%m%d"
    ds = ds_with(StudyDate=day.strftime("%Y%m%d"))
    assert matches({"StudyDate": {"between": [low.strftime(fmt), high.strftime(fmt)]}}, ds) == (low <= day <= high)
    assert matches({"StudyDate": {"gt": low.strftime(fmt)}}, ds) == (day > low)


def test_time_ranges_accept_partial_and_colon_forms():
    """TM 0815 is after 08:00 and before 0900; fractional seconds compare too."""
    ds = ds_with(StudyTime="081500.25")
    assert matches({"StudyTime": {"between": ["08:00", "0900"]}}, ds)
    assert matches({"StudyTime": {"gt": "081500.2"}}, ds)
    assert not matches({"StudyTime": {"lt": "08"}}, ds)


def test_datetime_ranges_ignore_missing_precision_and_offsets():
    """DT 2024 with an offset compares as the start of 2024."""
    ds = ds_with(AcquisitionDateTime="20240315101010.5+0100")
    assert matches({"AcquisitionDateTime": {"between": ["2024-03-15 10:00", "20240316"]}}, ds)
    assert not matches({"AcquisitionDateTime": {"lt": "2024"}}, ds)


def test_date_equality_accepts_iso_form():
    """StudyDate: 2024-01-31 equals the DICOM 20240131."""
    assert matches({"StudyDate": "2024-01-31"}, ds_with(StudyDate="20240131"))


@pytest.mark.parametrize(
    ("attrs", "exists"),
    [({}, False), ({"StudyDescription": ""}, False), ({"StudyDescription": "x"}, True)],
)
def test_exists_and_absent_are_complements_with_empty_as_absent(attrs, exists):
    """A Type 2 element sent empty counts as absent; exists and absent always disagree."""
    ds = ds_with(**attrs)
    assert matches({"StudyDescription": {"exists": True}}, ds) == exists
    assert matches({"StudyDescription": {"absent": True}}, ds) == (not exists)
    assert matches({"StudyDescription": {"exists": False}}, ds) == (not exists)


def test_contains_ignores_case_and_regex_searches():
    """contains is a case-insensitive substring; regex is an unanchored search."""
    ds = ds_with(StudyDescription="Research Protocol 7")
    assert matches({"(0008,1030)": {"contains": "research"}}, ds)
    assert matches({"StudyDescription": {"regex": r"protocol \d"}}, ds) is False
    assert matches({"StudyDescription": {"regex": r"(?i)protocol \d"}}, ds)


@given(a=st.booleans(), b=st.booleans())
def test_any_all_not_follow_boolean_logic(a, b):
    """Nested any/all/not evaluate like or/and/not of their parts."""
    ds = ds_with(Modality="CT" if a else "MR", BodyPartExamined="HEAD" if b else "CHEST")
    ca, cb = {"Modality": "CT"}, {"BodyPartExamined": "HEAD"}
    assert matches({"any": [ca, cb]}, ds) == (a or b)
    assert matches({"all": [ca, cb]}, ds) == (a and b)
    assert matches({"not": ca}, ds) == (not a)
    assert matches({"Modality": {"not": "CT"}}, ds) == (not a)
    assert matches({"not": {"any": [ca, {"not": cb}]}}, ds) == (not (a or not b))


def _with_references() -> Dataset:
    ds = ds_with(Modality="CT")
    items = []
    for uid in ("1.2.3", "1.2.4"):
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedImageSequence = Sequence(items)
    return ds


def test_sequence_paths_by_index_and_any_item():
    """Seq[0].Kw looks at the first item; Seq[*].Kw and Seq.Kw at any item."""
    ds = _with_references()
    assert matches({"ReferencedImageSequence[0].ReferencedSOPInstanceUID": "1.2.3"}, ds)
    assert not matches({"ReferencedImageSequence[0].ReferencedSOPInstanceUID": "1.2.4"}, ds)
    assert matches({"ReferencedImageSequence[*].ReferencedSOPInstanceUID": "1.2.4"}, ds)
    assert matches({"ReferencedImageSequence.ReferencedSOPInstanceUID": "1.2.4"}, ds)
    assert not matches({"ReferencedImageSequence[5].ReferencedSOPInstanceUID": {"exists": True}}, ds)
    assert matches({"ReferencedImageSequence": {"exists": True}}, ds)


def test_private_tag_by_creator_finds_the_block_wherever_it_is():
    """(0019,"CREATOR",0C) names the element whatever block the creator reserved."""
    ds = Dataset()
    ds.private_block(0x0019, "OTHER", create=True)
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)  # lands in block 0x11
    block.add_new(0x0C, "LO", "HELICAL")
    assert matches({'(0019,"GEMS_ACQU_01",0C)': "HELICAL"}, ds)
    assert not matches({'(0019,"OTHER",0C)': "HELICAL"}, ds)
    assert matches({"(0019,110C)": "HELICAL"}, ds)


def test_source_ip_matches_networks_and_mapped_addresses():
    """SourceIP takes addresses and CIDR networks; IPv4-mapped IPv6 peers count as IPv4."""
    facts = AssociationFacts("CT1", "ROUTER", "::ffff:10.1.2.3")
    ds = Dataset()
    assert matches({"SourceIP": "10.0.0.0/8"}, ds, facts)
    assert matches({"SourceIP": ["192.168.0.0/16", "10.1.2.3"]}, ds, facts)
    assert not matches({"SourceIP": "10.1.2.4"}, ds, facts)
    assert matches({"CallingAETitle": {"glob": "CT*"}}, ds, facts)


def test_numbers_equal_their_written_form():
    """SeriesNumber 3 equals '3' and '3.0'; DS values compare numerically."""
    ds = ds_with(SeriesNumber=3, SliceThickness="5.000000")
    assert matches({"SeriesNumber": "3"}, ds) and matches({"SeriesNumber": "3.0"}, ds)
    assert matches({"SliceThickness": 5}, ds)


@pytest.mark.parametrize(
    ("when", "fragment"),
    [
        ({"Modality": {"eq": "CT"}}, "unknown operator 'eq'"),
        ({"Modality": {"regx": "CT"}}, "did you mean 'regex'?"),
        ({"StudyDescription": {"gt": 3}}, "this attribute is LO"),
        ({"CallingAETitle": {"lt": "A"}}, "not CallingAETitle"),
        ({"StudyDate": {"between": ["20240101"]}}, "takes two values"),
        ({"Modality": {"regex": "("}}, "invalid regular expression"),
        ({"Modality": None}, "has no value"),
        ({"PatientNmae": "x"}, "did you mean 'PatientName'?"),
        ({"Modality.PatientID": "x"}, "is not a sequence"),
        ({"any": []}, "at least one condition"),
    ],
)
def test_mistakes_are_explained(when, fragment):
    """Each authoring mistake yields a problem whose message says what is wrong."""
    with pytest.raises(WhenError) as info:
        from_yaml(when)
    assert any(fragment in message for _, message in info.value.problems), info.value.problems


def test_problem_paths_point_into_the_yaml():
    """Problems carry the path of their node so the loader can name the line."""
    with pytest.raises(WhenError) as info:
        from_yaml({"any": [{"Modality": "CT"}, {"StudyDescription": {"regx": "x"}}]})
    (path, _), = info.value.problems
    assert path == ("any", 1, "StudyDescription", "regx")


def test_empty_when_matches_everything():
    """A rule without conditions is a catch-all."""
    assert matches(None, Dataset()) and matches({}, Dataset())


@settings(max_examples=50)
@given(st.text(max_size=20))
def test_regex_condition_never_raises_on_any_value(text):
    """Values with any characters are matched without errors."""
    matches({"StudyDescription": {"regex": re.escape(text) or "x"}}, ds_with(StudyDescription=text))
