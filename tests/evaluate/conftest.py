"""Make this folder's helper module (loadgen_fakes) importable under --import-mode=importlib.

No __init__.py on purpose: a package here would be named `evaluate` and could shadow the
Hugging Face `evaluate` library that lm-eval imports.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
