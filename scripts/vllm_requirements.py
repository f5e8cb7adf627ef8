"""What scripts/install_vllm.sh installs beside vLLM: its dependencies for this machine, less the ones Axion pins
newer or that break our torch, and constraints holding Axion's own requirements at their installed versions.

    python scripts/vllm_requirements.py PACKAGE REQUIREMENTS_OUT CONSTRAINTS_OUT
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement

# Pinned by Axion (newer than vLLM allows; vLLM runs on ours), or builds of torch's companions that fail to load
# beside our torch ("operator torchvision::nms does not exist") and that text generation does not use.
LEFT_OUT = {"transformers", "llguidance", "torch", "torchvision", "torchaudio", "torchcodec", "setuptools"}


def wanted(package: str) -> list[str]:
    out = []
    for line in metadata.requires(package) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name.lower() not in LEFT_OUT:
            out.append(str(requirement).split(";")[0])
    return out


def held() -> list[str]:
    """Axion's requirements as installed now: vLLM's dependencies may not move them."""
    names = {Requirement(line).name for line in metadata.requires("axion") or [] if "extra ==" not in line}
    return [f"{name}=={metadata.version(name)}" for name in sorted(names)]


if __name__ == "__main__":
    package, requirements, constraints = sys.argv[1:4]
    with open(requirements, "w") as out:
        out.write("\n".join(wanted(package)) + "\n")
    with open(constraints, "w") as out:
        out.write("\n".join(held()) + "\n")
