import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads: MKL's reproducible path, so in-process tests that compare a resumed run with an uninterrupted
# one are exact (what deterministic=true arranges for the CLI; subprocess tests leave it out and pass that setting)
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(REPO, "..", "shared", "data", "gsm8k")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder with a tiny random Llama + char tokenizer (built once per session)."""
    from tiny import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def gsm8k_dir():
    if not os.path.exists(os.path.join(GSM8K, "test.jsonl")):
        pytest.skip("../shared/data/gsm8k is not present")
    return GSM8K
