from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT.parent / "shared" / "golden"
KEYS_DIR = ROOT.parent / "shared" / "reference" / "keys"


def golden_files(pattern: str = "*.safetensors") -> list[Path]:
    return sorted(GOLDEN_DIR.glob(pattern)) if GOLDEN_DIR.is_dir() else []


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip("../shared/golden is not present")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    if not KEYS_DIR.is_dir():
        pytest.skip("../shared/reference/keys is not present")
    return KEYS_DIR


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # The suite runs tiny models: intra-op threads only add overhead there (and stall badly on
    # a busy 2-core machine). Tests that want more threads set them and restore this.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_config_dir(tmp_path_factory):
    # Signing identities are created on first use in the user's config folder: keep the
    # suite's own in a temporary folder, never in the real home.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KINEMA_CONFIG_DIR", str(tmp_path_factory.mktemp("kinema-config")))
        yield


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    """A fresh, empty kinema config folder (signing identity) and no user-supplied identity."""
    d = tmp_path / "config"
    monkeypatch.setenv("KINEMA_CONFIG_DIR", str(d))
    for var in ("KINEMA_C2PA_CERT", "KINEMA_C2PA_KEY", "KINEMA_TRUST_ANCHORS"):
        monkeypatch.delenv(var, raising=False)
    return d
