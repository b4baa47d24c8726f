"""The thin client: light imports, edit files and records, the CLI's routing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from editfleet.client import RecordError, read_edits, to_edit
from editfleet.client.cli import ROUTED, main
from editfleet.client.records import normalise
from editfleet.workers.editing.requests import normalise_record

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
               "subject": "Danielle Darrieux", "ground_truth": "French",
               "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
               "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
OWN = {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome", "paraphrases": ["Eiffel Tower stands in"]}


def test_client_imports_without_heavy_packages():
    code = ("import sys, editfleet.client, editfleet.client.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers') "
            "or m.startswith('editfleet.workers') or m.startswith('editfleet.scheduler')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _shared_samples(name: str, count: int = 50) -> list[dict]:
    path = DATA / name
    return json.loads(path.read_text())[:count] if path.is_file() else []


@pytest.mark.parametrize("record", [COUNTERFACT, ZSRE, OWN, *_shared_samples("counterfact/counterfact-edit.json"),
                                    *_shared_samples("zsre/zsre_mend_train-1k.json")])
def test_record_mapping_matches_the_engine(record):
    assert normalise(record) == normalise_record(record)


def test_records_become_edits():
    edit = to_edit(COUNTERFACT)
    assert (edit.prompt, edit.subject, edit.target_new, edit.target_true) == (
        COUNTERFACT["prompt"], "Danielle Darrieux", "English", "French")
    assert list(edit.paraphrases) == [COUNTERFACT["rephrase_prompt"]] and edit.record_id == "0"
    edit = to_edit(OWN)
    assert not edit.HasField("target_true") and list(edit.paraphrases) == OWN["paraphrases"]
    with pytest.raises(RecordError, match="edit: field 'paraphrases'"):
        to_edit({**OWN, "paraphrases": [1, 2]})


def test_read_edits_jsonl_and_json_array(tmp_path):
    lines = tmp_path / "edits.jsonl"
    lines.write_text(json.dumps(OWN) + "\n\n" + json.dumps(COUNTERFACT) + "\n")
    assert [e.subject for e in read_edits(lines)] == ["Eiffel Tower", "Danielle Darrieux"]
    array = tmp_path / "cases.json"
    array.write_text(json.dumps([COUNTERFACT, ZSRE]))
    assert [e.target_new for e in read_edits(array)] == ["English", "unmanned aircraft"]


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "x"}\n{broken\n', r"edits.jsonl:2: invalid JSON"),
    (b"\n\n", r"no edit records"),
    (b"[1]", r"record 0: must be a JSON object"),
    (b"\xff\xfe{}", r"not UTF-8"),
])
def test_read_edits_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "edits.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=message):
        read_edits(path)


def test_cli_routes_subcommands_lazily():
    assert set(ROUTED) == {"bench", "models", "demo", "bench-service", "protect-prompts"}
    code = ("import sys; from editfleet.client.cli import main; "
            "rc = main(['models', 'list', '--home', sys.argv[1]]); "
            "print(rc, 'editfleet.scheduler' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "/nonexistent-home"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("0 False") and "gemma3-270m" in out.stdout


def test_cli_reports_a_bad_edits_file(tmp_path, capsys):
    path = tmp_path / "edits.jsonl"
    path.write_text("{nope\n")
    assert main(["submit", "--server", "127.0.0.1:1", "--model", "m", "--edits", str(path)]) == 1
    assert "edits.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_serve_refuses_a_missing_protected_prompts_file_before_starting(tmp_path, capsys):
    missing = tmp_path / "protect.txt"
    assert main(["serve", "--store", str(tmp_path / "store"), "--protect", str(missing)]) == 1
    assert f"protected prompts not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing was started or written
    assert main(["serve", "--store", str(tmp_path / "store"), "--engine-settings", "{nope"]) == 1
    assert "--engine-settings is not valid JSON" in capsys.readouterr().err


def test_serve_refuses_unknown_or_invalid_engine_settings_before_starting(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["serve", "--store", str(store), "--engine-settings", '{"spectral_capp": 0.45}']) == 1
    assert "engine_settings.spectral_capp is not an engine setting" in capsys.readouterr().err
    assert main(["serve", "--store", str(store), "--engine-settings", '{"update_rounds": 6.5}']) == 1
    assert "engine_settings.update_rounds must be an integer, got 6.5" in capsys.readouterr().err
    assert main(["serve", "--store", str(store), "--engine-settings", '[6]']) == 1
    assert "engine settings must be a JSON object, got list" in capsys.readouterr().err
    assert not store.exists()  # nothing was started or written
