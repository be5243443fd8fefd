"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

from lingua_scheduler.server.proto import scheduler_pb2 as pb


def spec(**overrides: Any) -> pb.JobSpec:
    fields: dict[str, Any] = dict(tenant_id="acme", session_id="s1", utterance_index=0, src_lang="zh",
                                  tgt_lang="en", payload=b"audio")
    fields.update(overrides)
    return pb.JobSpec(**fields)


def pair(src: str = "zh", tgt: str = "en") -> pb.LanguagePair:
    return pb.LanguagePair(src_lang=src, tgt_lang=tgt)
