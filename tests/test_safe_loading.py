"""Nothing we load can run code: safe YAML, no pickles, weights only, no remote code by default."""

from __future__ import annotations

import inspect
import re

import pytest

from graphbuild.cli import build
from graphbuild.embedding.models import DEFAULT_MODEL, resolve_model
from graphbuild.embedding.stage import EmbedConfig
from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import load_manifest
from tests.conftest import REPO, write

# Each pattern, anywhere in our code, would load something that can run code.
UNSAFE = {
    r"\bpickle\.loads?\(": "pickle",
    r"\byaml\.(load|unsafe_load|full_load)\(": "a YAML loader that builds objects",
    r"allow_pickle\s*=\s*True": "numpy pickles",
    r"\bmarshal\.loads?\(|(?<![.\w])(eval|exec)\(": "eval or exec",
}


def test_no_unsafe_loader_in_our_code():
    found = []
    for path in sorted((REPO / "graphbuild").glob("*.py")):
        text = path.read_text()
        for pattern, what in UNSAFE.items():
            found += [f"{path.name}: {what}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                found.append(f"{path.name}: torch.load without weights_only=True")
    assert found == []


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']",
                                 "!!python/name:os.system", "!!python/object:os.stat_result {}"])
def test_yaml_tags_that_build_objects_are_refused(tmp_path, tag):
    m = write(tmp_path / "m.yaml", f"name: {tag}\nsource: {{path: c.tsv}}\ntext_column: c\n")
    with pytest.raises(GraphbuildError, match=r"m\.yaml"):
        load_manifest(m)


def test_remote_code_is_off_unless_asked():
    assert EmbedConfig().trust_remote_code is False
    for command in (build.embed, build.run):
        default = inspect.signature(command).parameters["trust_remote_code"].default
        assert default is False


def test_default_model_weights_are_safetensors():
    files = {p.name for p in resolve_model(DEFAULT_MODEL).path.iterdir()}
    assert "model.safetensors" in files
    assert not files & {"pytorch_model.bin", "model.ckpt", "pytorch_model.pt"}
