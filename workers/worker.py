"""What a worker does for one model: edit, materialise, query, export.

A worker loads its model once and keeps it warm. Any checkpoint is materialised as the base
weights (kept by the engine's editors) plus the replayed chain of stored deltas, with the
sequential editing memory K_p rebuilt from the chain's stored keys, so editing continues from
any checkpoint exactly as if it had never stopped. The worker writes the checkpoints it makes;
the scheduler decides heads and ordering. How calls reach a worker is ``executor.py``'s job.

``run_edit`` is a generator of events (dicts with ``kind``): ``progress`` events while it
works, then exactly one ``result``, ``rejected`` (the engine refused the edits: field
violations, nothing changed) or ``over_limit`` (the result broke the job's perplexity limit:
nothing stored). Events are plain data so they cross process boundaries as is. Every result's
scores include the perplexity of the held-out text against the unedited model's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from editfleet.workers.editing import ENGINE_VERSION
from editfleet.workers.editing.config import EditConfig, default_config
from editfleet.workers.editing.engine import BatchResult, Editor
from editfleet.workers.editing.requests import EditRequest, EditValidationError, parse_requests, prompts_digest, read_protected_prompts
from editfleet.workers.editing.targets import resolve_target_dtype
from editfleet.workers.evaluation.metrics import perplexity
from editfleet.workers.models.adapters import adapter_for
from editfleet.workers.models.forward import context_length, head_logits, model_device
from editfleet.workers.models.registry import editfleet_home, load_model
from editfleet.workers.models.scoring import TargetScore, encode_prompts, pad_id, run_prompts, score_targets
from editfleet.workers.store import BASE, CheckpointRecord, CheckpointStore, checkpoint_id

EXPORT_INFO = "editfleet-checkpoint.json"
MAX_EDITORS = 4


def request_identity(request: EditRequest) -> dict[str, Any]:
    """The fields of an edit that decide what it computes (its caller's record id does not)."""
    d = dataclasses.asdict(request)
    d.pop("record_id")
    return d


class EditWorker:
    """One model, loaded once, edited and queried on demand.

    Args:
        model: built-in model name or local Hugging Face folder to load.
        store_dir: the checkpoint store root (shared with the scheduler).
        home: editfleet data folder (model conversions, statistics cache); default as registry.
        corpus: text files for preserved-knowledge statistics (default: WikiText-2).
        protect: text files of protected prompts, one per line, kept in every update (see
            ``Editor``); their digest joins the checkpoint ids this worker computes.
        engine_overrides: engine settings applied to every job before the job's own options.
        name: the model's name in the catalog (default: ``model``).
        threads: torch threads (default: every CPU this process may use; Ray would otherwise
            leave an actor with OMP_NUM_THREADS=1).
        device: where the model is held and edited: ``cpu`` (default), ``cuda``, ``cuda:N`` or
            ``auto``. Checkpoint files are always written from (and read onto) the CPU.
        perplexity_text: text file whose perplexity every checkpoint reports as its general
            ability (default: the head of WikiText-2's test file, which the default statistics
            corpus leaves out; the bench measures the same).
    """

    def __init__(self, model: str, store_dir: str | os.PathLike[str], home: str | os.PathLike[str] | None = None,
                 corpus: Sequence[str | os.PathLike[str]] | None = None,
                 protect: Sequence[str | os.PathLike[str]] | None = None,
                 engine_overrides: Mapping[str, Any] | None = None, name: str | None = None,
                 threads: int | None = None, device: str | None = "cpu",
                 perplexity_text: str | os.PathLike[str] | None = None):
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.source = str(model)
        self.name = name or self.source
        self.store = CheckpointStore(store_dir)
        self.cache_dir = editfleet_home(home) / "stats"
        self.corpus = [Path(p) for p in corpus] if corpus is not None else None
        self.protect = [Path(p) for p in protect] if protect else None
        # Protected prompts decide the weights an edit yields, so they are part of its identity.
        self._protect_id = {"protected_prompts": prompts_digest(read_protected_prompts(self.protect))} if self.protect else {}
        self.engine_overrides = dict(engine_overrides or {})
        self.perplexity_text = Path(perplexity_text) if perplexity_text is not None else None
        self._base_perplexity: float | None = None
        self.model, self.tokenizer = load_model(self.source, home, device)
        self.adapter = adapter_for(self.model)
        self.num_layers = self.adapter.num_layers(self.model)
        self._editors: dict[str, Editor] = {}
        self._state: tuple[str, str] | None = (BASE, "")  # (checkpoint id, config key of the K_p owner)

    # -- settings and editors -----------------------------------------------------------------

    def resolve_config(self, method: str = "alphaedit", options: Mapping[str, Any] | None = None) -> EditConfig:
        """The family defaults for ``method``, then the worker's overrides, then the job's options
        (``target_dtype='auto'`` resolved for this worker's device, so checkpoints say what ran)."""
        config = default_config(self.adapter.family, method, self.num_layers, **{**self.engine_overrides, **(options or {})})
        return resolve_target_dtype(config, model_device(self.model))

    def _editor(self, config: EditConfig) -> Editor:
        """The editor for ``config``; a new one is made at base so that it keeps base copies."""
        key = _config_key(config)
        if key not in self._editors:
            if self._state != (BASE, ""):
                self._reset()
            # The engine generates its context prefixes from the base weights, so a worker that
            # materialises a checkpoint continues exactly as the worker that made it.
            self._editors[key] = Editor(self.model, self.tokenizer, config, self.cache_dir, self.corpus, self.protect)
        return self._editors[key]

    def _reset(self) -> None:
        """Every edited projection back to its base weights; every editor's memory empty."""
        for editor in self._editors.values():
            editor.restore_base()
        self._state = (BASE, "")

    def _materialise(self, ckpt_id: str, config: EditConfig | None = None) -> None:
        """Put the weights at ``ckpt_id``, with the chain's keys in the K_p of ``config``'s editor.

        ``config`` None: only the weights matter (a query or an export); the checkpoint's own
        settings then own K_p.
        """
        if self._state is not None and self._state[0] == ckpt_id and (config is None or self._state[1] == _config_key(config)):
            return
        chain = self.store.lineage(self.name, ckpt_id)
        if config is None:
            config = EditConfig.from_dict(chain[-1].meta["engine_settings"]) if chain else self.resolve_config()
        key = _config_key(config)
        configs = {key: config, **{_config_key(c): c for c in (EditConfig.from_dict(r.meta["engine_settings"])
                                                               for r in chain)}}
        if len(configs) > MAX_EDITORS:
            raise RuntimeError(f"checkpoint {ckpt_id} needs {len(configs)} different engine settings; at most {MAX_EDITORS}")
        self._reset()
        for stale in [k for k in self._editors if k not in configs]:
            del self._editors[stale]
        for c in configs.values():  # all made now, at base: each keeps base copies of its layers
            self._editor(c)
        editor = self._editors[key]
        own = set(editor.config.layers)
        for record in chain:
            deltas, keys = self._load_batch(record)
            # Target values matter only to an editor that rejoins or repairs earlier batches by them.
            requests, z, z_layer = self._load_targets(record) if editor.needs_targets else (None, None, None)
            if requests is None and editor.uses_prompt_memory:
                requests = parse_requests(record.meta["edits"])
            # Layers of other settings first: the prompt memory reads the weights the batch left.
            for i, (u, v) in deltas.items():
                if i not in own:
                    self.adapter.add_delta(self.model, i, u @ v.T)
            editor.replay({i: d for i, d in deltas.items() if i in own}, {i: k for i, k in keys.items() if i in own},
                          requests, z, z_layer)
        self._state = (ckpt_id, key)

    def _load_batch(self, record: CheckpointRecord) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
        deltas, keys = {}, {}
        for layer in record.meta["layers"]:
            t = load_tensors(self.store.read_artifact(self.name, record.id, _layer_file(layer)))
            deltas[layer], keys[layer] = (t["U"], t["V"]), t["K"]
        return deltas, keys

    def _load_targets(self, record: CheckpointRecord) -> tuple[list[EditRequest] | None, torch.Tensor | None, int | None]:
        """The batch's requests and target values, for ``earlier_edits="targets"`` (None when
        the checkpoint was written without them)."""
        if TARGETS_FILE not in record.artifacts:
            return None, None, None
        z = load_tensors(self.store.read_artifact(self.name, record.id, TARGETS_FILE))["Z"]
        return parse_requests(record.meta["edits"]), z, int(record.meta["target_layer"])

    # -- editing --------------------------------------------------------------------------------

    def run_edit(self, parent: str, edits: Sequence[Mapping[str, Any]], method: str = "alphaedit",
                 options: Mapping[str, Any] | None = None,
                 max_perplexity_increase: float | None = None) -> Iterator[dict[str, Any]]:
        """Apply ``edits`` on top of checkpoint ``parent`` and store the result (see module doc).

        The same edits on the same parent with the same settings give the same checkpoint id;
        an existing checkpoint is verified and reused instead of recomputed. With
        ``max_perplexity_increase``, a result whose perplexity exceeds the unedited model's by
        more than that fraction is not stored: the run ends with an ``over_limit`` event.
        """
        try:
            config = self.resolve_config(method, options)
            requests = parse_requests(list(edits))
        except EditValidationError as e:
            yield _rejected(e)
            return
        ckpt = checkpoint_id(self.name, parent, [request_identity(r) for r in requests], method,
                             {**config.to_dict(), **self._protect_id}, ENGINE_VERSION)
        if self.store.exists(self.name, ckpt):
            self.store.verify(self.name, ckpt)
            scores = self.store.read(self.name, ckpt).meta["scores"]
            if max_perplexity_increase is not None and "perplexity_change" not in scores:
                yield _progress("evaluating")  # a checkpoint stored before perplexity was scored
                self._measure_base()
                self._materialise(ckpt)
                scores = {**scores, **self._general_ability()}
            if (over := _over_limit(scores, max_perplexity_increase)) is not None:
                yield over
                return
            yield {"kind": "result", "checkpoint": ckpt, "reused": True, "scores": scores}
            return
        if self._base_perplexity is None:
            yield _progress("loading")  # once per worker: the unedited model's perplexity
            self._measure_base()
        yield _progress("materializing")
        self._materialise(parent, config)
        editor = self._editors[_config_key(config)]
        try:
            editor.validate(requests)
        except EditValidationError as e:
            yield _rejected(e)
            return
        before = self._scores_before(requests)
        self._state = None  # the weights are about to change: unknown until the batch is stored
        result: BatchResult = yield from _with_progress(lambda progress: editor.apply(requests, progress))
        yield _progress("evaluating")
        scores = {**self._scores_after(requests, before, result), **self._general_ability()}
        if (over := _over_limit(scores, max_perplexity_increase)) is not None:
            yield over  # the weights are unknown (self._state None): the next call rebuilds them
            return
        yield _progress("writing")
        files = {_layer_file(i): save_tensors({"U": _cpu(u), "V": _cpu(v), "K": _cpu(result.keys[i])})
                 for i, (u, v) in result.deltas.items()}
        files[TARGETS_FILE] = save_tensors({"Z": _cpu(result.z)})
        meta = {"parent": parent, "edits": [dataclasses.asdict(r) for r in requests], "method": method,
                "engine_settings": config.to_dict(), **self._protect_id, "engine_version": ENGINE_VERSION, "scores": scores,
                "layers": sorted(result.deltas), "target_layer": config.layers[-1], "timings": result.timings}
        self.store.write_checkpoint(self.name, ckpt, meta, files)
        self._state = (ckpt, _config_key(config))
        yield {"kind": "result", "checkpoint": ckpt, "reused": False, "scores": scores}

    def _scores_before(self, requests: Sequence[EditRequest]) -> dict[str, list[float]]:
        """Target probabilities before the edit, for edits without a target_true to compare with."""
        missing = [r for r in requests if r.target_true is None]
        prompts = [p for r in missing for p in (r.text, *r.paraphrases)]
        if not prompts:
            return {}
        nll = [s[0].nll for s in score_targets(self.model, self.tokenizer, prompts,
                                                [[r.target_new] for r in missing for _ in (r.text, *r.paraphrases)])]
        return {"nll": nll}

    def _scores_after(self, requests: Sequence[EditRequest], before: dict[str, list[float]],
                      result: BatchResult) -> dict[str, float]:
        """Efficacy, paraphrase efficacy, neighbourhood specificity of this batch (fractions).

        With a target_true, an edit succeeds where target_new is more likely than target_true
        (mean token NLL, CounterFact's protocol); without one, where target_new became more
        likely than before the edit. Neighbours count only where target_true is known: they
        succeed where they still prefer it.
        """
        prompts, targets, kinds = [], [], []
        for r in requests:
            for kind, texts in (("efficacy", (r.text,)), ("paraphrase_efficacy", r.paraphrases)):
                for text in texts:
                    prompts.append(text)
                    targets.append([r.target_new] + ([r.target_true] if r.target_true is not None else []))
                    kinds.append(kind)
            if r.target_true is not None:
                for text in r.neighbors:
                    prompts.append(text)
                    targets.append([r.target_new, r.target_true])
                    kinds.append("neighborhood_specificity")
        scored = score_targets(self.model, self.tokenizer, prompts, targets)
        earlier = iter(before.get("nll", ()))
        hits: dict[str, list[bool]] = {}
        for kind, s in zip(kinds, scored):
            if kind == "neighborhood_specificity":
                ok = s[1].nll < s[0].nll
            else:
                ok = s[0].nll < (s[1].nll if len(s) > 1 else next(earlier))
            hits.setdefault(kind, []).append(ok)
        scores = {k: sum(v) / len(v) for k, v in hits.items()}
        scores["target_prob_mean"] = sum(result.target_prob) / len(result.target_prob)
        return scores

    def _measure_base(self) -> None:
        """The unedited model's perplexity on the held-out text, once per worker (this resets
        the weights to base, so it comes before a materialisation)."""
        if self._base_perplexity is None:
            self._reset()
            self._base_perplexity = perplexity(self.model, self.tokenizer, self.perplexity_text)["perplexity"]

    def _general_ability(self) -> dict[str, float]:
        """Perplexity of the current weights on the held-out text, and its change against the
        unedited model's (``_measure_base`` first)."""
        assert self._base_perplexity is not None
        ppl = perplexity(self.model, self.tokenizer, self.perplexity_text)["perplexity"]
        return {"perplexity": ppl, "perplexity_base": self._base_perplexity,
                "perplexity_change": ppl / self._base_perplexity - 1}

    # -- reading --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What this worker serves (also the first call, which waits for the model to load)."""
        return {"name": self.name, "source": self.source, "family": self.adapter.family,
                "num_layers": self.num_layers, "model_type": self.model.config.model_type,
                "context": context_length(self.model)}

    @torch.no_grad()
    def query(self, ckpt_id: str, prompts: Sequence[str], targets: Sequence[str] = (), top_k: int = 5) -> list[dict[str, Any]]:
        """Top-k next tokens after each prompt, and each target's probability as its continuation."""
        self._materialise(ckpt_id)
        last, *_ = run_prompts(self.model, encode_prompts(self.tokenizer, prompts), pad_id(self.tokenizer))
        probs = torch.softmax(head_logits(self.model, last), dim=-1)
        top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
        scored: list[list[TargetScore]] = (score_targets(self.model, self.tokenizer, prompts, [list(targets)] * len(prompts))
                                           if targets else [[] for _ in prompts])
        out = []
        for row, prompt in enumerate(prompts):
            tokens = [{"token": self.tokenizer.decode([int(t)]), "token_id": int(t), "probability": float(p)}
                      for p, t in zip(top.values[row], top.indices[row])]
            scores = [{"target": t, "log_probability": -s.nll * s.n_tokens,
                       "probability": math.exp(-s.nll * s.n_tokens)} for t, s in zip(targets, scored[row])]
            out.append({"prompt": prompt, "top_tokens": tokens, "targets": scores})
        return out

    def export(self, ckpt_id: str, output_dir: str | os.PathLike[str]) -> list[str]:
        """Write the materialised checkpoint as a Hugging Face folder; it appears whole or not at all."""
        dest = Path(output_dir)
        if dest.exists():
            raise FileExistsError(f"{dest} already exists; export writes a new folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._materialise(ckpt_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            lineage = [r.id for r in self.store.lineage(self.name, ckpt_id)]
            (tmp / EXPORT_INFO).write_text(json.dumps({"model": self.name, "source": self.source,
                                                       "checkpoint": ckpt_id, "lineage": lineage}, indent=1))
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return sorted(p.name for p in dest.iterdir())


def _config_key(config: EditConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


# The batch's target values at its last edited layer (requests x d_model), which a later batch
# with ``earlier_edits="targets"`` pulls the batch's requests back to.
TARGETS_FILE = "targets.safetensors"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A tensor as checkpoint files hold it (safetensors serialises from CPU memory)."""
    return t.detach().cpu().contiguous()


def _layer_file(layer: int) -> str:
    return f"layer{layer:03d}.safetensors"


def _over_limit(scores: Mapping[str, float], limit: float | None) -> dict[str, Any] | None:
    """The ``over_limit`` event when ``scores`` break the perplexity limit, else None."""
    if limit is None or scores["perplexity_change"] <= limit:
        return None
    return {"kind": "over_limit", "field": "max_perplexity_increase",
            "message": f"perplexity on the held-out text would be {scores['perplexity']:.3f}, "
                       f"{scores['perplexity_change']:+.1%} against the unedited model's "
                       f"{scores['perplexity_base']:.3f} (limit {limit:+.1%}); nothing was stored"}


def _progress(stage: str, current: int = 0, total: int = 0) -> dict[str, Any]:
    return {"kind": "progress", "stage": stage, "current": current, "total": total}


def _rejected(error: EditValidationError) -> dict[str, Any]:
    return {"kind": "rejected", "message": str(error),
            "violations": [dataclasses.asdict(v) for v in error.violations]}


def _with_progress(work: Callable[[Callable[[str, int, int], None]], Any]) -> Iterator[dict[str, Any]]:
    """Run ``work(progress)`` in a thread, yielding its progress events; returns its result.

    The engine reports progress through a callback while a generator must yield: a thread and
    a queue bridge the two. Exceptions from ``work`` are raised here, in the generator, and the
    generator does not end before the thread does.
    """
    events: queue.Queue = queue.Queue()

    def target() -> None:
        try:
            events.put(("done", work(lambda stage, cur, tot: events.put(("progress", (stage, cur, tot))))))
        except BaseException as e:  # re-raised in the generator
            events.put(("error", e))

    thread = threading.Thread(target=target, name="edit", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "progress":
                if value[0] != "done":
                    yield _progress(*value)
            elif kind == "done":
                return value
            else:
                raise value
    finally:
        thread.join()  # even when the consumer leaves early: no call may start while weights change
