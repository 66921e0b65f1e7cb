"""Building the training cache takes memory bounded by the image's size whatever its shape: a 1 KB PNG of
20000 x 16 px once took 347 MB resized whole at 224 px, and one of 1 x 1,000,000 px would have taken 262 GB.

Measured in a child process with its address space capped, as tests/test_predict_memory.py measures predict.
"""

from __future__ import annotations

import json
import sys

import pytest
from helpers import run_child
from PIL import Image
from test_predict_memory import CONFIG

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, sets RLIMIT_AS")

_BUILD = """
from pipeline.data.cache import build_cache, open_cache
cap_memory()
before = peak_mib()
built = build_cache([Path(sys.argv[1])], ["strip"], json.loads(sys.argv[2]), Path(sys.argv[3]), workers=1)
print(json.dumps({"shape": open_cache(built).shape, "mib": peak_mib() - before}))
"""


@pytest.mark.parametrize(("width", "height"), [(20_000, 16), (1, 1_000_000), (1_000_000, 1)])
def test_caching_a_thin_strip_takes_one_decoded_copy_plus_a_constant(tmp_path, width, height):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (width, height), (200, 30, 30)).save(strip)
    proc = run_child(_BUILD, str(strip), json.dumps(CONFIG), str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    decoded_mib = width * height * 4 / 2**20  # PIL keeps RGB in 4 bytes a pixel
    assert result["shape"] == [1, 3, 256, 256] and result["mib"] < decoded_mib + 32, result
