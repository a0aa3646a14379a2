"""The `kinema mark` and `kinema verify` commands (the CLI functions in kinema.cli stay thin)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def run_mark(
    input: Path,
    output: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    no_watermark: bool = False,
    no_sign: bool = False,
    model_name: str | None = None,
    source_type: str | None = None,
    json_out: bool = False,
) -> dict:
    from . import mark_video
    from .credentials import SigningIdentity

    if (cert is None) != (key is None):
        raise InputError("--cert and --key go together")
    identity = SigningIdentity.from_files(cert, key) if cert and key else None
    facts = mark_video(
        input, output, watermark=not no_watermark, sign=not no_sign, identity=identity, model_name=model_name, source_type=source_type
    )
    if json_out:
        print(json.dumps(facts, indent=2))
    else:
        wm, c2 = facts["watermark"], facts["c2pa"]
        print(f"wrote {output}")
        print(f"  watermark: {'payload ' + wm['payload'] if wm else 'off'}")
        print(f"  content credentials: {'signed by ' + c2['signer'] if c2 else 'off'}")
    return facts


def run_verify(file: Path, *, json_out: bool = False, trust: list[Path] | None = None, no_watermark: bool = False) -> dict:
    from . import verify_file

    report = verify_file(file, trust=trust, watermark=not no_watermark)
    if json_out:
        print(json.dumps(report, indent=2))
        return report
    print(f"{file}")
    wm = report.get("watermark")
    if wm is not None:
        if wm["detected"]:
            print(f"  watermark: DETECTED, payload {wm['payload'] or '(not recoverable)'}, false-positive probability {wm['p_value']:.2g}")
        else:
            print(f"  watermark: not detected (p = {wm['p_value']:.2g})")
    c2 = report["c2pa"]
    state = c2["state"]
    line = {
        "trusted": "valid and signed by a trusted identity",
        "valid": "valid signature and hashes; signer not in your trust anchors",
        "invalid": "INVALID (the file changed after signing, or the manifest is broken)",
        "absent": "none",
    }[state]
    print(f"  content credentials: {line}")
    if state != "absent":
        signer = c2.get("signer") or {}
        if signer:
            print(f"    signer: {signer.get('common_name', '?')} ({signer.get('issuer', '?')})")
        if c2.get("digital_source_type"):
            print(f"    source: {c2['digital_source_type']}")
        gen = c2.get("generation") or {}
        if gen.get("model"):
            print(f"    model: {gen['model']}, kinema {gen.get('kinema_version', '?')}")
        if c2.get("errors"):
            print(f"    errors: {', '.join(c2['errors'])}")
    if "soft_binding_matches_watermark" in report:
        print(f"  watermark matches credentials: {'yes' if report['soft_binding_matches_watermark'] else 'no'}")
    return report
