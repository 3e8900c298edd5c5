"""Wiring: builds the library's collaborators from :class:`~moderation.config.Settings`.

The CLI, the Celery workers and the admin console each hold one :class:`Runtime` per process.
Everything heavy (encoder weights, key ring, decrypted blocklist) is created on first use, and
the modules behind the encoder, the blocklist and screening (torch, ONNX Runtime, FAISS) are
imported only then: the web tier (``moderation serve``), which answers from the database,
never loads them (README "Process footprint"; the ``lean-web-tier`` import-linter contract).
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from moderation.banks.encoder_chains import encoder_chains
from moderation.banks.faiss_threads import set_faiss_threads
from moderation.banks.importer import ImportHooks
from moderation.banks.sealed_fields import migration_attributes
from moderation.config import ConfigurationError, Settings
from moderation.crypto.keys import KeyRing, load_keyring
from moderation.matching.policy import Policy, load_policy
from moderation.media.decode import DecodeLimits
from moderation.storage.db import create_db_engine, migrate, schema_is_current, session_factory

if TYPE_CHECKING:
    from moderation.banks.blocklist import Blocklist
    from moderation.banks.shards import ShardSearch
    from moderation.matching.candidates import CandidateRefiner
    from moderation.matching.preparing import Preparer
    from moderation.matching.screening import Screener
    from moderation.media.video import VideoLimits
    from moderation.signals.encoders import Encoder

logger = logging.getLogger(__name__)


class NotInitialisedError(ConfigurationError):
    """The data directory or database has not been set up (run ``moderation init``)."""


class Runtime:
    """Process-wide collaborators built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Set by a screening worker when index_shards > 1 (workers/shards.py): its blocklists'
        # cosine searches then go to the shard workers (moderation.banks.shards).
        self.shard_search: ShardSearch | None = None
        # FAISS's thread count, applied when (if ever) this process imports FAISS.
        set_faiss_threads(settings.faiss_threads)

    @cached_property
    def engine(self) -> Engine:
        """The SQLAlchemy engine for ``settings.sqlalchemy_url``."""
        return create_db_engine(
            self.settings.sqlalchemy_url, pool_size=self.settings.database_pool_size
        )

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        """Session factory bound to :attr:`engine`."""
        return session_factory(self.engine)

    def check_initialised(self) -> None:
        """Raise :class:`NotInitialisedError` unless the schema is current.

        Raises:
            NotInitialisedError: with the command that fixes it.
        """
        url = self.settings.sqlalchemy_url
        if url.startswith("sqlite:///") and not self.settings.resolved_data_dir.exists():
            raise NotInitialisedError(
                f"data directory {self.settings.resolved_data_dir} does not exist: "
                "run `moderation init` first"
            )
        if not schema_is_current(self.engine):
            raise NotInitialisedError(
                "the database schema is missing or out of date: run `moderation init`"
            )

    @cached_property
    def keyring(self) -> KeyRing:
        """Master keys from ``MODERATION_MASTER_KEYS`` or the key file."""
        return load_keyring(self.settings)

    def reload_keyring(self) -> None:
        """Forget the cached key ring so the next use re-reads it (key rotation without restart)."""
        self.__dict__.pop("keyring", None)

    @cached_property
    def encoder(self) -> Encoder:
        """The serving encoder (weights load lazily on first use): the configured one, unless
        an encoder migration was promoted (:mod:`moderation.banks.encoder_chains`)."""
        return self.encoder_named(self.serving_encoder_name())

    def encoder_named(self, name: str) -> Encoder:
        """The encoder called ``name`` with this process's device, runtime, cache and threads.
        ``torch_threads`` sets torch's thread count for PyTorch encoders and ONNX Runtime's for
        the torch-free one; ``encoder_precision`` and ``encoder_calibration_dir`` apply to the
        configured encoder only (a migration's other encoder runs at fp32).

        Raises:
            ValueError, FileNotFoundError: as :func:`moderation.signals.encoders.create_encoder`.
        """
        from moderation.service.encoder_preload import configured_encoder

        encoder = configured_encoder(self.settings, name)
        if encoder.uses_torch and self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        return encoder

    def serving_encoder_name(self) -> str:
        """The name of the encoder whose snapshots serve: a promoted encoder migration's target
        (its source after a rollback), else ``settings.encoder`` (also when the database cannot
        say: not initialised yet)."""
        try:
            with self.sessions() as session:
                name = encoder_chains(session).serving_name
        except SQLAlchemyError:
            return self.settings.encoder
        return name or self.settings.encoder

    def follow_serving_encoder(self) -> Encoder:
        """Switch :attr:`encoder` to the serving one if a promotion or rollback happened since
        this process chose it (a long-lived web or CLI process before a bank change); returns
        it. Callers embed after this, so the snapshot check never sees a stale encoder.

        The first choice in a process is not loaded here (the first embedding loads it): a
        web process that writes a snapshot needs only the encoder's id, which for the default
        encoder is the digest of its weights file, not the model in memory."""
        name = self.serving_encoder_name()
        if "encoder" not in self.__dict__:
            self.__dict__["encoder"] = self.encoder_named(name)
        if self.encoder.name == name:
            return self.encoder
        return self.switch_encoder(name)

    def switch_encoder(self, name: str) -> Encoder:
        """Serve with the encoder called ``name`` from now on (a worker following a promotion
        or rollback); returns it, loaded."""
        encoder = self.encoder_named(name)
        encoder.load()
        self.__dict__["encoder"] = encoder
        return encoder

    @cached_property
    def policy(self) -> Policy:
        """The active policy, validated (loading it notifies a ``policy`` change: the canary
        runs when the policy differs from the one it last measured)."""
        policy = load_policy(self.settings.policies_dir, self.settings.policy)
        self.notify_change("policy")
        return policy

    def policy_named(self, name: str | None) -> Policy:
        """The policy ``policies/<name>.yaml`` (None: the active one), validated once per
        process (an API client's own policy, :mod:`moderation.service.tenancy`).

        Raises:
            PolicyError: as :func:`load_policy`.
        """
        if name is None or name == self.settings.policy:
            return self.policy
        cache: dict[str, Policy] = self.__dict__.setdefault("_named_policies", {})
        if name not in cache:
            cache[name] = load_policy(self.settings.policies_dir, name)
        return cache[name]

    @cached_property
    def limits(self) -> DecodeLimits:
        """Decode limits from settings."""
        return DecodeLimits.from_settings(self.settings)

    @cached_property
    def video_limits(self) -> VideoLimits:
        """Video limits and sampling from settings."""
        from moderation.media.video import VideoLimits  # PyAV: not in the web tier until used

        return VideoLimits.from_settings(self.settings)

    def load_blocklist(self, shadow: Encoder | None = None) -> Blocklist:
        """Decrypt the current snapshot into memory (fail closed on any error); with the encoder
        on CUDA, its flat cosine index is searched on the GPU when FAISS GPU is installed; with
        :attr:`shard_search` set, its cosine searches go to the shards instead.
        ``shadow``: the newest snapshot of that encoder's chain instead (a migration target)."""
        from moderation.banks.blocklist import load_blocklist

        encoder = shadow or self.encoder
        with self.sessions() as session:
            blocklist = load_blocklist(
                session,
                self.keyring,
                self.settings.snapshots_dir,
                encoder_id=str(encoder.id),
                dim=encoder.dim,
                own_chain=shadow is not None,
            )
        if encoder.device.type == "cuda":
            # Search a GPU copy when FAISS GPU is installed (flat indexes; never run on a GPU
            # here, see README "What has never run on a GPU").
            on_gpu = blocklist.cosine.use_gpu()
            logger.info("cosine index searched on %s", "GPU" if on_gpu else "CPU")
        if self.shard_search is not None and shadow is None:
            from moderation.banks.shard_index import ShardedCosineIndex

            blocklist.cosine = ShardedCosineIndex.over(
                blocklist.cosine, self.shard_search, blocklist.snapshot_id, blocklist.version
            )
        return blocklist

    def classifier_stage(self) -> CandidateRefiner | None:
        """The classifier stage with the active model for this encoder, or None (stage off in
        settings, or no model trained yet: ``moderation classifier train``)."""
        if not self.settings.classifier:
            return None
        from moderation.matching.classifier.model import active_model
        from moderation.matching.classifier.stage import ClassifierStage, WindowBand

        with self.sessions() as session:
            model = active_model(session, str(self.encoder.id))
        if model is None:
            return None
        return ClassifierStage(
            model,
            self.encoder,
            windows=WindowBand(enabled=self.settings.classifier_windows),
            batch_size=self.settings.batch_size,
            feature_windows=self.settings.classifier_feature_windows,
            local_features=self.settings.classifier_local_features,
        )

    def import_hooks(self) -> ImportHooks:
        """What the classifier stage adds to a bank import (entry windows, training copies and
        their labelled pairs; none when the stage is off in settings), and the golden set's
        canary copies and negatives (:mod:`moderation.matching.golden`)."""
        from moderation.matching.golden import golden_collector, with_golden

        hooks = ImportHooks()
        if self.settings.classifier:
            from moderation.matching.classifier.synthetic import import_hooks

            hooks = import_hooks(self)
        collector = golden_collector(self)
        return hooks if collector is None else with_golden(self, hooks, collector)

    def notify_change(self, reason: str) -> None:
        """Tell the registered listeners (:mod:`moderation.service.model_events`: the canary's
        run request) that a snapshot, classifier model, policy or encoder changed."""
        from moderation.service.model_events import notify_change

        notify_change(reason)

    def preparer(self) -> Preparer:
        """A :class:`~moderation.matching.preparing.Preparer` for the serving encoder: decodes,
        hashes and preprocesses uploads before the model or the blocklist is loaded."""
        from moderation.matching.preparing import Preparer

        return Preparer.from_settings(self.encoder, self.settings)

    def screener(
        self, blocklist: Blocklist | None = None, refiner: CandidateRefiner | None = None
    ) -> Screener:
        """A :class:`Screener` over the current (or the given) blocklist, with the classifier
        stage when one is active (unless ``refiner`` is given)."""
        from moderation.matching.screening import Screener

        self.encoder.load()  # weights load now, not inside the first screening's timings
        if refiner is None:
            refiner = self.classifier_stage()
        return Screener(
            encoder=self.encoder,
            blocklist=blocklist or self.load_blocklist(),
            policy=self.policy,
            limits=self.limits,
            video_limits=self.video_limits,
            batch_size=self.settings.batch_size,
            refiner=refiner,
        )

    def shadow_screener(self, name: str) -> Screener:
        """A :class:`Screener` with the encoder called ``name`` over the newest snapshot of its
        own chain (an encoder migration's target; no classifier stage, whose models belong to
        one encoder).

        Raises:
            SnapshotError, BlocklistError, CryptoError: its snapshot cannot be loaded.
        """
        from moderation.matching.screening import Screener

        encoder = self.encoder_named(name)
        encoder.load()
        return Screener(
            encoder=encoder,
            blocklist=self.load_blocklist(shadow=encoder),
            policy=self.policy,
            limits=self.limits,
            video_limits=self.video_limits,
            batch_size=self.settings.batch_size,
        )


def prepared_runtime(settings: Settings) -> Runtime:
    """A :class:`Runtime` over a data directory made ready to use: its folders created, a dev key
    file created when no master keys are configured (with the warning of
    :func:`~moderation.crypto.keys.load_keyring`), and the database schema migrated to the current
    revision. The embedded mode's one-call set-up, for the demo, the benchmarks and tests;
    ``moderation init`` does the same and also records the audit event and prints the keys.

    Raises:
        moderation.config.ConfigurationError: unusable data directory or key configuration.
    """
    settings.ensure_dirs()
    load_keyring(settings, create_dev=True)
    runtime = Runtime(settings)
    migrate(runtime.engine, attributes=migration_attributes(runtime.keyring))
    return runtime
