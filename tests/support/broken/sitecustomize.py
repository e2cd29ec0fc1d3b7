"""Test-only: breaks the real detector on purpose, in every process of a gateway started
with this directory on PYTHONPATH and CUSTODY_TEST_BREAK_DETECTOR=1 (the masking workers
are separate processes, so a monkeypatch in the test would not reach them).

A string containing BREAK-THE-DETECTOR makes detection raise; HANG-THE-DETECTOR makes it
never return.
"""

import os
import time

if os.environ.get("CUSTODY_TEST_BREAK_DETECTOR"):
    from addons.engine import detectors

    _find = detectors.Detector.find

    def find(self, text, *args, **kwargs):
        if "BREAK-THE-DETECTOR" in text:
            raise RuntimeError("the detector was broken on purpose")
        if "HANG-THE-DETECTOR" in text:
            time.sleep(3600)
        return _find(self, text, *args, **kwargs)

    detectors.Detector.find = find
