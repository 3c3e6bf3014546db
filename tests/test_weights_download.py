"""Downloading the paper's backbones into torch.hub's cache, with no network: a local server.

The checkpoint URL is pointed (monkeypatched `torchvision_weights_url`, or the documented
mirror variable) at an HTTP server on 127.0.0.1 started per test, or at a file:// URL. The
served checkpoints are tiny state dicts named the way torchvision names its files,
<stem>-<first 8 hex digits of their SHA-256>.pth, so torch.hub's hash check runs on them.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import threading
from types import SimpleNamespace

import pytest
import torch
import torchvision

from stnpadim_ext.errors import InputError
from stnpadim_ext.models import backbones
from stnpadim_ext.models.backbones import build_backbone, fetch_torchvision_weights


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Downloads allowed (conftest forbids them), into a fresh TORCH_HOME; the checkpoints folder."""
    monkeypatch.delenv("STNPADIM_OFFLINE")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set for the user's network must not apply
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert backbones.torchvision_weights_path("resnet18").parent == checkpoints
    return checkpoints


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving `files` ({path: bytes}, else 404) and recording
    each requested path in `requests`; shut down when the test ends."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # a stalled client cannot hold a handler thread longer than this

        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", files=files,
                              requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def checkpoint(state: dict, stem: str = "resnet18") -> tuple[str, bytes]:
    """(torchvision-style file name with the real SHA-256 prefix, file bytes) of a state dict."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


def serve(server, monkeypatch, name: str, data: bytes) -> str:
    """Serves data as /models/<name> and points resnet18's checkpoint URL at it."""
    url = f"{server.url}/models/{name}"
    server.files[f"/models/{name}"] = data
    monkeypatch.setattr(backbones, "torchvision_weights_url", lambda backbone: url)
    return url


TINY = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.ones(3)}


def test_url_is_torchvisions_and_a_mirror_keeps_its_file_name(online, monkeypatch):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert backbones.torchvision_weights_url("resnet18") == url
    assert backbones.torchvision_weights_path("resnet18") == online / "resnet18-f37072fd.pth"
    monkeypatch.setenv("STNPADIM_WEIGHTS_URL_BASE", "https://mirror.plant.example/torch/ ")
    assert (backbones.torchvision_weights_url("wide_resnet50_2")
            == "https://mirror.plant.example/torch/wide_resnet50_2-95faca4d.pth")
    assert backbones.torchvision_weights_path("wide_resnet50_2") == online / "wide_resnet50_2-95faca4d.pth"


def test_download_is_hash_checked_then_read_from_the_cache(online, server, monkeypatch):
    name, data = checkpoint(TINY)
    serve(server, monkeypatch, name, data)
    path = fetch_torchvision_weights("resnet18")
    assert path == online / name and path.read_bytes() == data
    assert sorted(p.name for p in online.iterdir()) == [name]  # no temporary file left beside it
    assert server.requests == [f"/models/{name}"]
    assert fetch_torchvision_weights("resnet18") == path      # second use: the cache
    assert len(server.requests) == 1
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == TINY.keys() and all(torch.equal(loaded[k], TINY[k]) for k in TINY)


def test_cache_hit_makes_no_request(online, server, monkeypatch):
    name, data = checkpoint(TINY)
    serve(server, monkeypatch, name, data)
    online.mkdir(parents=True)
    (online / name).write_bytes(data)
    assert fetch_torchvision_weights("resnet18") == online / name
    assert server.requests == []


def test_corrupted_download_fails_the_hash_check_and_leaves_nothing(online, server, monkeypatch):
    name, data = checkpoint(TINY)
    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])
    url = serve(server, monkeypatch, name, corrupted)
    with pytest.raises(InputError) as info:
        fetch_torchvision_weights("resnet18")
    message = str(info.value)
    assert "invalid hash value" in message and url in message and "\n" not in message
    assert server.requests == [f"/models/{name}"]
    assert list(online.iterdir()) == []


def test_mirror_variable_is_used_and_its_file_hash_checked(online, server, monkeypatch):
    # The mirror serves a file that is not torchvision's resnet18-f37072fd.pth: rejected.
    monkeypatch.setenv("STNPADIM_WEIGHTS_URL_BASE", f"{server.url}/mirror/")
    server.files["/mirror/resnet18-f37072fd.pth"] = checkpoint(TINY)[1]
    with pytest.raises(InputError, match=r"invalid hash value \(expected \"f37072fd\""):
        build_backbone("resnet18")
    assert server.requests == ["/mirror/resnet18-f37072fd.pth"]
    assert list(online.iterdir()) == []


def test_file_url(online, tmp_path, monkeypatch):
    name, data = checkpoint(TINY)
    source = tmp_path / "share" / name
    source.parent.mkdir()
    source.write_bytes(data)
    monkeypatch.setattr(backbones, "torchvision_weights_url", lambda backbone: source.as_uri())
    assert fetch_torchvision_weights("resnet18").read_bytes() == data


@pytest.mark.parametrize(("variable", "value"), [("STNPADIM_OFFLINE", "1"), ("HF_HUB_OFFLINE", "TRUE")])
def test_offline_switch_never_touches_the_network(online, server, monkeypatch, variable, value):
    name, data = checkpoint(TINY)
    url = serve(server, monkeypatch, name, data)
    monkeypatch.setenv(variable, value)
    with pytest.raises(InputError) as info:
        build_backbone("resnet18")
    message = str(info.value)
    for part in (variable, url, str(online / name), "weights=FILE", "--weights FILE"):
        assert part in message, (part, message)
    assert "\n" not in message
    assert server.requests == []
    assert not online.exists() or list(online.iterdir()) == []


def test_offline_switch_values(monkeypatch):
    monkeypatch.delenv("STNPADIM_OFFLINE")
    assert backbones.offline_variable() is None
    for value in ("0", "", "false", "no"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert backbones.offline_variable() is None
    monkeypatch.setenv("STNPADIM_OFFLINE", "yes")
    assert backbones.offline_variable() == "STNPADIM_OFFLINE"


@pytest.mark.parametrize("failure", ["404", "connection refused"])
def test_failed_download_says_what_where_and_how_in_one_line(online, server, monkeypatch, closed_port,
                                                             failure):
    name = checkpoint(TINY)[0]
    if failure == "404":
        url, reason = f"{server.url}/models/{name}", "HTTP Error 404"
    else:
        url, reason = f"http://127.0.0.1:{closed_port}/models/{name}", "Connection refused"
    monkeypatch.setattr(backbones, "torchvision_weights_url", lambda backbone: url)
    with pytest.raises(InputError) as info:
        build_backbone("resnet18")
    message = str(info.value)
    for part in (reason, url, str(online / name), "weights=FILE", "--weights FILE",
                 "STNPADIM_WEIGHTS_URL_BASE"):
        assert part in message, (part, message)
    assert "\n" not in message
    assert list(online.iterdir()) == []


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("STNPADIM_OFFLINE")
    (tmp_path / "torch_home").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(backbones, "torchvision_weights_url", lambda backbone: "http://127.0.0.1:9/x-00.pth")
    with pytest.raises(InputError, match="NotADirectoryError|FileExistsError") as info:
        build_backbone("resnet18")
    assert "\n" not in str(info.value)


def test_resnet18_downloaded_on_first_use_equals_the_same_file_given(online, server, tmp_path, monkeypatch):
    name, data = checkpoint(torchvision.models.resnet18(weights=None).state_dict())
    serve(server, monkeypatch, name, data)
    downloaded = build_backbone("resnet18")
    given = tmp_path / name
    given.write_bytes(data)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(downloaded(x), build_backbone("resnet18", weights=given)(x), strict=True):
            assert torch.equal(a, b)
    assert len(server.requests) == 1 and (online / name).read_bytes() == data
