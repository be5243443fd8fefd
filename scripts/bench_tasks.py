"""The trivial job for the RQ / arq / Celery side of scripts/bench (imported by their workers)."""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar


def noop(i: int) -> int:
    """RQ's job."""
    return i


def celery_app() -> Any:
    from celery import Celery

    url = os.environ["LINGUA_BENCH_REDIS"]
    app = Celery("bench", broker=url, backend=url)
    app.conf.update(task_acks_late=False, worker_prefetch_multiplier=16, result_expires=600)
    return app


if "LINGUA_BENCH_REDIS" in os.environ and os.environ.get("LINGUA_BENCH_SYSTEM", "celery") == "celery":
    try:
        app = celery_app()

        @app.task(name="celery_noop")
        def celery_noop(t0: float) -> tuple[float, float]:
            return t0, time.time()
    except ImportError:  # the arq virtualenv has no Celery
        pass


async def arq_noop(ctx: dict[str, Any], i: int) -> int:
    return i


class ArqSettings:
    functions: ClassVar[list[Any]] = [arq_noop]
    max_jobs = 10
    burst = False
    keep_result = 600

    @staticmethod
    def _redis() -> Any:
        from arq.connections import RedisSettings

        return RedisSettings.from_dsn(os.environ["LINGUA_BENCH_REDIS"])


class ArqTuned:
    """arq at its documented knobs for speed: short polls, more jobs at a time per worker
    (scripts/bench_others.py SETTINGS names the same values). arq reads only a class's own attributes."""

    functions: ClassVar[list[Any]] = [arq_noop]
    poll_delay = 0.01
    max_jobs = 100
    burst = False
    keep_result = 600


if "LINGUA_BENCH_REDIS" in os.environ:
    try:
        ArqSettings.redis_settings = ArqTuned.redis_settings = ArqSettings._redis()  # type: ignore[attr-defined]
    except ImportError:  # the project virtualenv has no arq
        pass
