"""Shared test settings: no test may reach the network."""
import socket

import pytest

from stnpadim_ext.models.backbones import MIRROR_VARIABLE, OFFLINE_VARIABLES


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Weight downloads off for every test (subprocesses inherit it); the download tests
    turn it back on against a server on 127.0.0.1."""
    for variable in (*OFFLINE_VARIABLES, MIRROR_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("STNPADIM_OFFLINE", "1")


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
