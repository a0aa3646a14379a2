"""`kinema info` on tiny folders: JSON content, readable output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kinema.cli import main
from kinema.testing.fixtures import make_tiny_model


@pytest.fixture(scope="module")
def moe_official(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("info") / "moe", "t2v-moe", "official", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def ti2v_diffusers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("info") / "ti2v", "ti2v", "diffusers")


def _run(argv: list[str]) -> None:
    """kinema.cli.main returns on success (or exits 0)."""
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None)


def _info_json(folder, capsys) -> dict:
    _run(["info", str(folder), "--json"])
    return json.loads(capsys.readouterr().out)  # exactly one JSON document


def _module_params(kind: str) -> dict[str, int]:
    from kinema.models.dit import WanModel
    from kinema.models.t5 import T5Encoder
    from kinema.models.vae import WanVAE
    from kinema.testing.fixtures import tiny_configs

    dit, vae, t5, _ = tiny_configs(kind)
    with torch.device("meta"):
        return {"transformer": sum(p.numel() for p in WanModel(dit).parameters()),
                "vae": sum(p.numel() for p in WanVAE(vae).parameters()),
                "text_encoder": sum(p.numel() for p in T5Encoder(t5).parameters())}


def test_info_json_official_moe(moe_official, capsys):
    doc = _info_json(moe_official, capsys)
    assert doc["layout"] == "official"
    expected = _module_params("t2v-moe")
    assert set(doc["components"]) == {"transformer", "transformer_2", "vae", "text_encoder"}
    for name in ("transformer", "vae", "text_encoder"):
        assert doc["components"][name]["params"] == expected[name]
    assert doc["components"]["transformer_2"]["params"] == expected["transformer"]
    assert doc["components"]["transformer"]["dtype"] == "bfloat16"
    assert doc["model"]["type"] == "t2v" and doc["model"]["preset"] == "t2v-A14B"
    assert doc["model"]["two_experts"] is True
    mem = doc["memory"]
    assert mem["peak_bytes"] > expected["transformer"] * 2 and "method" in mem and "tokens" in mem["method"]
    assert mem["dit_tokens"] == 3 * 4 * 4  # 9 frames -> 3 latent frames, 64/8/2 = 4 per side


def test_info_json_diffusers_ti2v(ti2v_diffusers, capsys):
    doc = _info_json(ti2v_diffusers, capsys)
    assert doc["layout"] == "diffusers"
    assert "transformer_2" not in doc["components"]
    expected = _module_params("ti2v")
    assert {k: v["params"] for k, v in doc["components"].items()} == expected
    assert doc["components"]["vae"]["dtype"] == "float32"
    assert doc["model"]["type"] == "ti2v" and doc["model"]["vae"]["version"] == "2.2"


def test_info_human_readable(ti2v_diffusers, capsys):
    _run(["info", str(ti2v_diffusers)])
    out = capsys.readouterr().out
    assert "transformer" in out and "diffusers" in out and "estimated peak memory" in out


def test_info_bad_folder_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        proc = subprocess.run([sys.executable, "-m", "kinema", "info", str(target), "--json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
        assert str(target) in lines[0]


def test_info_estimate_scales_with_size(tmp_path, capsys):
    small = make_tiny_model(tmp_path / "s", "ti2v", "official")
    big = make_tiny_model(tmp_path / "b", "ti2v", "official",
                          defaults={"size": [256, 256], "frames": 33})
    a = _info_json(small, capsys)["memory"]
    b = _info_json(big, capsys)["memory"]
    assert b["dit_tokens"] > a["dit_tokens"] and b["peak_bytes"] > a["peak_bytes"]
