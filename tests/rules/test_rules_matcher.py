"""decide(): which rules match, where the instance goes, what the unrouted policy does."""

from __future__ import annotations

from rules.facts import AssociationFacts
from rules.matcher import decide
from rules.models import ForwardUnrouted, Rule


def rule(name, when=None, forward=("archive",), morph=(), final=False):
    return Rule.model_validate(
        {"name": name, "when": when or {}, "forward": list(forward), "morph": list(morph), "final": final}
    )


def test_every_matching_rule_applies_in_order(ct, facts):
    """Two matching rules both deliver; a non-matching one does not."""
    rules = [
        rule("ct", {"Modality": "CT"}, ["pacs_main"]),
        rule("mr", {"Modality": "MR"}, ["research"]),
        rule("scanner", {"CallingAETitle": "CT_SCANNER_1"}, ["archive"]),
    ]
    decision = decide(rules, "keep", ct, facts)
    assert decision.matched == ("ct", "scanner")
    assert decision.deliveries == {"pacs_main": (), "archive": ()}
    assert decision.unrouted is None


def test_final_stops_later_rules(ct, facts):
    """A matching final rule is the last one evaluated."""
    rules = [rule("first", {"Modality": "CT"}, final=True), rule("second", {}, ["pacs_main"])]
    assert decide(rules, "keep", ct, facts).matched == ("first",)


def test_multi_valued_element_matches_when_any_value_does(ct, facts):
    """ImageType ORIGINAL\\PRIMARY\\AXIAL equals AXIAL."""
    assert decide([rule("axial", {"ImageType": "AXIAL"})], "drop", ct, facts).matched == ("axial",)
    assert decide([rule("loc", {"ImageType": "LOCALIZER"})], "drop", ct, facts).unrouted == "drop"


def test_unrouted_policies(ct, facts):
    """No match: keep and drop are reported, forward fills deliveries untouched."""
    rules = [rule("mr", {"Modality": "MR"})]
    assert decide(rules, "keep", ct, facts).unrouted == "keep"
    decision = decide(rules, ForwardUnrouted(forward=["archive"]), ct, facts)
    assert decision.unrouted is None and decision.deliveries == {"archive": ()}


def test_same_destination_from_two_rules_gets_one_delivery_with_both_morphs(ct, facts):
    """Morph lists of rules sharing a destination concatenate in rule order."""
    rules = [
        rule("plain", {}, ["research"]),
        rule("deid", {}, ["research"], morph=[{"set": {"InstitutionName": "X"}}, "uid_remap"]),
    ]
    ops = decide(rules, "keep", ct, facts).deliveries["research"]
    assert [type(op).__name__ for op in ops] == ["SetOp", "UidRemapOp"]


def test_fact_conditions_without_facts_do_not_match(ct):
    """A dry run with no association: conditions on CallingAETitle do not match."""
    rules = [rule("scanner", {"CallingAETitle": "CT_SCANNER_1"})]
    assert decide(rules, "keep", ct, AssociationFacts.unknown()).unrouted == "keep"


def test_a_dataset_given_as_a_function_is_read_once_and_only_when_a_rule_looks_at_it(ct, facts):
    """The ingest hands decide() a function that builds the header: rules on the
    association alone (and rules without conditions) never call it; the first rule
    that looks at an attribute calls it once, and the decision is the one the
    dataset itself gives."""
    reads = []

    def read():
        reads.append(1)
        return ct

    on_association = [rule("scanner", {"CallingAETitle": "CT_SCANNER_1"}, ["archive"]), rule("all", {}, ["pacs"])]
    assert decide(on_association, "keep", read, facts) == decide(on_association, "keep", ct, facts)
    assert reads == []

    on_dataset = [rule("scanner", {"CallingAETitle": "CT_SCANNER_1"}, ["archive"]),
                  rule("ct", {"Modality": "CT"}, ["pacs_main"]), rule("axial", {"ImageType": "AXIAL"}, ["research"])]
    decision = decide(on_dataset, "keep", read, facts)
    assert decision == decide(on_dataset, "keep", ct, facts)
    assert decision.matched == ("scanner", "ct", "axial")
    assert reads == [1]
