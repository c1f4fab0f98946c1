"""The YAML loader: configs become models, mistakes become line-numbered problems."""

from __future__ import annotations

import pytest

from router.kernel.settings import Config, load_config
from rules.loader import ConfigError, load_model


def _problems(path):
    with pytest.raises(ConfigError) as info:
        load_model(path, Config)
    return info.value


def test_valid_config_loads_rules_in_order(write_config):
    """A well-formed config yields its rules, in file order, with their destinations."""
    path = write_config("""
        unrouted: keep
        rules:
          - name: CT to both
            when: {Modality: CT}
            forward: [pacs_main, archive]
          - name: everything to archive
            forward: archive
    """)
    config = load_config(path)
    assert [r.name for r in config.rules] == ["CT to both", "everything to archive"]
    assert config.rules[1].forward == ["archive"]


def test_keyword_typo_names_file_line_column_rule_and_suggestion(write_config):
    """A misspelt keyword is reported at its line with the near keyword."""
    path = write_config("""
        rules:
          - name: chest
            when:
              StudyDescripton: {regex: chest}
            forward: [pacs_main]
    """)
    err = _problems(path)
    (problem,) = err.problems
    assert problem.file == str(path)
    assert (problem.line, problem.column) == (8, 7)
    assert problem.rule == "chest"
    assert "did you mean 'StudyDescription'?" in problem.message
    assert str(err) == f"{path}:8:7: rule 'chest': {problem.message}"


def test_unknown_destination_is_an_error_at_the_forward_line(write_config):
    """forward naming a destination that is not configured is refused, with a suggestion."""
    path = write_config("""
        rules:
          - name: CT
            when: {Modality: CT}
            forward: [pacs_mian]
    """)
    (problem,) = _problems(path).problems
    assert problem.line == 8
    assert "unknown destination 'pacs_mian'" in problem.message
    assert "did you mean 'pacs_main'?" in problem.message


def test_every_problem_is_reported_at_once(write_config):
    """Several mistakes in one file give several problems, each at its own line."""
    path = write_config("""
        unrouted: kep
        rules:
          - name: a
            when: {Modalty: CT}
            fowrard: [pacs_main]
          - name: a
            when: {SourceIP: 10.0.0.0/33}
            morph:
              - sett: {InstitutionName: x}
            forward: [pacs_main]
    """)
    lines = sorted(p.line for p in _problems(path).problems)
    # unrouted, keyword, missing forward (at the rule), unknown key, duplicate name, CIDR, operation
    assert lines == [5, 7, 8, 9, 10, 11, 13]


def test_unknown_key_suggests_the_field(write_config):
    """A typo in a rule's own key names the key and the right spelling."""
    path = write_config("""
        rules:
          - name: r
            forward: [archive]
            finl: true
    """)
    problems = _problems(path).problems
    assert any("unknown key 'finl' (did you mean 'final'?)" in p.message and p.line == 8 for p in problems)


def test_a_real_key_in_the_wrong_place_says_where_it_does_not_belong(write_config):
    """A valid key under the wrong parent is not "unknown" (nor a typo of itself)."""
    path = write_config("""
        router:
          deid: {secret_env: X}
        rules:
          - name: r
            forward: [archive]
    """)
    problems = _problems(path).problems
    assert any(p.message == "key 'deid' does not belong under router" for p in problems), problems


def test_yaml_syntax_error_has_a_line(write_config):
    """Broken YAML is a ConfigError with the line, not a traceback."""
    path = write_config("rules: [\n  {name: a\n", with_destinations=False)
    (problem,) = _problems(path).problems
    assert problem.line >= 2
    assert "YAML syntax" in problem.message


def test_scalars_keep_the_text_written(write_config):
    """PatientID 0012345 stays a string (YAML 1.1 would read it as octal) and NO is not False."""
    path = write_config("""
        rules:
          - name: r
            when: {PatientID: 0012345, PatientSex: NO}
            forward: [archive]
    """)
    when = load_config(path).rules[0].when
    assert sorted(c.value for c in when.of) == ["0012345", "NO"]


def test_include_appends_rules_from_files_in_name_order(write_config):
    """include: globs are resolved relative to the config; each file's errors keep its own name and line."""
    write_config("- name: twenty\n  forward: [archive]\n", name="rules.d/20-b.yaml", with_destinations=False)
    write_config("rules:\n  - name: ten\n    forward: [archive]\n", name="rules.d/10-a.yaml", with_destinations=False)
    path = write_config("""
        include: [rules.d/*.yaml]
        rules:
          - name: main
            forward: [pacs_main]
    """)
    assert [r.name for r in load_config(path).rules] == ["main", "ten", "twenty"]

    bad = write_config("- name: bad\n  when: {Modality: CT}\n  forward: [nowhere]\n",
                       name="rules.d/30-c.yaml", with_destinations=False)
    (problem,) = _problems(path).problems
    assert (problem.file, problem.line, problem.rule) == (str(bad), 3, "bad")


def test_include_that_matches_nothing_is_an_error(write_config):
    """A pattern matching no file is most likely a typo, so it is refused."""
    path = write_config("include: [rulez/*.yaml]\n")
    (problem,) = _problems(path).problems
    assert "no file matches" in problem.message and problem.line == 5


def test_unrouted_forward_checks_destinations(write_config):
    """unrouted: {forward: [...]} names configured destinations only."""
    ok = load_config(write_config("unrouted: {forward: [archive]}\n"))
    assert ok.unrouted.forward == ["archive"]
    (problem,) = _problems(write_config("unrouted: {forward: [archve]}\n")).problems
    assert "did you mean 'archive'?" in problem.message


def test_tls_true_in_yaml_means_the_system_cas_for_destinations_and_modalities(write_config):
    """``tls: true`` as the README writes it (YAML text, not a Python bool) is DICOM TLS
    with every default; ``tls: false`` is none."""
    config = load_config(write_config("""
        destinations:
          remote: {ae_title: REMOTE, host: remote.example.org, port: 2762, tls: true}
        modalities:
          VIEWER: {host: 10.0.5.33, port: 2762, tls: true}
          CT_1: {host: 10.0.0.21, port: 104, tls: false}
    """, with_destinations=False))
    assert config.destinations["remote"].tls is not None and config.destinations["remote"].tls.ca_file is None
    assert config.modalities["VIEWER"].tls is not None and config.modalities["CT_1"].tls is None


def test_query_retrieve_worklist_and_mpps_name_dimse_destinations(write_config):
    """Each service names destinations that exist and speak DIMSE: a typo or a DICOMweb
    destination is an error that names the key."""
    ok = load_config(write_config("""
        query_retrieve: {sources: [pacs_main, archive]}
        worklist: {source: research}
        mpps: {forward: [archive]}
    """))
    assert ok.query_retrieve.sources == ["pacs_main", "archive"] and ok.worklist.source == "research"
    for text, words in (("query_retrieve: {sources: [pacs_mian]}\n", "query_retrieve.sources: 'pacs_mian'"),
                        ("worklist: {source: ris}\n", "worklist.source: 'ris'"),
                        ("mpps: {forward: []}\n", "forward: List should have at least 1 item")):
        with pytest.raises(ConfigError) as info:
            load_config(write_config(text))
        assert words in str(info.value), str(info.value)
    cloud = write_config("""
        destinations:
          cloud: {dicomweb: {url: https://dicom.example.org/dicom-web}}
        query_retrieve: {sources: [cloud]}
    """, with_destinations=False)
    with pytest.raises(ConfigError) as info:
        load_config(cloud)
    assert "a DICOMweb destination" in str(info.value)
