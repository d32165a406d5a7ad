"""Without faiss-cpu or faiss-gpu installed, the index layer says which extra to install."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
sys.modules["faiss"] = None  # as if neither faiss-cpu nor faiss-gpu were installed
from index.faiss_index import import_faiss
try:
    import_faiss()
except RuntimeError as e:
    print(e)
"""


def test_missing_faiss_names_the_extras() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert "pip install 'onetower[cpu]'" in out and "[gpu]" in out
