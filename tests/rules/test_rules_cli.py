"""dicom-router check and test, through click's CliRunner.

These commands are pure logic over files (no network, no Redis), so running
them in-process with CliRunner is the real thing, not a fake of it.
"""

from __future__ import annotations

import json

import pydicom
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from router.cli_rules import check
from router.cli_rules import test as dry_run

RULES = """\
unrouted: drop
rules:
  - name: CT to PACS
    when: {Modality: CT}
    forward: [pacs_main]
  - name: research copy
    when: {Modality: CT, CallingAETitle: CT_SCANNER_1}
    morph:
      - anonymize
      - set: {PatientName: "SUBJ^{PatientID}"}
    forward: [research]
"""


def test_check_accepts_a_valid_config_with_a_summary(write_config):
    """A valid config: exit 0 and one summary line."""
    result = CliRunner().invoke(check, ["-c", str(write_config(RULES))], env={"DICOM_ROUTER_SECRET": "x" * 32})
    assert result.exit_code == 0, result.output
    assert "OK: 3 destination(s), 2 rule(s), unrouted: drop" in result.output


def test_check_names_the_services_a_config_asks_for(write_config):
    """Q/R, worklist and MPPS are in the summary line, with the destinations they use."""
    text = RULES + "query_retrieve: {sources: [pacs_main, archive]}\nworklist: {source: research}\n" \
        "mpps: {forward: [research, pacs_main]}\n"
    result = CliRunner().invoke(check, ["-c", str(write_config(text))], env={"DICOM_ROUTER_SECRET": "x" * 32})
    assert result.exit_code == 0, result.output
    assert ("unrouted: drop; Q/R from pacs_main, archive; worklist from research; MPPS to research, pacs_main"
            in result.output)


def test_check_with_a_typo_exits_1_and_names_the_line(write_config):
    """A misspelt keyword: exit 1, file:line:col, rule and suggestion printed."""
    path = write_config(RULES.replace("{Modality: CT}", "{Modalty: CT}", 1))
    result = CliRunner().invoke(check, ["-c", str(path)])
    assert result.exit_code == 1
    assert f"{path}:8:12: rule 'CT to PACS': unknown DICOM keyword 'Modalty' (did you mean 'Modality'?)" in result.output


def test_check_refuses_rules_that_need_a_secret_there_is_not(write_config):
    """A rule that needs the secret where none is set (or one too short) would
    quarantine every instance at run time: check exits 1 naming the rule's line."""
    path = write_config(RULES)
    for secret in ("", "x" * 15):
        result = CliRunner().invoke(check, ["-c", str(path)], env={"DICOM_ROUTER_SECRET": secret})
        assert result.exit_code == 1, result.output
        assert f"{path}:12:5: rule 'research copy': " in result.output, result.output
    assert "anonymize needs the de-identification secret: set $DICOM_ROUTER_SECRET" in result.output or \
        "at least 16" in result.output


def test_check_refuses_a_destination_named_twice(write_config):
    """Two destinations under one name: the second would silently replace the first."""
    path = write_config("""\
destinations:
  pacs_main: {ae_title: A, host: 127.0.0.1, port: 104}
  pacs_main: {ae_title: B, host: 127.0.0.1, port: 105}
rules: []
""", with_destinations=False)
    result = CliRunner().invoke(check, ["-c", str(path)])
    assert result.exit_code == 1
    assert f"{path}:3:3: duplicate key 'pacs_main' (first at line 2)" in result.output


def test_check_refuses_a_min_free_bytes_the_spool_volume_cannot_meet(write_config, tmp_path):
    """min_free_bytes larger than the spool's whole volume: every C-STORE would get 0xA700."""
    path = write_config(f"router:\n  spool_dir: {tmp_path}/spool\n  min_free_bytes: {1 << 62}\nrules: []\n",
                        with_destinations=False)
    result = CliRunner().invoke(check, ["-c", str(path)])
    assert result.exit_code == 1
    assert f"{path}:3:3: router.min_free_bytes is {1 << 62} bytes but the spool's volume" in result.output


def test_test_prints_rules_destinations_and_the_diff(write_config):
    """A dry run lists matched rules, destinations and before -> after per changed tag."""
    ct = get_testdata_file("CT_small.dcm")
    result = CliRunner().invoke(
        dry_run, ["-c", str(write_config(RULES)), ct, "--calling-ae", "CT_SCANNER_1"],
        env={"DICOM_ROUTER_SECRET": "x" * 32},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "matched: CT to PACS, research copy" in result.output
    assert "-> pacs_main: as received" in result.output
    assert "PatientName" in result.output and "'CompressedSamples^CT1' -> 'SUBJ^" in result.output
    assert "SOPInstanceUID" in result.output and "-> '2.25." in result.output


def test_test_json_for_scripts_and_unrouted(write_config, tmp_path):
    """--json gives one document; a file no rule matches shows the unrouted policy."""
    mr = tmp_path / "mr" / "mr.dcm"
    mr.parent.mkdir()
    pydicom.dcmread(get_testdata_file("MR_small.dcm")).save_as(mr)
    ct = get_testdata_file("CT_small.dcm")
    result = CliRunner().invoke(dry_run, ["-c", str(write_config(RULES)), str(mr.parent), ct, "--json"],
                                env={"DICOM_ROUTER_SECRET": "x" * 32})
    assert result.exit_code == 0, result.output
    mr_result, ct_result = json.loads(result.output)
    assert mr_result["matched"] == [] and mr_result["unrouted"] == "drop"
    assert ct_result["matched"] == ["CT to PACS"]  # no CallingAETitle given, so no research copy
    assert ct_result["deliveries"] == {"pacs_main": {"morph": [], "changes": []}}


def test_test_reports_unreadable_files_and_exits_1(write_config, tmp_path):
    """A file that is not DICOM is reported, and the exit status says so."""
    junk = tmp_path / "notes.txt"
    junk.write_text("not dicom")
    result = CliRunner().invoke(dry_run, ["-c", str(write_config(RULES)), str(junk)])
    assert result.exit_code == 1
    assert "not readable as DICOM" in result.output


def test_every_rules_example_validates_and_dry_runs(tmp_path):
    """deploy/examples/rules-*.yaml pass check and dry-run real files without errors."""
    from pathlib import Path

    from router.kernel.settings import load_config

    examples = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("rules-*.yaml"))
    assert len(examples) >= 3
    for example in examples:
        # The DICOMweb credentials it names, as an operator exports them.
        webs = [d.dicomweb for d in load_config(example).destinations.values() if d.dicomweb is not None]
        named = [name for web in webs
                 for name in (web.token_env, web.password_env, web.oauth2 and web.oauth2.client_secret_env) if name]
        env = {"DICOM_ROUTER_SECRET": "x" * 32, **{name: "an-example-credential" for name in named}}
        result = CliRunner().invoke(check, ["-c", str(example)], env=env)
        assert result.exit_code == 0, result.output
        files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
        result = CliRunner().invoke(dry_run, ["-c", str(example), *files, "--source-ip", "10.1.0.5"], env=env)
        assert result.exit_code == 0, result.output


def test_check_takes_both_forms_of_storage_commitment(write_config):
    """storage_commitment is true or its settings; a typo in the settings is refused at its line."""
    path = write_config("""\
destinations:
  pacs_main: {ae_title: PACS, host: 127.0.0.1, port: 104, storage_commitment: true}
  archive: {ae_title: ARCH, host: 127.0.0.1, port: 105, storage_commitment: {timeout_seconds: 30}}
rules: []
""", with_destinations=False)
    result = CliRunner().invoke(check, ["-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    path.write_text(path.read_text().replace("timeout_seconds", "timeout_second"))
    result = CliRunner().invoke(check, ["-c", str(path)])
    assert result.exit_code != 0
    assert f"{path}:3" in result.output and "timeout_second" in result.output
