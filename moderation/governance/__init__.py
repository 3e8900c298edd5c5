"""Governance over the service's decisions: review, approvals, erasure, users and keys.

Owns :mod:`.review` (the review queue: claims, leases, decisions, reveals), :mod:`.approvals`
(two-step bank changes), :mod:`.gdpr` (data-subject access, erasure and legal holds),
:mod:`.users` (console accounts, roles, TOTP), :mod:`.keys` (master-key rotation) and
:mod:`.dashboard` (the console's operational figures). It may import the service layer and
everything below it; only the benchmark and CLI layers (and ``admin``/``workers``) import it.
"""
