"""Each paper's evaluation protocol on LFW, one module each: tip_im (identification under image-specific
protection), opom (person masks), apf (verification attack success rate) and advcloak (person-mask methods
compared at one L2 norm).

The protocols that `eval robustness` re-scores after each transform have a robustness adapter in their module
(`robustness_adapter(request)`, see faceveil.evaluate.robustness); ROBUSTNESS is the one list of them. This file
imports nothing heavy, so that the command line's `--help` can read the list without loading torch."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from faceveil.errors import FaceveilError

if TYPE_CHECKING:
    from faceveil.evaluate.robustness import Adapter, Request

# protocol name -> its module in this package, for the protocols with a robustness adapter
ROBUSTNESS = {"tip-im": "tip_im", "opom": "opom", "apf": "apf"}


def robustness_module(protocol: str) -> ModuleType:
    """The module holding `protocol`'s robustness adapter (imported on first use: it loads torch)."""
    return importlib.import_module(f"{__name__}.{ROBUSTNESS[protocol]}")


def require_protocol(protocol: str) -> None:
    if protocol not in ROBUSTNESS:
        raise FaceveilError(f"unknown protocol {protocol!r}; known: {', '.join(ROBUSTNESS)}")


def adapter_for(protocol: str, request: Request) -> tuple[Adapter, dict]:
    """The protocol's robustness adapter for this request, and the settings it resolved (for the results)."""
    require_protocol(protocol)
    if request.strength is not None and protocol != "tip-im":
        raise FaceveilError(f"--strength measures protect's recipes on the tip-im protocol, not on {protocol}")
    return robustness_module(protocol).robustness_adapter(request)
