"""Model operations: golden-set canary with SLOs, drift monitoring, encoder migration.

Layer (pyproject.toml import-linter): between ``governance`` and ``service``; it may import
service, matching, banks, signals, media, audit, crypto, storage and config, and is imported by
governance, benchmark and cli.
"""
