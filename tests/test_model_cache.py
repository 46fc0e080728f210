"""A worker keeps the models it used last loaded, not every version it ever loaded: each retrain
of a fabric left its old version in a long-lived GPU worker's memory."""

from __future__ import annotations

import logging

from sqlalchemy import select

from storage.schema import Model


def test_the_worker_keeps_the_models_used_last(make_inline_ctx, caplog) -> None:
    ctx = make_inline_ctx(256, versions=("v1", "v2", "v3"))
    ctx.settings = ctx.settings.model_copy(update={"max_cached_models": 2})
    # a command run in this process before (cli.main) may have left the root logger quieter
    with ctx.session() as session, caplog.at_level(logging.WARNING, logger="worker.context"):
        models = {m.version: m for m in session.scalars(select(Model))}
        first = {v: ctx.detector(models[v]) for v in ("v1", "v2")}
        assert ctx.detector(models["v1"]) is first["v1"]  # cached; and now used last
        ctx.detector(models["v3"])  # one too many: v2, used least recently, goes
        assert ctx.detector(models["v1"]) is first["v1"]
        again = ctx.detector(models["v2"])  # loaded again (and v3 goes)
        assert again is not first["v2"] and again.threshold == first["v2"].threshold
    assert (
        "model v2 dropped from the cache to load v3 (it keeps 2: ROLLSCAN_MAX_CACHED_MODELS)"
        in (caplog.text)
    )
