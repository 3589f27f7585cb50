"""``needs_amx``: skip a test where the CPU or build has no AMX bfloat16 tiles (the bf16 products)."""

from __future__ import annotations

import pytest

from looplm.ops import cpp_ext
from looplm.ops.qlinear import bf16_rows

needs_amx = pytest.mark.skipif(not cpp_ext.available() or not bf16_rows(),
                               reason="no AMX bfloat16 tiles on this CPU or build")
