"""Evaluation protocol: data loading, batched scoring, fluency, metrics, perplexity (tiny models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from editfleet.workers.editing.requests import EditRequest
from editfleet.workers.evaluation.drift import drift, snapshot, subject_prompts
from editfleet.workers.evaluation.data import DATA_DIR_ENV, EvalCase, data_dir, load_counterfact, load_zsre
from editfleet.workers.evaluation.fluency import fluency, greedy_generate, ngram_entropy, word_tokenize
from editfleet.workers.evaluation.metrics import evaluate_counterfact, evaluate_zsre, perplexity
from editfleet.workers.models.scoring import encode_prompts, encode_targets, score_targets
from editfleet.workers.models.tiny import BOS_ID, FAMILIES, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are all small ops: a second OpenMP thread only adds wake-up latency (GPT-2's
    layer norms ran 40x slower with two threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_data() -> Path:
    try:
        return data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"evaluation data not available: {exc}")


# Prompts longer than the tiny gemma3's sliding window (16 tokens) and of mixed lengths, targets of
# 1 to 12 tokens: padding, the shared prompt cache and the sliding window all get exercised.
PAIRS = [
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", "English language"),
    ("Hi", "there"),
    ("x", " q"),
    ("Toko Yasuda, the", "guitar"),
    ("Where Danielle Darrieux is from, people speak the language of", "E"),
    ("Michel Rocard is a native speaker of", "French and also Occitan"),
]


def _reference_score(model, tok, prompt: str, target: str) -> tuple[float, list[bool]]:
    """Mean target NLL and per-token argmax hits from one unpadded full-logits forward pass."""
    p_ids, t_ids = encode_prompts(tok, [prompt])[0], encode_targets(tok, [target])[0]
    with torch.no_grad():
        logp = model(torch.tensor([p_ids + t_ids])).logits[0].log_softmax(-1)
    rows = [len(p_ids) - 1 + k for k in range(len(t_ids))]
    nll = -sum(logp[r, t].item() for r, t in zip(rows, t_ids)) / len(t_ids)
    return nll, [logp[r].argmax().item() == t for r, t in zip(rows, t_ids)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_unbatched_full_logits(family):
    model, tok = tiny_model(family, seed=3)
    grouped = score_targets(model, tok, [p for p, _ in PAIRS], [[t, "Paris"] for _, t in PAIRS], batch_size=3)
    for (prompt, target), (score, _) in zip(PAIRS, grouped):
        nll, hits = _reference_score(model, tok, prompt, target)
        assert score.nll == pytest.approx(nll, abs=1e-5), (prompt, target)
        assert score.n_tokens == len(hits)
        assert score.top1 == all(hits)
        assert score.token_accuracy == pytest.approx(sum(hits) / len(hits))


SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "x", "Michel Rocard and the Socialist Party of France"]


def _full_kl(before: list[torch.Tensor], model, tok, prompts: list[str]) -> list[float]:
    out = []
    for p0, prompt in zip(before, prompts):
        ids = torch.tensor([encode_prompts(tok, [prompt])[0]])
        with torch.no_grad():
            now = model(ids).logits[0, -1].log_softmax(-1)
        out.append(float((p0.exp() * (p0 - now)).sum()))
    return out


# Perturbations that flip some of the tiny models' nearly flat argmaxes, not all.
@pytest.mark.parametrize("family, size", [("llama", 0.01), ("gemma3", 0.003)])
def test_subject_drift_is_zero_unchanged_and_the_kl_of_the_coarsened_distributions_after_a_change(family, size):
    model, tok = tiny_model(family, seed=2)
    prompts = subject_prompts(SUBJECTS)
    before_full = []
    for prompt in prompts:
        with torch.no_grad():
            before_full.append(model(torch.tensor([encode_prompts(tok, [prompt])[0]])).logits[0, -1].log_softmax(-1))
    whole, coarse = snapshot(model, tok, SUBJECTS), snapshot(model, tok, SUBJECTS, top=5)
    assert drift(model, tok, whole) == {"kl": pytest.approx(0, abs=1e-6), "top1_kept": 1.0}
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.add_(size * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    full = _full_kl(before_full, model, tok, prompts)
    # Every token kept (the tiny vocabulary is below TOP): the full KL; batched as one prompt at a time.
    # (abs: float32 noise of the padded batch, the unchanged model's bound above.)
    assert drift(model, tok, whole, batch_size=3)["kl"] == pytest.approx(sum(full) / len(full), rel=1e-3, abs=1e-6)
    # Five tokens and the rest merged: a lower bound, and above zero.
    assert 0 < drift(model, tok, coarse)["kl"] < sum(full) / len(full)
    kept = [int(b.argmax()) == int(model(torch.tensor([encode_prompts(tok, [p])[0]])).logits[0, -1].argmax())
            for b, p in zip(before_full, prompts)]
    assert 0 < sum(kept) < len(kept)
    assert drift(model, tok, coarse)["top1_kept"] == pytest.approx(sum(kept) / len(kept))


def test_padding_and_batching_do_not_change_scores():
    model, tok = tiny_model("gemma3", seed=1)
    prompts, targets = [p for p, _ in PAIRS], [[t] for _, t in PAIRS]
    alone = [score_targets(model, tok, [p], [t], batch_size=1)[0][0] for p, t in zip(prompts, targets)]
    together = [s[0] for s in score_targets(model, tok, prompts, targets, batch_size=len(PAIRS))]
    for a, b in zip(alone, together):
        assert b.nll == pytest.approx(a.nll, abs=1e-5)
        assert (a.top1, a.token_accuracy) == (b.top1, b.token_accuracy)
    twice = [score_targets(model, tok, prompts, targets, batch_size=2) for _ in range(2)]
    assert twice[0] == twice[1]


def test_bos_is_kept_for_prompts_and_targets_follow_a_space():
    _, tok = tiny_model("gemma3")  # its tokenizer adds BOS, as Gemma's does
    assert encode_prompts(tok, ["ab"]) == [[BOS_ID, ord("a"), ord("b")]]
    assert encode_targets(tok, ["ab", " cd"]) == [[ord(" "), ord("a"), ord("b")], [ord(" "), ord("c"), ord("d")]]
    _, plain = tiny_model("llama")
    assert encode_prompts(plain, ["ab"]) == [[ord("a"), ord("b")]]


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_greedy_generation_equals_unbatched_argmax_loop(family):
    model, tok = tiny_model(family, seed=2)
    prompts = [p for p, _ in PAIRS[2:6]]
    texts = greedy_generate(model, tok, prompts, new_tokens=20, batch_size=3)
    for prompt, text in zip(prompts, texts):
        ids = encode_prompts(tok, [prompt])[0]
        for _ in range(20):
            with torch.no_grad():
                ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_ngram_entropy_hand_computed():
    # "a b a b a": bigrams ab, ba, ab, ba -> H2 = 1 bit; trigrams aba, bab, aba -> H3 = H(2/3, 1/3).
    h3 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b a") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2, abs=1e-12)
    assert ngram_entropy("one") == 0.0  # no bigram: contributes nothing, as in the reference
    assert fluency(["a b a b a", "one"]) == pytest.approx(ngram_entropy("a b a b a") / 2)


def test_repetitive_text_is_less_fluent_than_varied_text():
    repetitive = "Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris Paris"
    varied = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    assert fluency([repetitive]) < 0.5 < fluency([varied])


def test_word_tokenize_follows_treebank_conventions():
    assert word_tokenize("Don't stop the U.S. army's 1,000.5 well-known dogs... (it's) fine.") == [
        "Do", "n't", "stop", "the", "U.S.", "army", "'s", "1,000.5", "well-known", "dogs", "...",
        "(", "it", "'s", ")", "fine", ".",
    ]


def test_data_dir_resolution(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_dir(tmp_path / "missing")
    assert data_dir(tmp_path) == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        data_dir()


def test_counterfact_loader_reads_all_edit_cases():
    loaded = load_counterfact(_shared_data() / "counterfact" / "counterfact-edit.json")
    assert len(loaded.cases) == 10_000 and loaded.rejected == []
    first = loaded.cases[0]
    assert first.kind == "counterfact" and first.case_id == 0
    assert first.rewrite_prompts == ("The mother tongue of Danielle Darrieux is",)
    assert first.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert first.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert (first.target_new, first.target_true, first.neighborhood_answer) == ("English", "French", "French")
    assert first.request.prompt == "The mother tongue of {} is" and first.request.subject == "Danielle Darrieux"
    window = load_counterfact(_shared_data() / "counterfact" / "counterfact-edit.json", limit=3, offset=5000)
    assert [c.case_id for c in window.cases] == [c.case_id for c in loaded.cases[5000:5003]]


def test_zsre_loader_reports_empty_targets():
    loaded = load_zsre(_shared_data() / "zsre" / "zsre_mend_train-1k.json")
    rejected = dict(loaded.rejected)
    for case_id in (534, 723):
        assert [(v.field, v.description) for v in rejected[case_id]] == [("target_new", "is empty")]
    assert len(loaded.cases) + len(loaded.rejected) == 1000
    assert "skipped" in loaded.rejection_summary() and "534" in loaded.rejection_summary()
    # The first 500 valid cases: only the refusals met on the way to them (zsRE ids are positions).
    head = loaded.head(500)
    last = head.cases[-1].case_id
    assert head.cases == loaded.cases[:500]
    assert [cid for cid, _ in head.rejected] == [cid for cid, _ in loaded.rejected if cid < last]
    assert 0 < len(head.rejected) < len(loaded.rejected) and last + 1 == 500 + len(head.rejected)
    first = loaded.cases[0]
    assert (first.kind, first.case_id, first.target_new, first.neighborhood_answer) == (
        "zsre", 0, "unmanned aircraft", "Walter Sobchak")
    assert first.rewrite_prompts == ("What is the product made by UniFirst?",)
    assert first.neighborhood_prompts == ("nq question: john goodman's character in the big lebowski?",)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words as tokens ("w0".."w258"), as real BPE tokenizers give " Paris" one token."""
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(259)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def _case(prompt: str, target_new: str, target_true: str, neighbour: str, answer: str) -> EvalCase:
    request = EditRequest(prompt="{} " + prompt.split(" ", 1)[1], subject=prompt.split(" ", 1)[0],
                          target_new=target_new, target_true=target_true)
    return EvalCase(request=request, rewrite_prompts=(prompt,), paraphrase_prompts=(prompt,),
                    neighborhood_prompts=(neighbour,), target_new=target_new, target_true=target_true,
                    neighborhood_answer=answer, case_id=0, kind="counterfact")


def test_counterfact_metrics_on_cases_built_from_greedy_answers():
    model, _ = tiny_model("llama", seed=5)
    tok = _word_tokenizer()
    prompt, neighbour = "w5 w17 w42", "w8 w9 w100"
    greedy, neighbour_greedy = (
        t.split()[-1] for t in greedy_generate(model, tok, [prompt, neighbour], new_tokens=1))
    other = next(f"w{i}" for i in range(1, 259) if f"w{i}" not in (greedy, neighbour_greedy))
    known = evaluate_counterfact(model, tok, [_case(prompt, greedy, other, neighbour, neighbour_greedy)],
                                 fluency_cases=1, gen_tokens=6)
    for key in ("efficacy", "generalization", "specificity", "efficacy_top1", "generalization_top1", "specificity_top1"):
        assert known[key] == 1.0, key
    assert known["n_cases"] == 1 and 0.0 <= known["fluency"] < 10.0
    unknown = evaluate_counterfact(model, tok, [_case(prompt, other, greedy, neighbour, other)], fluency_cases=0)
    assert unknown["efficacy"] == unknown["efficacy_top1"] == unknown["specificity_top1"] == 0.0
    assert unknown["fluency"] is None


def test_metrics_on_real_cases_are_fractions():
    model, tok = tiny_model("gemma3", seed=0)
    cf = load_counterfact(_shared_data() / "counterfact" / "counterfact-edit.json", limit=12).cases
    result = evaluate_counterfact(model, tok, cf, batch_size=5, fluency_cases=3, gen_tokens=8)
    assert result["n_cases"] == 12
    for key in ("efficacy", "generalization", "specificity", "efficacy_top1", "generalization_top1", "specificity_top1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["fluency"] > 0.0
    zsre = load_zsre(_shared_data() / "zsre" / "zsre_mend_train-1k.json", limit=10).cases
    z = evaluate_zsre(model, tok, zsre, batch_size=4)
    assert z["n_cases"] == len(zsre) and all(0.0 <= z[k] <= 1.0 for k in ("efficacy", "generalization", "specificity"))


def test_figures_by_group_equal_each_group_scored_alone():
    model, tok = tiny_model("llama", seed=2)
    data = _shared_data()
    main = ("efficacy", "generalization", "specificity")
    for evaluate, cases, extra in (
            (evaluate_counterfact, load_counterfact(data / "counterfact" / "counterfact-edit.json", limit=12).cases,
             {"fluency_cases": 0}),
            (evaluate_zsre, load_zsre(data / "zsre" / "zsre_mend_train-1k.json", limit=12).cases, {})):
        whole = evaluate(model, tok, cases, batch_size=7, group=5, **extra)
        assert len(whole["by_group"]) == 3  # 5 + 5 + 2 cases
        for g, at in enumerate(range(0, len(cases), 5)):
            alone = evaluate(model, tok, cases[at:at + 5], batch_size=7, **extra)
            assert "by_group" not in alone
            assert {k: whole["by_group"][g][k] for k in main} == pytest.approx({k: alone[k] for k in main}, abs=1e-6)


def test_perplexity_is_deterministic_and_matches_full_logits():
    model, tok = tiny_model("gemma3", seed=4)
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. " * 3
    result = perplexity(model, tok, text, max_tokens=100, window=40)
    assert result == perplexity(model, tok, text, max_tokens=100, window=40)
    assert perplexity(model, tok, text, max_tokens=100, window=40, head_chunk=7)["nll"] == pytest.approx(result["nll"], abs=1e-6)
    ids = tok(text, add_special_tokens=False)["input_ids"][:100]
    nll, count = 0.0, 0
    for start in range(0, 100, 40):
        window = [BOS_ID] + ids[start:start + 40]
        with torch.no_grad():
            logp = model(torch.tensor([window])).logits[0].log_softmax(-1)
        nll -= sum(logp[i, window[i + 1]].item() for i in range(len(window) - 1))
        count += len(window) - 1
    assert result["tokens"] == count == 100
    assert result["nll"] == pytest.approx(nll / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_reads_wikitext_by_default():
    _shared_data()
    model, tok = tiny_model("llama", seed=0)
    first = perplexity(model, tok, max_tokens=64, window=32)
    assert first == perplexity(model, tok, max_tokens=64, window=32)
    assert first["tokens"] == 62  # no BOS: each window's first token is context only
    assert 1.0 < first["perplexity"] < 10_000


def test_default_statistics_corpus_never_reads_the_perplexity_text(tmp_path, monkeypatch):
    """The projector must not protect the text that measures general ability: the default corpus
    starts wiki.test.raw past the head the perplexity is read from."""
    from editfleet.workers.editing.engine import default_corpus
    from editfleet.workers.editing.statistics import file_digest, token_sequences
    from editfleet.workers.evaluation.metrics import PERPLEXITY_CHARS

    root = tmp_path / "wikitext-2-raw"
    root.mkdir()
    (root / "wiki.valid.raw").write_text("valid words here .\n" * 200)
    head = "alpha beta gamma .\n" * (PERPLEXITY_CHARS // 19 + 1)
    (root / "wiki.test.raw").write_text(head + "omega tail line .\n" * 300)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    corpus = default_corpus()
    text = "".join(tok.decode(seq) for seq in token_sequences(tok, corpus, 32, 10**9))
    assert "valid words" in text and "omega tail" in text
    assert "alpha" not in text and "gamma" not in text
    assert perplexity(model, tok, max_tokens=64, window=32)["tokens"] == 62
    with pytest.raises(ValueError, match="held-out perplexity text"):
        perplexity(model, tok, max_tokens=PERPLEXITY_CHARS + 100, window=512)
    # max_tokens=None: all of the held-out head (in windows of the tiny model's 256 positions,
    # each window's first token context only), and nothing past it.
    n = len(tok(head[:PERPLEXITY_CHARS], add_special_tokens=False)["input_ids"])
    assert perplexity(model, tok, max_tokens=None)["tokens"] == n - math.ceil(n / 256)
    # The offset is part of the statistics' cache key; a whole file keeps its old digest.
    assert file_digest(corpus) != file_digest([t.path for t in corpus])
    assert file_digest([root / "wiki.valid.raw"]) == file_digest(corpus[:1])


def _counterfact_file(path: Path) -> Path:
    records = [
        {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English", "ground_truth": "French",
         "rephrase_prompt": "Danielle Darrieux grew up speaking", "locality_prompt": "Michel Rocard is a native speaker of",
         "locality_ground_truth": "French"},
        {"case_id": 8, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
         "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is known for the",
         "locality_prompt": "Jimi  Hendrix plays the", "locality_ground_truth": "guitar"},
        {"case_id": 9, "prompt": "Paris is the capital of", "subject": "Berlin", "target_new": "Spain",
         "ground_truth": "France", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"},
    ]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_protect_prompts_command_writes_true_answers_of_the_chosen_records(tmp_path, capsys):
    from editfleet.client.cli import main
    from editfleet.workers.editing.requests import read_protected_prompts

    data = _counterfact_file(tmp_path / "cf.json")
    out = tmp_path / "protect.txt"
    assert main(["protect-prompts", "--dataset", "counterfact", "--data", str(data), "--records", "1:3",
                 "--kinds", "rewrite,neighbour", "--out", str(out)]) == 0
    # Record 2's subject is not in its prompt: refused like an edit, and said so.
    assert read_protected_prompts([out]) == ["Toko Yasuda plays the guitar", "Jimi Hendrix plays the guitar"]
    assert "wrote 2 prompts from 1 records" in capsys.readouterr().out
    assert main(["protect-prompts", "--dataset", "counterfact", "--data", str(data), "--records", "0:1",
                 "--kinds", "paraphrase", "--out", str(out)]) == 0
    assert read_protected_prompts([out]) == ["Danielle Darrieux grew up speaking French"]


@pytest.mark.parametrize("args, message", [
    (["--records", "2:1"], "0 <= START < END"),
    (["--records", "two"], "expected START:END"),
    (["--records", "0:2", "--kinds", "rewrite,answers"], "--kinds"),
    (["--records", "2:3"], "gave no prompt"),
    (["--records", "0:1", "--data", "missing.json"], "--data: "),
])
def test_protect_prompts_command_refuses_bad_arguments_and_writes_nothing(tmp_path, capsys, args, message):
    from editfleet.client.cli import main

    data = _counterfact_file(tmp_path / "cf.json")
    out = tmp_path / "protect.txt"
    with pytest.raises(SystemExit) as exc:  # a second --data (the missing file's case) wins
        main(["protect-prompts", "--dataset", "counterfact", "--data", str(data), "--out", str(out), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err and not out.exists()
