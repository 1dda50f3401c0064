"""The worker process's entry point: ``dramatiq workers.main`` (or ``outreach worker``) imports this module.

The broker is set up from ``OUTREACH_BROKER_URL`` before any actor is declared. When a broker is already
installed in this process (a test that imports it after installing an in-process one), nothing is changed. A
separate worker process builds its runtime at import and freezes its start-up heap
(:func:`outreach.service.runtime.freeze_startup_heap`). Importing :mod:`workers` or :mod:`workers.actors` does
none of this.
"""

from __future__ import annotations

from outreach.service import broker as _broker

if _broker.installed_broker() is None:
    from outreach.core.config import get_settings
    from outreach.core.errors import ConfigurationError
    from outreach.core.logs import configure_logging

    _settings = get_settings()
    configure_logging(_settings.log_level)
    if not _settings.broker_url:
        raise ConfigurationError(
            "OUTREACH_BROKER_URL is not set: separate worker processes need Redis (redis://…) or RabbitMQ "
            "(amqp://…); `outreach up` runs its workers in-process without one"
        )
    from workers.actors import install

    install(_broker.build_broker(_settings))

    # Load campaigns, templates and policies now (a broken file stops the worker at start, not at its first
    # message), then keep that start-up heap out of the garbage collector's full collections.
    from outreach.service.runtime import freeze_startup_heap, get_runtime

    get_runtime()
    freeze_startup_heap()
