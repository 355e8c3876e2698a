"""Layer `core`: what every layer may use: errors (`errors.py`), atomic file writes and the
directory lock (`files.py`), the device mesh and logical-axis sharding (`sharding.py`), and the
huge-pages launcher for CPU hosts (`hugepages.py`).

May import: nothing from lmjax outside `core`.
"""
