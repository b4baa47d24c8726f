"""The editing engine on tiny random models: the null-space property, batching, resume, refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editfleet.workers.editing.batching import length_groups
from editfleet.workers.editing.config import EditConfig, default_config
from editfleet.workers.editing.engine import Editor
from editfleet.workers.editing.requests import EditRequest, EditValidationError
from editfleet.workers.editing import runner as runner_module
from editfleet.workers.editing.runner import LayerRunner, SubjectReplay, SuffixRunner, add_at_projection, capture_projection
from editfleet.workers.editing.statistics import CorpusText, paragraph_starts, params_digest, token_sequences
from editfleet.workers.editing import targets as targets_module
from editfleet.workers.editing.targets import context_rows, optimise_targets, optimise_targets_loop
from editfleet.workers.models.tiny import tiny_model
from engine_support import REQUESTS, TINY, edit_model, projection_weights, target_nll, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def make_editor(tmp_path, corpus, family="llama", method="alphaedit", **overrides) -> Editor:
    model, tok = edit_model(family)
    return Editor.for_model(model, tok, method, cache_dir=tmp_path / "cache", corpus=[corpus], **{**TINY, **overrides})


def preserved_keys(editor: Editor, corpus: Path) -> dict[int, torch.Tensor]:
    """The projection inputs of the statistics corpus (the keys the projector protects)."""
    seqs = torch.tensor(list(token_sequences(editor.tokenizer, [corpus], 64, editor.config.stats_tokens)))
    with capture_projection(editor.model, editor.adapter, list(editor.config.layers)) as seen:
        LayerRunner(editor.model, editor.adapter, seqs, torch.ones_like(seqs), start=editor.config.layers[-1],
                    stop=editor.config.layers[-1])
    return {i: seen["in"][i].reshape(-1, seen["in"][i].shape[-1]) for i in editor.config.layers}


def relative_output_change(editor: Editor, keys: dict[int, torch.Tensor], before: dict[int, torch.Tensor]) -> float:
    worst = 0.0
    for i, k in keys.items():
        delta = editor.adapter.weight(editor.model, i) - before[i]
        worst = max(worst, float((k @ delta.T).norm() / (k @ before[i].T).norm()))
    return worst


def value_at_subject(editor: Editor, requests) -> torch.Tensor:
    """The last edited layer's output at each request's subject (bare prompt)."""
    rows = context_rows(editor.tokenizer, requests, ["{}"])
    runner = LayerRunner(editor.model, editor.adapter, rows.input_ids, rows.attention_mask, start=0,
                         stop=editor.config.layers[-1])
    with torch.no_grad():
        return runner.run()[torch.arange(rows.size), rows.subject_pos]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_subject_replay_in_groups_and_from_the_changed_layer_equals_a_full_pass(tmp_path, corpus, family, monkeypatch):
    """The update's replay (length groups, replaying only from the lowest changed layer) reads
    the same keys, values and last-layer outputs as one padded pass of the whole model."""
    editor = make_editor(tmp_path, corpus, family, layers=(1, 2, 3))
    layers = list(editor.config.layers)
    rows = context_rows(editor.tokenizer, REQUESTS, ["{}", "Once upon a time in a land far away. {}", "Well. {}"])

    def full_pass():
        runner = LayerRunner(editor.model, editor.adapter, rows.input_ids, rows.attention_mask, start=0, stop=layers[-1])
        with capture_projection(editor.model, editor.adapter, layers, outputs=True) as seen, torch.no_grad():
            h = runner.run()
        at = (torch.arange(rows.size), rows.subject_pos)
        return {i: seen["in"][i][at] for i in layers}, {i: seen["out"][i][at] for i in layers}, h[at]

    monkeypatch.setattr(runner_module, "GROUP_COST", 0)  # split by length even on this small batch
    replay = SubjectReplay(editor.model, editor.adapter, rows, layers)
    assert len(replay.members) > 1
    gen = torch.Generator().manual_seed(0)
    for layer in [None, 2, 1, 3]:  # nothing changed yet, then single layers in an update's order
        if layer is not None:
            w = editor.adapter.weight(editor.model, layer)
            editor.adapter.add_delta(editor.model, layer, 0.5 * w.norm() / w.numel() ** 0.5
                                     * torch.randn(w.shape, generator=gen))
            replay.changed(layer)
        replay.refresh()
        keys, values, hidden = full_pass()
        for i in layers:
            torch.testing.assert_close(replay.keys[i], keys[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(replay.values[i], values[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(replay.hidden, hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_suffix_replay_equals_the_whole_replay_from_the_subject_on(family):
    """Replaying only the positions from each row's subject on, over the earlier positions'
    recorded keys and values, gives the whole replay's hidden states and gradients there (Gemma
    3's tiny config has a 16-token sliding window, shorter than these rows). GPT-2 passes its
    mask positionally and is replayed whole."""
    model, tok = tiny_model(family, seed=1, initializer_range=0.1)
    adapter, layer = _adapter(model), 2
    rows = context_rows(tok, REQUESTS, ["{}", "Once upon a time in a land far away. {}", "Well. {}"], with_targets=True)
    whole = LayerRunner(model, adapter, rows.input_ids, rows.attention_mask, start=layer)
    suffix = SuffixRunner(model, adapter, rows.input_ids, rows.attention_mask, rows.subject_pos, start=layer)
    if family == "gpt2":
        assert not suffix.split.any()
    else:
        assert torch.equal(suffix.split, rows.subject_pos)
    live = torch.tensor([0, 2, 3, 5])
    shift = torch.randn(len(live), model.config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_()

    def replay(runner, slot):
        def add(out):
            at = (torch.arange(len(live)), slot[live])
            return out.index_put(at, out[at] + shift)
        with add_at_projection(model, adapter, layer, add):
            h = runner.run(rows=live)
        grad, = torch.autograd.grad(h[torch.arange(len(live)), slot[live]].square().sum(), shift)
        return h.detach(), grad

    split = suffix.split
    h_whole, g_whole = replay(whole, rows.subject_pos)
    h_suffix, g_suffix = replay(suffix, rows.subject_pos - split)
    lengths = rows.attention_mask.sum(1)
    for k, r in enumerate(live.tolist()):
        n = int(lengths[r] - split[r])
        torch.testing.assert_close(h_suffix[k, :n], h_whole[k, int(split[r]):int(lengths[r])], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_suffix, g_whole, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # from a given hidden state (one layer up), as the float32 re-check does
        mid = suffix.run(end=layer)
        torch.testing.assert_close(suffix.run(start=layer + 1, hidden=mid), suffix.run(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_alphaedit_preserves_statistics_keys_and_reaches_targets(tmp_path, corpus, family):
    editor = make_editor(tmp_path, corpus, family)
    keys = preserved_keys(editor, corpus)
    before = projection_weights(editor)
    value_before = value_at_subject(editor, REQUESTS)
    nll_before = [target_nll(editor.model, editor.tokenizer, r.text, r.target_new) for r in REQUESTS]
    editor.contexts = ["{}", "Once upon a time. {}", "Well. {}"]
    z = optimise_targets(editor.model, editor.tokenizer, editor.adapter, REQUESTS, editor.contexts, editor.config).z
    result = editor.apply(REQUESTS)

    # Null space: outputs for the keys the statistics were computed on do not move.
    assert relative_output_change(editor, keys, before) <= 1e-4
    info = editor.projector_info
    assert all(0 < v["kept"] < v["dims"] for v in info.values()), info
    # The edited requests reach their target values: most of the distance to z closes (what is
    # left is the ridge term and the directions the projector forbids) ...
    after = value_at_subject(editor, REQUESTS)
    gap = ((after - z).norm(dim=-1) / (value_before - z).norm(dim=-1)).max().item()
    assert gap < 0.3, gap
    # ... and the new answers become more likely (tiny random models move little: the real-model
    # test checks that edits take).
    nll_after = [target_nll(editor.model, editor.tokenizer, r.text, r.target_new) for r in REQUESTS]
    assert sum(nll_after) < sum(nll_before) - 0.1, (nll_before, nll_after)
    rank = editor.config.update_rounds * len(REQUESTS)  # one column block per update pass
    assert all(u.shape[1] == rank and v.shape[1] == rank for u, v in result.deltas.values())


@pytest.mark.parametrize("key_contexts", ["mean", "each"])
def test_more_update_rounds_close_more_of_the_value_gap(tmp_path, corpus, key_contexts):
    """Each pass over the layers solves for what the previous passes left; preserved keys stay put."""
    gaps = {}
    for rounds in (1, 3):
        editor = make_editor(tmp_path, corpus, "gemma3", update_rounds=rounds, key_contexts=key_contexts)
        keys = preserved_keys(editor, corpus)
        before = projection_weights(editor)
        editor.contexts = ["{}", "Once upon a time. {}"]
        gaps[rounds] = sum(editor.apply(REQUESTS).value_gap) / len(REQUESTS)
        assert relative_output_change(editor, keys, before) <= 1e-4
    assert gaps[3] < 0.5 * gaps[1], gaps


def test_post_norm_iterations_bring_gemma_values_to_their_targets(tmp_path, corpus):
    """Gemma 3 normalises the projection output: the shift is mapped back through that norm
    numerically, and too few iterations leave the update short of its targets."""
    gaps = {}
    for iterations in (1, 100):
        editor = make_editor(tmp_path, corpus, "gemma3", update_rounds=1, post_norm_iterations=iterations)
        editor.contexts = ["{}", "Once upon a time. {}"]
        gaps[iterations] = sum(editor.apply(REQUESTS).value_gap) / len(REQUESTS)
    assert gaps[100] < 0.5 * gaps[1], gaps


@pytest.mark.parametrize("field, value", [("post_norm_iterations", 0), ("update_rounds", -1), ("v_lr", 0.0),
                                          ("null_moment_weight", -1.0), ("nullspace_energy", 1.0),
                                          ("spectral_cap", 0.0), ("protect_weight", -0.1), ("kl_factor", -0.1),
                                          ("v_weight_decay", -0.5), ("v_loss_threshold", -1e-3), ("n_prefixes", -1),
                                          ("prefix_tokens", 0), ("nullspace_threshold", -1e-2), ("alpha", -1.0),
                                          ("mom2_update_weight", -1.0), ("protect_starts", -1),
                                          ("protect_start_words", 0), ("repair_limit", -1), ("repair_margin", -0.5),
                                          ("repair_batch", "all"), ("retarget_rounds", -1),
                                          ("retarget_clamp_norm_factor", 0.0)])
def test_bad_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        default_config("gemma3", "alphaedit", 6, **{field: value})


def test_null_moment_weight_steers_a_leaky_null_space_to_quiet_directions(tmp_path, corpus):
    """When the null space still carries preserved energy (here 20%, as on small real models),
    weighting it by the second moment moves preserved outputs less, and the edits still land."""
    change, gap = {}, {}
    for weight in (0.0, 100.0):
        editor = make_editor(tmp_path, corpus, nullspace_energy=0.2, null_moment_weight=weight)
        keys = preserved_keys(editor, corpus)
        before = projection_weights(editor)
        editor.contexts = ["{}", "Once upon a time. {}"]
        result = editor.apply(REQUESTS)
        change[weight] = relative_output_change(editor, keys, before)
        gap[weight] = max(result.value_gap)
    assert change[0.0] > 0.05, change  # the leak is real ...
    assert change[100.0] < 0.5 * change[0.0], change  # ... and the weighting shrinks it
    assert gap[100.0] < 0.3, gap


def test_memory_weight_keeps_earlier_edits_in_place(tmp_path, corpus):
    """A heavier K_p term makes a later batch move the values of an earlier batch's keys less,
    while the later batch still lands."""
    moved, gap = {}, {}
    for weight in (1.0, 100.0):
        editor = make_editor(tmp_path, corpus, memory_weight=weight)
        editor.contexts = ["{}", "Once upon a time. {}"]
        first = editor.apply(REQUESTS[:2])
        second = editor.apply(REQUESTS[2:])
        moved[weight] = max(float((u @ (v.T @ first.keys[i])).norm() / (editor.adapter.weight(editor.model, i) @ first.keys[i]).norm())
                            for i, (u, v) in second.deltas.items())
        gap[weight] = max(second.value_gap)
    assert moved[100.0] < 0.5 * moved[1.0], moved
    assert gap[100.0] < 0.3, gap


def prompt_outputs(editor: Editor, requests) -> dict[int, torch.Tensor]:
    """Each edited projection's output at every token of the requests' prompts and targets."""
    rows = context_rows(editor.tokenizer, requests, ["{}"], with_targets=True)
    with capture_projection(editor.model, editor.adapter, list(editor.config.layers), outputs=True) as seen:
        LayerRunner(editor.model, editor.adapter, rows.input_ids, rows.attention_mask, start=0,
                    stop=editor.config.layers[-1])
    return {i: seen["out"][i][rows.attention_mask.bool()] for i in editor.config.layers}


def test_prompt_memory_keeps_earlier_prompts_in_place(tmp_path, corpus):
    """With the prompt memory a later batch moves what an earlier batch's prompts compute (every
    token, every edited layer) much less, and still lands; its K_p gains the prompt moments, which
    a replay of the batch with its requests rebuilds (and without them refuses, changing nothing)."""
    moved, gap = {}, {}
    for weight in (0.0, 10.0):
        editor = make_editor(tmp_path, corpus, prompt_memory_weight=weight)
        editor.contexts = ["{}", "Once upon a time. {}"]
        first = editor.apply(REQUESTS[:2])
        before = prompt_outputs(editor, REQUESTS[:2])
        memory = {i: m.clone() for i, m in editor.memory.items()}
        second = editor.apply(REQUESTS[2:])
        after = prompt_outputs(editor, REQUESTS[:2])
        moved[weight] = max(float((after[i] - before[i]).norm() / before[i].norm()) for i in before)
        gap[weight] = max(second.value_gap)
    assert moved[10.0] < 0.5 * moved[0.0], moved
    assert gap[10.0] < 0.3, gap
    last = editor.config.layers[-1]
    prompt_part = memory[last] - first.keys[last] @ first.keys[last].T
    assert float(prompt_part.norm()) > 0.1 * float(memory[last].norm())  # the prompt tokens joined K_p
    editor.restore_base()
    base = projection_weights(editor)
    with pytest.raises(ValueError, match="requests"):
        editor.replay(first.deltas, first.keys)
    assert all(torch.equal(w, base[i]) for i, w in projection_weights(editor).items())  # refused whole
    editor.replay(first.deltas, first.keys, REQUESTS[:2])
    for i, m in memory.items():
        torch.testing.assert_close(editor.memory[i], m, rtol=1e-5, atol=1e-5)


def test_protected_prompts_keep_their_outputs_and_the_edits_still_land(tmp_path, corpus):
    """Protected prompts' keys join every update: an edit moves what those prompts compute (every
    token, every edited layer) much less, still reaches its targets, and a resumed editor given
    the same prompts continues exactly as the one that made the state."""
    shaped = [EditRequest(r.prompt, s, r.target_new, record_id=s)
              for r, s in zip(REQUESTS, ["Louvre", "Marie Curie", "Serena Williams", "Peru"])]
    protect = tmp_path / "protect.txt"
    protect.write_text("\n".join(f"{r.text} {r.target_new}" for r in shaped) + "\n")
    moved, gap = {}, {}
    for files in (None, [protect]):
        editor = make_editor(tmp_path, corpus, protect=files, protect_weight=10.0)
        editor.contexts = ["{}", "Once upon a time. {}"]
        before = prompt_outputs(editor, shaped)
        result = editor.apply(REQUESTS[:2])
        after = prompt_outputs(editor, shaped)
        moved[files is None] = max(float((after[i] - before[i]).norm() / before[i].norm()) for i in before)
        gap[files is None] = max(result.value_gap)
    assert moved[False] < 0.5 * moved[True], moved
    assert gap[False] < 0.3, gap
    assert editor.protected_moments() is editor.protected_moments()  # computed once, on base weights
    state = editor.save_state(tmp_path / "state")
    second = editor.apply(REQUESTS[2:])
    model, tok = edit_model("llama")
    with pytest.raises(ValueError, match="protected prompts"):  # without them the next batch would differ
        Editor.load_state(model, tok, state, cache_dir=tmp_path / "cache", corpus=[corpus])
    resumed = Editor.load_state(model, tok, state, cache_dir=tmp_path / "cache", corpus=[corpus], protect=[protect])
    again = resumed.apply(REQUESTS[2:])
    for i in editor.config.layers:
        torch.testing.assert_close(again.deltas[i][1], second.deltas[i][1], rtol=1e-5, atol=1e-6)


def test_paragraph_starts_read_each_paragraph_from_its_beginning(tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text(" = Title = \n\n One two three four five six\n Too short\n"
                    " = = Section = = \n Seven eight nine ten eleven twelve thirteen\n"
                    " Alpha beta gamma delta epsilon zeta\n")
    assert paragraph_starts([text], 10, 5) == ["One two three four five", "Seven eight nine ten eleven",
                                                "Alpha beta gamma delta epsilon"]
    assert paragraph_starts([text], 2, 6) == ["One two three four five six", "Seven eight nine ten eleven twelve"]
    assert paragraph_starts([text], 0, 5) == []
    # From a character offset on, the next whole line first (as the statistics read it).
    assert paragraph_starts([CorpusText(text, 20)], 10, 5) == ["Seven eight nine ten eleven",
                                                               "Alpha beta gamma delta epsilon"]


def test_protect_starts_join_the_update_like_protected_prompts(tmp_path, corpus):
    """``protect_starts`` paragraph starts of the statistics corpus weigh in each update exactly as
    the same lines given as protected prompts, and they hold what such starts compute."""
    starts = paragraph_starts([corpus], 40, 6)
    assert len(starts) == 40 and all(len(s.split()) == 6 for s in starts)
    as_file = tmp_path / "starts.txt"
    as_file.write_text("\n".join(starts) + "\n")
    shaped = [EditRequest("{} is", s, " music", record_id=s) for s in (" ".join(line.split()[:3]) for line in starts[:4])]
    deltas, moved = {}, {}
    for name, kwargs in (("none", {}), ("starts", dict(protect_starts=40, protect_start_words=6)),
                         ("file", dict(protect=[as_file]))):
        # A cache each: the starts and the file are the same prompts, so one cache would serve both.
        editor = make_editor(tmp_path / name, corpus, protect_weight=10.0, **kwargs)
        editor.contexts = ["{}", "Once upon a time. {}"]
        before = prompt_outputs(editor, shaped)
        deltas[name] = editor.apply(REQUESTS[:2]).deltas
        after = prompt_outputs(editor, shaped)
        moved[name] = max(float((after[i] - before[i]).norm() / before[i].norm()) for i in before)
    for i in deltas["file"]:
        torch.testing.assert_close(deltas["starts"][i][0] @ deltas["starts"][i][1].T,
                                   deltas["file"][i][0] @ deltas["file"][i][1].T, rtol=1e-5, atol=1e-6)
    assert moved["starts"] < 0.5 * moved["none"], moved
    # On by default for AlphaEdit on gemma3 only (measured); MEMIT stays the published method;
    # settings saved before the starts existed (a state, a checkpoint's engine_settings) read as
    # without them.
    assert default_config("gemma3").protect_starts == 400 and default_config("gemma3", "memit").protect_starts == 0
    assert default_config("llama").protect_starts == 0
    saved = {k: v for k, v in default_config("gemma3").to_dict().items() if k not in ("protect_starts", "protect_start_words")}
    assert EditConfig.from_dict(saved).protect_starts == 0


def test_protected_moments_are_cached_on_disk_by_prompts(tmp_path, corpus, monkeypatch):
    """A second editor on the same base weights reads the protected keys' moments from the cache
    (no forward pass); other prompts make their own entry."""
    first = make_editor(tmp_path, corpus, protect_starts=20, protect_start_words=6)
    moments = first.protected_moments()
    monkeypatch.setattr(Editor, "_token_moments", lambda *a: pytest.fail("recomputed a cached moment"))
    again = make_editor(tmp_path, corpus, protect_starts=20, protect_start_words=6).protected_moments()
    assert again.keys() == moments.keys()
    for i, m in moments.items():
        assert torch.equal(again[i], m)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        make_editor(tmp_path, corpus, protect_starts=20, protect_start_words=5).protected_moments()


def test_protected_prompts_must_be_there_and_not_blank(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="protected prompts not found: .*missing.txt"):
        make_editor(tmp_path, corpus, protect=[tmp_path / "missing.txt"])
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="blank.txt has no prompt"):
        make_editor(tmp_path, corpus, protect=[tmp_path / "blank.txt"])


def test_spectral_cap_clips_the_last_layer_and_keeps_the_null_space(tmp_path, corpus):
    """The clip binds on the accumulated delta of the last layer only, stays inside the null
    space, and is part of the batch's factors (a replay of them rebuilds the clipped weights)."""
    free = make_editor(tmp_path, corpus, spectral_cap=None)
    free.contexts = ["{}", "Once upon a time. {}"]
    free.apply(REQUESTS[:2])
    free.apply(REQUESTS[2:])
    last = free.config.layers[-1]
    base_norm = float(torch.linalg.matrix_norm(free._base[last], 2))
    top = float(torch.linalg.matrix_norm(free.adapter.weight(free.model, last) - free._base[last], 2))

    cap = 0.5 * top / base_norm
    editor = make_editor(tmp_path, corpus, spectral_cap=cap)
    keys = preserved_keys(editor, corpus)
    before = projection_weights(editor)
    editor.contexts = free.contexts
    results = [editor.apply(REQUESTS[:2]), editor.apply(REQUESTS[2:])]
    after = projection_weights(editor)
    clipped = float(torch.linalg.matrix_norm(after[last] - before[last], 2))
    assert clipped <= cap * base_norm * (1 + 1e-4), (clipped, cap * base_norm)
    assert relative_output_change(editor, keys, before) <= 1e-4
    # Only the last layer gains columns, and only where the clip bound.
    second = results[1]
    assert second.deltas[last][0].shape[1] > second.deltas[free.config.layers[0]][0].shape[1]
    editor.restore_base()
    for result in results:
        editor.replay(result.deltas, result.keys)
    for i, w in after.items():
        torch.testing.assert_close(projection_weights(editor)[i], w, rtol=1e-5, atol=1e-6)


def test_memit_moves_preserved_outputs(tmp_path, corpus):
    editor = make_editor(tmp_path, corpus, method="memit", mom2_update_weight=1.0)
    keys = preserved_keys(editor, corpus)
    before = projection_weights(editor)
    editor.apply(REQUESTS)
    assert relative_output_change(editor, keys, before) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("wave_rows", [None, 1])
def test_batched_targets_equal_per_request_loop(family, wave_rows, monkeypatch):
    """Also when the batch is back-propagated in waves of one row (each wave's graph freed before
    the next), which must not change the optimisation."""
    model, tok = tiny_model(family, seed=1, initializer_range=0.1)
    config = default_config("x", "alphaedit", 6, **{**TINY, "v_max_steps": 12})
    contexts = ["{}", "Once upon a time. {}", "Well. {}"]
    loop = optimise_targets_loop(model, tok, _adapter(model), REQUESTS, contexts, config)
    if wave_rows is not None:
        monkeypatch.setattr(targets_module, "WAVE_ROWS", wave_rows)
    batched = optimise_targets(model, tok, _adapter(model), REQUESTS, contexts, config)
    assert batched.steps == loop.steps
    # Equal up to float32 summation order (the batch and a lone request are grouped and padded
    # differently): per request, relative to the vector's norm.
    for a, b in ((batched.shift, loop.shift), (batched.z, loop.z)):
        assert ((a - b).norm(dim=-1) / b.norm(dim=-1)).max() < 1e-5
    assert max(abs(a - b) for a, b in zip(batched.nll, loop.nll)) < 1e-4


@pytest.mark.parametrize("with_bias", [False, True])
def test_head_moments_give_the_log_softmax_losses_and_gradients(with_bias):
    """One blockwise pass over the vocabulary (blocks that do not divide it) gives what autograd
    through the full log-softmax gives: target NLLs, their gradients, and the KL term's gradient."""
    from editfleet.workers.editing.head import softmax_moments
    from editfleet.workers.editing.head import target_nll as head_nll

    gen = torch.Generator().manual_seed(0)
    vocab, d = 1000, 16
    weight = torch.randn(vocab, d, generator=gen)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    hidden = torch.randn(5, d, generator=gen, requires_grad=True)
    unedited = torch.randn(2, d, generator=gen)
    labels = torch.tensor([3, 999, 500])
    logp = torch.nn.functional.linear(hidden, weight, bias).log_softmax(-1)
    nll = -logp[:3].gather(1, labels[:, None]).squeeze(1)
    p0 = torch.nn.functional.linear(unedited, weight, bias).log_softmax(-1)
    kl = torch.nn.functional.kl_div(logp[3:], p0, log_target=True, reduction="none").sum(-1)
    (nll.sum() + 2.0 * kl.sum()).backward()

    moments = softmax_moments(hidden.detach(), weight, bias, block=300)
    loss, grad = head_nll(hidden.detach()[:3], labels, moments[:3], weight, bias)
    kl_grad = 2.0 * (moments[3:].mean - softmax_moments(unedited, weight, bias, block=300).mean)
    torch.testing.assert_close(loss, nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([grad, kl_grad]), hidden.grad, rtol=1e-5, atol=1e-6)


def test_soft_capped_head_is_refused():
    """A soft-capped head's gradient is not the softmax mean the head pass computes: refuse it
    rather than optimise the wrong loss."""
    model, tok = tiny_model("gemma3", seed=1)
    model.config.final_logit_softcapping = 30.0
    config = default_config("x", "alphaedit", 6, **TINY)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        optimise_targets(model, tok, _adapter(model), REQUESTS[:1], ["{}"], config)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bfloat16_targets_report_float32_probabilities(family):
    """Steps under bfloat16 autocast reach the targets, and the NLL reported for the shift they
    found is what the float32 model gives with that shift (not the bfloat16 estimate)."""
    model, tok = tiny_model(family, seed=1, initializer_range=0.1)
    config = default_config("x", "alphaedit", 6, **{**TINY, "v_max_steps": 12})
    contexts = ["{}"]
    adapter = _adapter(model)
    low = optimise_targets(model, tok, adapter, REQUESTS, contexts, config.replace(target_dtype="bfloat16"))
    full = optimise_targets(model, tok, adapter, REQUESTS, contexts, config)
    before = sum(target_nll(model, tok, r.text, r.target_new) for r in REQUESTS)
    assert before - sum(full.nll) > 0.1 and before - sum(low.nll) > 0.5 * (before - sum(full.nll))
    assert max(abs(a - b) for a, b in zip(low.nll, full.nll)) < 0.2  # the same optimisation, other rounding
    layer = config.layers[-1]
    for i, req in enumerate(REQUESTS):
        pos = context_rows(tok, [req], contexts).subject_pos[0]

        def shift(out, i=i, pos=pos):
            out = out.clone()
            out[0, pos] += low.shift[i]
            return out

        with add_at_projection(model, adapter, layer, shift):
            assert target_nll(model, tok, req.text, req.target_new) == pytest.approx(low.nll[i], rel=1e-4, abs=1e-5)


def test_converged_requests_freeze_while_others_continue():
    model, tok = tiny_model("llama", seed=1, initializer_range=0.1)
    contexts = ["{}"]
    config = default_config("x", "alphaedit", 6, **{**TINY, "v_max_steps": 8})
    adapter = _adapter(model)
    start = optimise_targets(model, tok, adapter, REQUESTS[:1], contexts, config.replace(v_max_steps=1)).nll[0]
    end = optimise_targets(model, tok, adapter, REQUESTS[:1], contexts, config).nll[0]
    assert end < start
    # A threshold the first request crosses half-way stops it early; the others go on, and its
    # result is what it would be alone with that threshold.
    loose = config.replace(v_loss_threshold=(start + end) / 2)
    alone = optimise_targets(model, tok, adapter, REQUESTS[:1], contexts, loose)
    mixed = optimise_targets(model, tok, adapter, REQUESTS, contexts, loose)
    assert mixed.steps[0] == alone.steps[0] < config.v_max_steps - 1
    assert max(mixed.steps[1:]) > mixed.steps[0]
    torch.testing.assert_close(mixed.shift[0], alone.shift[0], rtol=1e-4, atol=1e-5)


def test_kl_reference_is_the_distribution_the_term_keeps():
    """Given back its own KL reference, the optimisation is the same; the reference of a model
    whose "{subject} is a" continuation differs (a retarget round's edited model) changes it."""
    model, tok = tiny_model("llama", seed=1, initializer_range=0.1)
    config = default_config("x", "alphaedit", 6, **{**TINY, "v_max_steps": 8, "kl_factor": 1.0})
    adapter = _adapter(model)
    own = optimise_targets(model, tok, adapter, REQUESTS[:2], ["{}"], config)
    again = optimise_targets(model, tok, adapter, REQUESTS[:2], ["{}"], config, kl_reference=own.kl_reference)
    assert torch.equal(again.shift, own.shift)
    other = optimise_targets(model, tok, adapter, REQUESTS[:2], ["{}"], config, kl_reference=2 * own.kl_reference)
    assert not torch.allclose(other.shift, own.shift, rtol=1e-3, atol=1e-5)


def _adapter(model):
    from editfleet.workers.models.adapters import adapter_for

    return adapter_for(model)


RESUME_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from editfleet.workers.editing.engine import Editor
state, cache, corpus, out, tests = map(Path, sys.argv[1:6])
sys.path.insert(0, str(tests))
from engine_support import REQUESTS, edit_model
model, tok = edit_model("llama")
editor = Editor.load_state(model, tok, state, cache_dir=cache, corpus=[corpus])
editor.apply(REQUESTS[2:3])
torch.save({i: editor.adapter.weight(model, i).detach().clone() for i in editor.config.layers}, out)
"""


@pytest.mark.parametrize("options", [{}, {"earlier_edits": "targets"}, {"repair_limit": 1, "repair_margin": 1e9},
                                     {"repair_limit": 1, "repair_margin": 1e9, "repair_batch": "targets"},
                                     {"spectral_cap": 0.05}, {"prompt_memory_weight": 0.5},
                                     {"retarget_rounds": 1, "update_rounds": 1},
                                     {"retarget_rounds": 2, "update_rounds": 1, "retarget_prefixes": "fresh"}],
                         ids=["keys", "targets", "repair", "repair-batch-targets", "spectral-cap", "prompt-memory",
                              "retarget", "retarget-fresh"])
def test_save_load_resume_matches_one_process(tmp_path, corpus, options):
    editor = make_editor(tmp_path, corpus, **options)
    editor.apply(REQUESTS[0:1])
    editor.apply(REQUESTS[1:2])
    editor.save_state(tmp_path / "state")
    editor.apply(REQUESTS[2:3])
    one_process = projection_weights(editor)
    if "spectral_cap" in options:  # the clip bound, so the resumed run must reproduce it
        u_last, u_first = editor.history[-1].deltas[editor.config.layers[-1]][0], editor.history[-1].deltas[editor.config.layers[0]][0]
        assert u_last.shape[1] > u_first.shape[1]

    out = tmp_path / "resumed.pt"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "state"), str(tmp_path / "cache"),
                    str(corpus), str(out), str(Path(__file__).parent)], check=True)
    resumed = torch.load(out)
    for i, w in one_process.items():
        assert torch.equal(resumed[i], w) or torch.allclose(resumed[i], w, rtol=1e-6, atol=0), i
    meta = json.loads((tmp_path / "state" / "state.json").read_text())
    assert meta["batches"] == 2 and meta["config"]["layers"] == list(editor.config.layers)


def test_retarget_rounds_solve_for_targets_found_on_the_edited_model(tmp_path, corpus):
    """With one update pass Gemma 3's values stop short of their targets; a retarget round
    optimises the targets again from the edited model and the update lands those (the stored
    ``z``), with one more set of factor columns. A model that already holds every target after
    the first update (a loose stop) ends the loop: the weights are those without the round."""
    first = make_editor(tmp_path, corpus, "gemma3", update_rounds=1)
    z_first = first.apply(REQUESTS[:3]).z
    editor = make_editor(tmp_path, corpus, "gemma3", update_rounds=1, retarget_rounds=1)
    result = editor.apply(REQUESTS[:3])
    assert torch.equal(editor.history[-1].z, result.z)
    moved = (result.z - z_first).norm(dim=-1) / z_first.norm(dim=-1)
    assert float(moved.min()) > 1e-3, moved
    assert all(s > 30 for s in result.target_steps), result.target_steps  # both rounds optimised
    for i in editor.config.layers:
        assert editor.history[-1].deltas[i][0].shape[1] == 2 * first.history[-1].deltas[i][0].shape[1]
    # The stored targets are where the edited model now is, within the one pass's gap.
    gap = (value_at_subject(editor, REQUESTS[:3]) - result.z).norm(dim=-1)
    assert float((gap / (value_at_subject(first, REQUESTS[:3]) - result.z).norm(dim=-1)).max()) < 0.5, gap

    weights = {}
    for rounds in (0, 2):  # the tiny model's target NLL starts near 6.1 and falls below 6.0 within a few steps
        held = make_editor(tmp_path, corpus, v_loss_threshold=6.0, retarget_rounds=rounds)
        steps = held.apply(REQUESTS[:3]).target_steps
        assert any(steps), steps
        weights[rounds] = projection_weights(held)
    for i, w in weights[0].items():
        assert torch.equal(weights[2][i], w), i


def test_retarget_clamp_bounds_the_rounds_shift(tmp_path, corpus):
    """The round's shift is clamped by ``retarget_clamp_norm_factor``: near zero, the round asks
    for the values the first update left (its new targets are where the edited model is), while
    the default clamp asks for more."""
    first = make_editor(tmp_path, corpus, "gemma3", update_rounds=1)
    first.apply(REQUESTS[:3])
    left = value_at_subject(first, REQUESTS[:3])
    moved = {}
    for clamp in (None, 1e-6):
        editor = make_editor(tmp_path, corpus, "gemma3", update_rounds=1, retarget_rounds=1,
                             retarget_clamp_norm_factor=clamp)
        z = editor.apply(REQUESTS[:3]).z
        moved[clamp] = float(((z - left).norm(dim=-1) / left.norm(dim=-1)).max())
    assert moved[1e-6] < 1e-4 < moved[None], moved


def test_fresh_retarget_prefixes_leave_the_first_optimisation_alone(tmp_path, corpus):
    """``retarget_prefixes="fresh"`` gives the round as many prefixes again, drawn after the first
    ones: the first optimisation's prefixes are those of ``same``, the round's differ from them,
    and the round's targets move with them."""
    editors, z = {}, {}
    for mode in ("same", "fresh"):
        editors[mode] = make_editor(tmp_path, corpus, "gemma3", update_rounds=1, retarget_rounds=1,
                                    retarget_prefixes=mode)
        z[mode] = editors[mode].apply(REQUESTS[:3]).z
    same, fresh = editors["same"], editors["fresh"]
    assert same.round_contexts is None
    assert fresh.contexts == same.contexts and len(fresh.round_contexts) == len(same.contexts) == 3
    assert fresh.round_contexts[0] == "{}" and not set(fresh.round_contexts[1:]) & set(same.contexts)
    assert float((z["fresh"] - z["same"]).norm(dim=-1).min()) > 1e-4


def test_each_fresh_retarget_round_draws_its_own_prefixes(tmp_path, corpus):
    """With two rounds each gets its own block of prefixes; the first round's are those a single
    round draws (one generator, drawn in turn), and the second's are new."""
    one = make_editor(tmp_path, corpus, "gemma3", retarget_rounds=1, retarget_prefixes="fresh")
    two = make_editor(tmp_path, corpus, "gemma3", retarget_rounds=2, retarget_prefixes="fresh")
    one.context_templates(), two.context_templates()
    assert two.contexts == one.contexts
    assert two._round_prefixes(0) == one._round_prefixes(0) == one.round_contexts
    second = two._round_prefixes(1)
    assert len(second) == len(one.contexts) and second[0] == "{}"
    assert not set(second[1:]) & set(one.contexts + one.round_contexts)


def test_earlier_edits_by_target_are_pulled_back_where_keys_let_them_drift(tmp_path, corpus):
    """A second batch moves the first batch's subject keys (its lower layers changed); K_p holds
    the keys as stored, so the first edits drift from their target values; with
    ``earlier_edits="targets"`` they rejoin the update and stay on target."""
    drift = {}
    for mode in ("keys", "targets"):
        editor = make_editor(tmp_path, corpus, earlier_edits=mode)
        first = editor.apply(REQUESTS[0:2])
        on_target = (value_at_subject(editor, REQUESTS[0:2]) - first.z).norm(dim=-1)
        editor.apply(REQUESTS[2:4])
        drift[mode] = (value_at_subject(editor, REQUESTS[0:2]) - first.z).norm(dim=-1)
        assert float(on_target.max()) < 0.01 * float(first.z.norm(dim=-1).min()), on_target
        memory = sum(float(m.abs().sum()) for m in editor.memory.values())
        assert (memory == 0) == (mode == "targets")  # rejoining batches stay out of K_p
    assert float(drift["targets"].max()) < 0.1 * float(drift["keys"].min()), drift


def test_repair_solves_the_least_sure_earlier_edits_back_to_their_targets(tmp_path, corpus):
    """``repair_limit`` 1 puts back on its target the one earlier request the model holds least
    surely once a batch is applied; 3 puts back all three; ``repair_margin`` 0 only those whose
    true answer now leads (on this tiny model some, not all: its edits lead by tenths of a nat);
    a margin every request is inside changes nothing in the choice. ``repair_batch="targets"``
    solves the batch's own request again beside them instead of holding its keys, so it ends on
    its target too. MEMIT keeps no K_p to repair against, and the setting is unused there."""
    runs = {"keys": {}, "1": dict(repair_limit=1), "1, any margin": dict(repair_limit=1, repair_margin=1e9),
            "3": dict(repair_limit=3, repair_margin=1e9), "3, margin 0": dict(repair_limit=3, repair_margin=0.0),
            "3, own by target": dict(repair_limit=3, repair_margin=1e9, repair_batch="targets")}
    weights, on_target, own_gap = {}, {}, {}
    for name, options in runs.items():
        editor = make_editor(tmp_path, corpus, **options)
        z = torch.cat([editor.apply(REQUESTS[0:2]).z, editor.apply(REQUESTS[2:3]).z])
        z_own = editor.apply(REQUESTS[3:4]).z
        gap = (value_at_subject(editor, REQUESTS[0:3]) - z).norm(dim=-1) / z.norm(dim=-1)
        on_target[name] = int((gap < 1e-3).sum())
        own_gap[name] = float((value_at_subject(editor, REQUESTS[3:4]) - z_own).norm() / z_own.norm())
        weights[name] = projection_weights(editor)
    assert on_target == {"keys": 0, "1": 1, "1, any margin": 1, "3": 3, "3, margin 0": on_target["3, margin 0"],
                         "3, own by target": 3}
    assert 1 <= on_target["3, margin 0"] < 3, on_target
    assert own_gap["3, own by target"] < 1e-3, own_gap
    for i, w in weights["keys"].items():
        assert not torch.allclose(weights["1"][i], w, rtol=1e-4, atol=1e-5), i
        assert torch.equal(weights["1, any margin"][i], weights["1"][i]), i
        assert not torch.allclose(weights["3, own by target"][i], weights["3"][i], rtol=1e-4, atol=1e-5), i
    assert not make_editor(tmp_path, corpus, method="memit", repair_limit=1).repairs


def test_replay_and_restore_base(tmp_path, corpus):
    editor = make_editor(tmp_path, corpus)
    base = projection_weights(editor)
    result = editor.apply(REQUESTS[:2])
    edited = projection_weights(editor)
    memory = {i: m.clone() for i, m in editor.memory.items()}
    editor.restore_base()
    assert all(torch.equal(w, base[i]) for i, w in projection_weights(editor).items())
    assert all(float(m.abs().sum()) == 0 for m in editor.memory.values())
    editor.replay(result.deltas, result.keys)
    assert all(torch.equal(w, edited[i]) for i, w in projection_weights(editor).items())
    assert all(torch.equal(editor.memory[i], memory[i]) for i in memory)


BAD_RECORDS = [
    ({"prompt": "", "subject": "X", "target_new": "Y"}, "prompt", "empty"),
    ({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "target_true": "Rome"}, "target_new", "equals"),
    ({"prompt": "The tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}, "subject", "does not occur"),
    ({"prompt": "{} is in", "subject": "Paris"}, "target_new", "missing"),
    ({"subject": "Aaron", "src": "What is Aaron's job?", "rephrase": "Aaron's job?", "alt": "", "answers": ["baker"],
      "loc": "q", "loc_ans": "a", "case_id": 534}, "target_new", "empty"),
    ({"prompt": "{} is " + "very " * 60 + "far", "subject": "Paris", "target_new": "Rome"}, "prompt", "context"),
]


@pytest.mark.parametrize("record,field,why", BAD_RECORDS)
def test_bad_input_is_refused_before_any_change(tmp_path, corpus, record, field, why):
    editor = make_editor(tmp_path, corpus)
    before = projection_weights(editor)
    good = {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome"}
    with pytest.raises(EditValidationError) as err:
        editor.apply([good, record])
    v = err.value.violations
    assert [x.index for x in v] == [1] and v[0].field == field and why in v[0].description, v
    assert all(torch.equal(w, before[i]) for i, w in projection_weights(editor).items())
    assert not editor.history


def test_failure_mid_update_restores_weights(tmp_path, corpus):
    editor = make_editor(tmp_path, corpus)
    before = projection_weights(editor)

    def fail_at_second_layer(stage, current, total):
        if stage == "layer" and current == 2:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        editor.apply(REQUESTS, progress=fail_at_second_layer)
    assert all(torch.equal(w, before[i]) for i, w in projection_weights(editor).items())
    assert not editor.history and all(float(m.abs().sum()) == 0 for m in editor.memory.values())


def test_statistics_are_cached_and_reused(tmp_path, corpus):
    stages = []
    first = make_editor(tmp_path, corpus)
    first.projectors(lambda s, c, t: stages.append(s))
    assert "statistics" in stages
    stages.clear()
    second = make_editor(tmp_path, corpus)
    projectors = second.projectors(lambda s, c, t: stages.append(s))
    assert stages == []
    assert all(torch.equal(projectors[i], first.projectors()[i]) for i in projectors)
    # Another corpus is another key: recomputed, not reused.
    other = write_corpus(tmp_path / "other.txt", seed=1)
    third = make_editor(tmp_path, other)
    third.projectors(lambda s, c, t: stages.append(s))
    assert "statistics" in stages


def test_output_change_is_nil_on_the_statistics_keys_and_not_on_other_text(tmp_path, corpus):
    """What the bench reports as ``output_change``: after an AlphaEdit batch the projection's
    output on the statistics' keys is unchanged (the null-space promise), on text the statistics
    never saw it is not; the other text's keys come from the base weights, edits or not."""
    editor = make_editor(tmp_path, corpus)
    other_text = " ".join(str(n) for n in range(400))
    other = editor.text_moments(other_text)
    stats = editor.statistics()
    assert all(v == 0 for v in editor.output_change(stats).values())
    editor.apply(REQUESTS[:2])
    sample, moved = editor.output_change(stats), editor.output_change(other)
    for i in editor.config.layers:
        base = editor._base[i].to(torch.float64)
        energy = float(torch.trace(base @ stats[i].moment.to(base) @ base.T))
        assert sample[i] <= 1e-6 * energy
        assert moved[i] > 1e-2 * energy
    again = editor.text_moments(other_text)
    assert all(torch.allclose(again[i].moment, other[i].moment, rtol=1e-5, atol=1e-7) for i in other)
    with pytest.raises(ValueError, match="no full sequence"):
        editor.text_moments("too short")


def test_weights_digest_follows_in_place_changes():
    """The remembered per-tensor digests must not outlive a change of the weights."""
    model, _ = tiny_model("llama", seed=0)
    adapter = _adapter(model)
    digest = lambda: params_digest(model, adapter, 1, {})  # noqa: E731
    first = digest()
    assert digest() == first
    below, above = model.model.layers[0].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight
    saved = below.detach().clone()
    with torch.no_grad():
        above.add_(1.0)  # above the layers the keys depend on: same digest
        assert digest() == first
        below.add_(1.0)
        changed = digest()
        assert changed != first
        below.copy_(saved)
    assert digest() == first
    below.data = below.data * 2  # a swapped storage, as sharding libraries do
    assert digest() not in (first, changed)


def test_statistics_ignore_edits_made_before_they_are_computed(tmp_path, corpus):
    editor = make_editor(tmp_path / "a", corpus, method="memit", mom2_update_weight=1.0)
    editor.apply(REQUESTS[:1])
    fresh = make_editor(tmp_path / "b", corpus)
    edited_stats = editor.statistics()
    base_stats = fresh.statistics()
    assert all(torch.allclose(edited_stats[i].moment, base_stats[i].moment) for i in base_stats)


def test_context_rows_locate_the_subject():
    _, tok = tiny_model("gemma3")
    rows = context_rows(tok, [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")], ["{}", "Hi. {}"])
    for r in range(2):
        ids = rows.input_ids[r, : int(rows.subject_pos[r]) + 1].tolist()
        assert tok.decode(ids, skip_special_tokens=True).endswith("Danielle Darrieux")


def test_length_groups_cut_padding_but_keep_small_batches_whole():
    lengths = torch.tensor([5, 20, 6, 12, 13, 21, 5, 19] * 50)
    padded = lambda groups: sum(len(g) * int(lengths[g].max()) for g in groups)
    groups = length_groups(lengths, 4, group_cost=256)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))  # every row once
    assert 1 < len(groups) <= 4
    assert [int(lengths[g].max()) for g in groups] == sorted(int(lengths[g].max()) for g in groups)
    assert padded(groups) < 0.8 * padded([torch.arange(len(lengths))])
    # One request's rows (three contexts and the short KL prompt) save less than a group costs.
    assert len(length_groups(torch.tensor([15, 17, 16, 6]), 4, group_cost=256)) == 1
