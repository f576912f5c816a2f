"""tinyrl.hub: an unreachable hub is found out at once, and then nothing waits on it."""

import socket

import pytest

from tinyrl import hub, tasks
from tinyrl.errors import UserError


@pytest.fixture
def online_env(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
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
    online_env.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not hub.offline()


def test_a_local_folder_is_never_local_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.local_only(str(tmp_path)) == {}


def test_gsm8k_from_an_unreachable_hub_fails_at_once_saying_what_to_pass(online_env):
    datasets = pytest.importorskip("datasets")
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    online_env.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub (20-45 s of retries)"))
    with pytest.raises(UserError, match="unreachable.*--data PATH"):
        tasks.load_gsm8k(None)
