"""LoRAs for the Wan DiT: read a file in any of the shared formats (`formats`), merge it into
the weights or hang it beside them as a side branch, and take it off again (`apply`).

    manager = LoraManager([pipe.transformer, pipe.transformer_2])
    report = manager.apply([LoraSpec("high.safetensors", target="high"),
                            LoraSpec("low.safetensors", target="low")])
    report.records()   # file, sha256, strength, target, ... for the sidecar / C2PA manifest
    manager.apply([])  # every weight back, bit-exact
"""

from .apply import (AppliedLora, LoraManager, LoraReport, LoraSpec, LoraWarning, as_spec, parse_lora_arg,
                    resolve_loras)
from .formats import Delta, LoraFile, ModelIndex, check_lora_file, detect_format, match_lora, read_lora

__all__ = [
    "AppliedLora", "Delta", "LoraFile", "LoraManager", "LoraReport", "LoraSpec", "LoraWarning",
    "ModelIndex", "as_spec", "check_lora_file", "detect_format", "match_lora", "parse_lora_arg", "read_lora",
    "resolve_loras",
]
