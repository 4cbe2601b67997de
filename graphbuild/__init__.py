"""graphbuild: embed texts once, build a top-k similarity graph, serve X-CLR soft targets.

Kept import-free on purpose: `graphbuild --help` and the trainer side must not pay for
torch or sentence-transformers at import time.
"""

__version__ = "0.1.0"
