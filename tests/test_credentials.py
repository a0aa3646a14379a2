"""C2PA Content Credentials: identity generation, certificate profile, signing, validation states."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kinema.provenance import credentials as cr
from kinema.video_io import write_mp4


@pytest.fixture
def video(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return write_mp4(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8), tmp_path / "plain.mp4", 8)


def _sign(src: Path, dst: Path, identity: cr.SigningIdentity, **kw) -> dict:
    manifest = cr.build_manifest(title=dst.name, model_name="wan2.2-ti2v-5b", payload="4b31000000000abc", **kw)
    return cr.sign_mp4(src, dst, identity, manifest)


def test_config_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KINEMA_CONFIG_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "x"))
    assert cr.config_dir() == tmp_path / "a"
    monkeypatch.delenv("KINEMA_CONFIG_DIR")
    assert cr.config_dir() == tmp_path / "x" / "kinema"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cr.config_dir() == tmp_path / "home" / ".config" / "kinema"


def test_identity_created_once_with_private_permissions(config):
    ident = cr.default_identity()
    folder = config / "c2pa"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for key in ("signer.key", "root-ca.key"):
        assert stat.S_IMODE(os.stat(folder / key).st_mode) == 0o600
    assert ident.source == "local" and ident.alg == "es256"
    assert cr.default_identity().cert_chain_pem == ident.cert_chain_pem  # reused, not regenerated


def test_certificate_meets_c2pa_profile(config):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ident = cr.local_identity()
    ee, root = x509.load_pem_x509_certificates(ident.cert_chain_pem)
    assert ee.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ee.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ee.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
    ee.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert ee.issuer == root.subject != ee.subject  # not self-signed
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    root.public_key().verify(ee.signature, ee.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_signed_file_is_trusted_locally_and_valid_elsewhere(config, video, tmp_path):
    out = tmp_path / "signed.mp4"
    facts = _sign(video, out, cr.default_identity())
    assert facts["signed"] and "kinema signer" in facts["signer"]
    rep = cr.read_credentials(out)
    assert rep["state"] == "trusted"
    assert rep["digital_source_type"] == "trainedAlgorithmicMedia"
    assert rep["soft_binding"] == "4b31000000000abc"
    assert rep["generation"]["model"] == "wan2.2-ti2v-5b"
    assert "prompt" not in rep["generation"]
    created = [a for a in rep["actions"] if a["action"] == "c2pa.created"][0]
    assert created["softwareAgent"]["name"] == "kinema"
    assert cr.read_credentials(out, anchors=[])["state"] == "valid"  # no trust anchors configured


def test_prompt_only_when_asked(config, video, tmp_path):
    out = tmp_path / "p.mp4"
    _sign(video, out, cr.default_identity(), prompt="a red fox", include_prompt=True)
    assert cr.read_credentials(out)["generation"]["prompt"] == "a red fox"
    _sign(video, out, cr.default_identity(), prompt="a red fox", include_prompt=False)
    assert b"a red fox" not in out.read_bytes()


def test_loras_are_recorded(config, video, tmp_path):
    out = tmp_path / "l.mp4"
    record = {"file": "style.safetensors", "sha256": "ab" * 32, "strength": {"high": 1.0, "low": 0.5}, "target": "both",
              "format": "comfyui", "mode": "merge", "matched": 400, "unmatched": 0}
    _sign(video, out, cr.default_identity(), loras=[record])
    assert cr.read_credentials(out)["generation"]["loras"] == [record]
    _sign(video, out, cr.default_identity())
    assert "loras" not in cr.read_credentials(out)["generation"]


def test_tampered_file_is_invalid(config, video, tmp_path):
    out = tmp_path / "signed.mp4"
    _sign(video, out, cr.default_identity())
    data = bytearray(out.read_bytes())
    i = data.find(b"mdat")
    data[i + 64] ^= 0xFF  # one byte of the video data
    bad = tmp_path / "tampered.mp4"
    bad.write_bytes(bytes(data))
    rep = cr.read_credentials(bad)
    assert rep["state"] == "invalid"
    assert any("mismatch" in e for e in rep["errors"])


def test_unsigned_file_is_absent(config, video):
    assert cr.read_credentials(video) == {"state": "absent"}


def test_user_supplied_identity(config, video, tmp_path, monkeypatch):
    other = cr.local_identity(tmp_path / "other")  # stands in for the user's own CA + cert
    monkeypatch.setenv("KINEMA_C2PA_CERT", str(tmp_path / "other" / "c2pa" / "signer.pem"))
    monkeypatch.setenv("KINEMA_C2PA_KEY", str(tmp_path / "other" / "c2pa" / "signer.key"))
    ident = cr.default_identity()
    assert ident.source == "user" and ident.cert_chain_pem == other.cert_chain_pem
    out = tmp_path / "u.mp4"
    _sign(video, out, ident)
    assert cr.read_credentials(out, anchors=[])["state"] == "valid"
    assert cr.read_credentials(out, anchors=[other.root_pem])["state"] == "trusted"
    monkeypatch.setenv("KINEMA_TRUST_ANCHORS", str(tmp_path / "other" / "c2pa" / "root-ca.pem"))
    assert cr.read_credentials(out)["state"] == "trusted"


def test_half_configured_identity_is_an_error(config, monkeypatch, tmp_path):
    monkeypatch.setenv("KINEMA_C2PA_CERT", str(tmp_path / "x.pem"))
    with pytest.raises(cr.CredentialsError):
        cr.default_identity()
    with pytest.raises(cr.CredentialsError):
        cr.SigningIdentity.from_files(tmp_path / "missing.pem", tmp_path / "missing.key")
