"""Near-duplicate detection of banned images against encrypted blocklists.

The library behind the ``moderation`` CLI, the Celery workers and the admin console. It never
imports flask, celery, ``admin`` or ``workers``.
"""

__version__ = "0.1.0"
