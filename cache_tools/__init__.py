"""kdcache's cache contract: store format, view recipes and replay, shared data helpers, tools.

``pipeline`` (writing) and ``train`` (reading) both build on this package and never on each other.
"""

__version__ = "0.1.0"
