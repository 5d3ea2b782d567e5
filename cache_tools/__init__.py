"""kdcache: an offline teacher-logit cache and streaming knowledge distillation.

One import namespace: the cache contract (``kdcache.store``, ``kdcache.views``,
``kdcache.targets`` ...), precompute (``kdcache.pipeline``), training (``kdcache.train``),
the tools (``kdcache.tools``: validate, verify, inspect statistics) and the command line
(``kdcache.cli``). ``pipeline`` and ``train`` build on the contract and never on each other.
"""

__version__ = "0.2.0"
