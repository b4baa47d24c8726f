"""Preserved-knowledge statistics (K0 K0^T) and the null-space projectors built from them.

The second moment of the edited projections' inputs over a text corpus depends only on the base
weights, the layer and the corpus, so both it and the projector are cached on disk under a key
of exactly those inputs: the first job of a model pays minutes, later jobs load in milliseconds.
Text is streamed and packed into fixed-length sequences; memory is bounded by the batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from editfleet.workers.editing.runner import LayerRunner, capture_projection
from editfleet.workers.models.adapters import FamilyAdapter
from editfleet.workers.models.forward import model_device
from editfleet.workers.models.scoring import prompt_prefix

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CorpusText:
    """One text file of the statistics corpus, read from character ``start`` on.

    The default corpus starts ``wiki.test.raw`` past its head, which is the bench's perplexity
    text: a projector built on that text would protect exactly what measures general ability.
    """

    path: Path
    start: int = 0


def as_corpus(items: Sequence[str | os.PathLike[str] | CorpusText]) -> list[CorpusText]:
    return [t if isinstance(t, CorpusText) else CorpusText(Path(t)) for t in items]


def checked_corpus(items: Sequence[str | os.PathLike[str] | CorpusText]) -> list[CorpusText]:
    """``as_corpus``, or ``FileNotFoundError`` naming every file that is not there."""
    corpus = as_corpus(items)
    missing = [str(t.path) for t in corpus if not t.path.is_file()]
    if missing:
        raise FileNotFoundError(f"statistics corpus not found: {', '.join(missing)}")
    return corpus


def file_digest(corpus: Sequence[str | os.PathLike[str] | CorpusText]) -> str:
    h = hashlib.sha256()
    for t in as_corpus(corpus):
        h.update(t.path.name.encode())
        if t.start:  # whole files keep the digest they had before offsets existed
            h.update(f"@{t.start}".encode())
        with open(t.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, tuple, bytes]] = {}  # id -> (tensor, state, sha256)


def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's float32 bytes, remembered until the tensor changes (torch bumps
    ``_version`` on every in-place write; swapping ``.data`` moves the storage), so a warm worker
    hashes a model once."""
    state = (t._version, t.data_ptr(), tuple(t.shape), t.dtype)
    seen = _TENSOR_DIGESTS.get(id(t))
    if seen is not None and seen[0]() is t and seen[1] == state:
        return seen[2]
    digest = hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy()).digest()  # no copy for CPU float32
    key = id(t)
    _TENSOR_DIGESTS[key] = (weakref.ref(t, lambda _, key=key: _TENSOR_DIGESTS.pop(key, None)), state, digest)
    return digest


def params_digest(model: nn.Module, adapter: FamilyAdapter, upto_layer: int,
                  base_weights: dict[int, torch.Tensor]) -> str:
    """Digest of the base parameters that keys up to ``upto_layer`` depend on.

    Edited projections are hashed from their kept base copies, so the digest (and the cache key)
    of an edited model is that of its base. Parameters are hashed one by one on a thread pool
    (hashlib releases the GIL).
    """
    prefix = adapter.layers + "."
    named = []
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            if index > upto_layer:
                continue
            if name == adapter.projection_name(index) + ".weight" and index in base_weights:
                p = base_weights[index]
        elif "lm_head" in name or name.startswith(adapter.final_norm):
            continue
        named.append((name, p))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda item: tensor_digest(item[1]), named))
    h = hashlib.sha256()
    for (name, _), digest in zip(named, digests):
        h.update(name.encode())
        h.update(digest)
    return h.hexdigest()


def corpus_lines(corpus: Sequence[str | os.PathLike[str] | CorpusText]) -> Iterator[str]:
    """The lines of the corpus files in order, each file from its ``start`` on (from the next
    whole line)."""
    for text in as_corpus(corpus):
        with open(text.path, encoding="utf-8") as f:
            if text.start:
                f.read(text.start)
                f.readline()
            yield from f


def token_sequences(tokenizer, corpus: Sequence[str | os.PathLike[str] | CorpusText], length: int,
                    total_tokens: int) -> Iterator[list[int]]:
    """Packed token sequences of ``length`` from the corpus files, ``total_tokens`` at most."""
    buffer: list[int] = []
    emitted = 0
    lines: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal emitted
        text = "".join(lines)
        lines.clear()
        if text.strip():
            buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buffer) >= length and emitted < total_tokens:
            yield buffer[:length]
            del buffer[:length]
            emitted += length

    for line in corpus_lines(corpus):
        if line.strip():
            lines.append(line)
        if len(lines) >= 64:
            yield from flush()
        if emitted >= total_tokens:
            return
    yield from flush()


def paragraph_starts(corpus: Sequence[str | os.PathLike[str] | CorpusText], count: int, words: int) -> list[str]:
    """The first ``words`` words of each paragraph (non-blank line) of the corpus that has that
    many, in order, ``count`` at most. WikiText's headings (lines between ``=`` marks) are skipped.

    The statistics read the corpus packed into long sequences, so keys near the start of a text,
    where a short prompt's subject sits, hardly weigh in their moment; these starts, read each
    from its own beginning, stand in for such prompts (``EditConfig.protect_starts``).
    """
    starts: list[str] = []
    if count <= 0:
        return starts
    for line in corpus_lines(corpus):
        line = line.strip()
        if line.startswith("=") and line.endswith("="):
            continue
        split = line.split()
        if len(split) >= words:
            starts.append(" ".join(split[:words]))
            if len(starts) == count:
                break
    return starts


@dataclass
class LayerStats:
    moment: torch.Tensor  # (d_ff, d_ff) float32, mean of k k^T
    count: int


def accumulate_key_moments(model: nn.Module, adapter: FamilyAdapter, layers: Sequence[int], ids: torch.Tensor,
                           mask: torch.Tensor, sums: dict[int, torch.Tensor], keep: torch.Tensor | None = None) -> None:
    """Add k k^T of the projection inputs at every position of ``ids`` (or where ``keep``) to
    ``sums`` (float32, per layer), running only up to the last of ``layers``."""
    last = max(layers)
    with capture_projection(model, adapter, list(layers)) as seen, torch.no_grad():
        LayerRunner(model, adapter, ids, mask, start=last, stop=last)
    for i in layers:
        keys = seen["in"][i]
        k = (keys.reshape(-1, keys.shape[-1]) if keep is None else keys[keep]).to(torch.float32)
        sums[i].addmm_(k.T, k)


def _bos(tokenizer) -> int | None:
    """The BOS id every statistics sequence starts with, when the tokenizer adds one."""
    return getattr(tokenizer, "bos_token_id", None) if getattr(tokenizer, "add_bos_token", False) else None


def compute_second_moments(model: nn.Module, tokenizer, adapter: FamilyAdapter, layers: Sequence[int],
                           corpus: Sequence[CorpusText], total_tokens: int, length: int, batch_size: int,
                           progress: Progress | None = None) -> dict[int, LayerStats]:
    """Accumulate float32 sums of k k^T over every corpus token, running only up to the last layer."""
    bos = _bos(tokenizer)
    prefix = [bos] if bos is not None else []
    seq_len = length - len(prefix)
    started = time.monotonic()
    stats = sequence_moments(model, adapter, layers, token_sequences(tokenizer, corpus, seq_len, total_tokens),
                             prefix, batch_size, max(1, total_tokens // seq_len), progress)
    if stats is None:
        raise ValueError(f"corpus {', '.join(str(t.path) for t in as_corpus(corpus))} yields no full sequence of {seq_len} tokens")
    print(f"[editfleet] key statistics: {stats[layers[0]].count} tokens, layers {list(layers)}, "
          f"{time.monotonic() - started:.1f}s", file=sys.stderr)
    return stats


def sequence_moments(model: nn.Module, adapter: FamilyAdapter, layers: Sequence[int], sequences: Iterable[list[int]],
                     prefix: list[int], batch_size: int, expected: int = 1,
                     progress: Progress | None = None) -> dict[int, LayerStats] | None:
    """Second moments of the keys of token ``sequences``, each run after ``prefix`` (whose keys
    count too), ``batch_size`` at a time; None when there is no sequence."""
    dims = {i: adapter.key_dim(model, i) for i in layers}
    device = model_device(model)
    sums = {i: torch.zeros(dims[i], dims[i], dtype=torch.float32, device=device) for i in layers}
    count = done = 0
    batch: list[list[int]] = []

    def run(batch: list[list[int]]) -> None:
        nonlocal count, done
        ids = torch.tensor([prefix + s for s in batch], dtype=torch.long, device=device)
        accumulate_key_moments(model, adapter, layers, ids, torch.ones_like(ids), sums)
        count += ids.numel()
        done += len(batch)

    for seq in sequences:
        batch.append(seq)
        if len(batch) == batch_size:
            run(batch)
            batch = []
            if progress:
                progress("statistics", min(done, expected), expected)
    if batch:
        run(batch)
    if count == 0:
        return None
    if progress:
        progress("statistics", expected, expected)
    return {i: LayerStats(sums[i] / count, count) for i in layers}


def text_moments(model: nn.Module, tokenizer, adapter: FamilyAdapter, layers: Sequence[int], text: str,
                 length: int, batch_size: int) -> dict[int, LayerStats]:
    """Second moments of the keys of ``text`` at ``layers`` as the model reads text in use: in
    sequences of ``length`` tokens, each after the special tokens the tokenizer puts first (as
    the perplexity and every prompt are; a last partial sequence is left out). The statistics
    read their corpus after a BOS only when the tokenizer says it adds one (``add_bos_token``),
    which gemma3's does not (docs/engine.md, Known limits)."""
    prefix = prompt_prefix(tokenizer)
    seq_len = length - len(prefix)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    sequences = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    stats = sequence_moments(model, adapter, layers, sequences, prefix, batch_size)
    if stats is None:
        raise ValueError(f"text of {len(ids)} tokens holds no full sequence of {seq_len}")
    return stats


def projector(moment: torch.Tensor, threshold: float, energy: float | None) -> tuple[torch.Tensor, dict]:
    """P = U U^T over the eigenvectors of the second moment that carry (almost) no preserved keys.

    ``threshold``: keep eigenvalues below it (AlphaEdit). ``energy``: instead keep the smallest
    directions whose eigenvalues sum to at most that fraction of the trace.
    """
    values, vectors = torch.linalg.eigh(moment.to(torch.float64))
    values = values.clamp_min(0)
    if energy is not None:
        keep = torch.cumsum(values, 0) <= energy * values.sum()
    else:
        keep = values < threshold
    u = vectors[:, keep]
    info = {
        "kept": int(keep.sum()),
        "dims": int(values.numel()),
        "kept_energy": float(values[keep].sum() / values.sum().clamp_min(1e-30)),
    }
    return (u @ u.T).to(torch.float32), info


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"meta": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StatsCache:
    """On-disk cache of second moments and projectors, keyed by everything they depend on."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def moments(self, keys: dict[int, str],
                compute: Callable[[list[int]], dict[int, LayerStats]]) -> dict[int, LayerStats]:
        """Second moments per layer: loaded when cached under ``keys[layer]``, else computed and stored."""
        paths = {i: self.root / "stats" / f"layer{i}-{k}.safetensors" for i, k in keys.items()}
        missing = [i for i in keys if not paths[i].exists()]
        out = compute(missing) if missing else {}
        for i in missing:
            _atomic_save({"moment": out[i].moment}, {"count": out[i].count, "layer": i}, paths[i])
        for i in keys:
            if i not in out:
                out[i] = LayerStats(load_file(paths[i])["moment"], int(read_metadata(paths[i])["count"]))
        return {i: out[i] for i in keys}

    def projector(self, moment_key: str, stats: LayerStats, threshold: float,
                  energy: float | None) -> tuple[torch.Tensor, dict]:
        """The null-space projector of one layer, cached with its kept-directions summary."""
        key = self.key(kind="projector", moment=moment_key, threshold=threshold, energy=energy)
        path = self.root / "projectors" / f"{key}.safetensors"
        if path.exists():
            return load_file(path)["P"], read_metadata(path)
        p, info = projector(stats.moment, threshold, energy)
        _atomic_save({"P": p}, info, path)
        return p, info


def read_metadata(path: Path) -> dict:
    """The JSON metadata stored with a cached tensor file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))
