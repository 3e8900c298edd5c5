"""The screening service, library side: uploads, the queue, callbacks and API clients.

Owns :mod:`.runtime` (the per-process wiring of settings, database, key ring, encoder, policy
and blocklist), :mod:`.uploads` (encrypted upload blobs), :mod:`.subjects` (data-subject
pseudonyms), :mod:`.queue` (submit, process and reconcile uploads), :mod:`.dispatch` (sending
work after commit, without Celery), :mod:`.callbacks` (signed platform callbacks),
:mod:`.api_clients` (bearer tokens and callback allowlists), :mod:`.results` (the public result
object), :mod:`.metrics` (Prometheus), :mod:`.operations` (screen files in-process) and
:mod:`.platform_client` (the Python client platforms use). It may import matching and every
layer below; never governance, benchmark or CLI. Celery tasks and Flask views call into it.
"""
