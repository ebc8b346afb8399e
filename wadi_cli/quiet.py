"""Silence import-time chatter of optional dependencies that says nothing about the work
being done (the CLI and wadi's own worker processes call this; a library import does not).

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  …Pil" on every pipeline load (wadi never uses image processors);
- bitsandbytes' CPU backend: "Failed to load CPU gemm_4bit_forward from kernels-community"
  whenever peft imports it (4-bit kernels wadi never uses).

Everything else from these libraries still shows; ``WADI_DEBUG=1`` shows these too.
"""

from __future__ import annotations

import logging
import os


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def quiet_third_party_logs() -> None:
    """Install the filters (idempotent)."""
    if os.environ.get("WADI_DEBUG"):
        return
    targets = {
        "transformers.utils.import_utils": "requires torchvision (not installed)",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    }
    for name, needle in targets.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(needle))
