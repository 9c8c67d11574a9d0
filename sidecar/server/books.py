"""The books of every probe: tokens it sampled = tokens scored + tokens dropped, by reason.

A sender is one probe: an engine (``engine_id``) and a tensor-parallel rank. Its messages
carry its cumulative counts in sampled tokens (``shipped_tokens_total``: in messages handed
to gRPC; ``dropped_total``: dropped in the probe, by reason). ``Books`` keeps, per sender and
across its streams, how far it has counted, and turns each message into increments:

- sampled  += the message's rows + what was lost before it + the probe's new drops
- dropped  += the probe's new drops (its reasons), and ``lost_in_transit``: the rows of the
  messages the sender handed to gRPC that never arrived (a gap in ``shipped_tokens_total``:
  a stream that broke with messages in it)
- the message's rows are then settled once each by the pipeline (``settle``): scored, or
  dropped by the sidecar (``non_finite``, ``state_full``, ``after_finish``,
  ``tp_join_timeout``, ``rejected``, ...).

So per (model, rank) ``circuitwatch_probe_sampled_tokens_total`` equals
``circuitwatch_probe_scored_tokens_total`` plus the sum over reasons of
``circuitwatch_probe_dropped_tokens_total`` whenever no tensor-parallel step waits to be
joined. A message that arrives after a later one of its sender (a stopped sidecar reading
an old connection's last bytes after a new one's) was counted lost already: it is refused
(``is_stale``) and counted nothing.

A sidecar that first hears of a sender (it restarted, or the engine is new) starts the
sender's books at the counts the message carries as its base: the sender's counts as of the
last message it handed to an earlier stream. Drops made while no sidecar was there are after
that base, so they are counted; the rows of messages handed to a sidecar that was killed are
before it and count nowhere (that sidecar's own counters, gone with it, had what it scored).

Under tensor parallelism every rank samples the same tokens: ``circuitwatch_samples_dropped_
total`` (no rank label) takes the probe's drops and the losses in transit from rank 0 only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.protocol.batch import TokenBatch
from sidecar.server.metrics import SidecarMetrics

LOST_IN_TRANSIT = "lost_in_transit"
REJECTED = "rejected"  # rows of a message (or step) the sidecar refused after decoding it
_MAX_REASONS = 32  # per sender: a sender inventing reasons cannot grow memory unbounded


@dataclass
class _Sender:
    shipped: int  # shipped_tokens_total counted so far: received or lost
    dropped: dict[str, int]  # the sender's dropped_total as counted so far


class Books:
    def __init__(self, metrics: SidecarMetrics, max_senders: int = 1024) -> None:
        self.metrics = metrics
        self.max_senders = max_senders
        self._senders: OrderedDict[tuple[str, int], _Sender] = OrderedDict()

    def is_stale(self, batch: TokenBatch) -> bool:
        """True for a message whose rows were already counted lost in transit (a later one
        arrived first). A message without rows (only finished requests) is never stale: its
        total does not tell it from the message before it."""
        sender = self._senders.get((batch.engine_id, batch.rank))
        return (
            sender is not None
            and batch.num_tokens > 0
            and 0 < batch.shipped_tokens_total <= sender.shipped
        )

    def receive(self, batch: TokenBatch, model_name: str) -> None:
        """Count a message's sampled tokens; its rows are ``settle``d later."""
        key = (batch.engine_id, batch.rank)
        sender = self._senders.get(key)
        if sender is None:
            sender = _Sender(batch.base_shipped_tokens_total, dict(batch.base_dropped_total))
            self._senders[key] = sender
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(key)
        n = batch.num_tokens
        # A sender without books (shipped_tokens_total 0) loses nothing we could see.
        shipped = batch.shipped_tokens_total or sender.shipped + n
        drops = {LOST_IN_TRANSIT: max(0, shipped - n - sender.shipped)}
        sender.shipped = max(sender.shipped, shipped)
        for reason, total in batch.dropped_total.items():
            last = sender.dropped.get(reason, 0)
            if reason not in sender.dropped and len(sender.dropped) >= _MAX_REASONS:
                continue
            sender.dropped[reason] = total
            # A total lower than before means the sender restarted its count.
            drops[reason] = drops.get(reason, 0) + (total if total < last else total - last)
        metrics = self.metrics
        rank = metrics.rank_label(str(batch.rank))
        metrics.counter_probe_sampled_tokens.labels(model_name, rank).inc(n + sum(drops.values()))
        for reason, tokens in drops.items():
            if tokens:
                label = metrics.reason_label(reason)
                metrics.counter_probe_dropped_tokens.labels(model_name, rank, label).inc(tokens)
                if batch.rank == 0:  # every rank samples the same tokens: count them once
                    metrics.drop(model_name, label, tokens)

    def settle(
        self, model_name: str, ranks: Iterable[int], reason: str | None, tokens: int
    ) -> None:
        """The fate of ``tokens`` received rows of each of ``ranks``: scored (``reason`` None)
        or dropped by the sidecar for ``reason``."""
        if tokens <= 0:
            return
        metrics = self.metrics
        for rank in ranks:
            label = metrics.rank_label(str(rank))
            if reason is None:
                metrics.counter_probe_scored_tokens.labels(model_name, label).inc(tokens)
            else:
                metrics.counter_probe_dropped_tokens.labels(model_name, label, reason).inc(tokens)
