"""tinyrl.hub: an unreachable hub is found out at once, and then nothing waits on it."""

import socket
import sys
import types

import pytest

from tinyrl import hub, tasks
from tinyrl.errors import UserError


@pytest.fixture
def online_env(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    hub._reachable.cache_clear()
    yield monkeypatch
    hub._reachable.cache_clear()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_offline_flag_needs_no_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_reachable", lambda *a: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.offline()
    assert hub.local_only("org/model") == {"local_files_only": True}


def test_a_listening_endpoint_is_online_and_a_closed_one_offline(online_env):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert not hub.offline()
        assert hub.local_only("org/model") == {}
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert hub.offline()


def test_behind_a_proxy_the_hub_counts_as_reachable(online_env):
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    online_env.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert not hub.offline()


def test_a_local_folder_is_never_local_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.local_only(str(tmp_path)) == {}


def test_an_endpoint_that_cannot_be_probed_counts_as_reachable(online_env):
    online_env.setenv("HF_ENDPOINT", "huggingface.co")  # no scheme: nothing sensible to connect to
    assert not hub.offline()


def test_no_proxy_hosts_are_probed_directly(online_env):
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    online_env.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    online_env.setenv("NO_PROXY", "127.0.0.1")
    assert hub.offline()


def fake_datasets(monkeypatch, cached: bool):
    """A `datasets` module whose load_dataset records whether the hub was switched off when it was called."""
    import huggingface_hub.constants

    seen = []

    def load_dataset(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        if not cached:
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")
        return [{"question": "Q", "answer": "w #### 4"}]

    datasets = types.SimpleNamespace(load_dataset=load_dataset, config=types.SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    return datasets, seen


def test_offline_gsm8k_comes_from_the_datasets_cache_with_the_hub_switched_off(online_env):
    import huggingface_hub.constants

    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    datasets, seen = fake_datasets(online_env, cached=True)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    assert tasks.load_gsm8k(None)[0].answer == "4"
    assert seen == [(True, True)]  # no retries against the network: the caches only
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE == before


def test_offline_gsm8k_not_in_the_cache_is_one_line_saying_what_to_pass(online_env):
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    fake_datasets(online_env, cached=False)
    with pytest.raises(UserError, match="unreachable.*not in the local datasets cache.*--data PATH") as err:
        tasks.load_gsm8k(None)
    assert "\n" not in str(err.value)
