"""Dynamic batching in embedding workers: concurrent small jobs share one forward pass.

A worker running several embedding jobs of one model at once hands their texts to the model's
`EmbedBatcher`. Its thread takes the first waiting job, gathers more for up to `batch_wait_ms`
(or until `max_batch_texts`), runs one `embed` call for all of them and splits the vectors back
per job. Jobs that queue up while a forward pass runs are merged into the next one. Batch-lane
chunks bypass it: they are big batches already, and must embed bit for bit the same when a
resumed run sends them again.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from . import metrics
from .jobs import Usage
from .providers.base import Embeddings, Provider


@dataclass
class _Waiting:
    texts: list[str]
    normalize: bool | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Embeddings | None = None
    error: BaseException | None = None


class EmbedBatcher:
    """Merges concurrent `embed` calls on one provider into fewer, larger ones."""

    def __init__(self, provider: Provider, *, max_texts: int, wait_s: float):
        self.provider = provider
        self.max_texts = max_texts
        self.wait_s = wait_s
        self._waiting: queue.Queue[_Waiting] = queue.Queue()
        threading.Thread(target=self._loop, name=f"embed-batcher-{provider.model.name}",
                         daemon=True).start()

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        """Vectors for `texts`, computed together with whatever other jobs wait meanwhile."""
        job = _Waiting(texts, normalize)
        self._waiting.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _loop(self) -> None:
        while True:
            batch = self._gather(self._waiting.get())
            for _, group in itertools.groupby(sorted(batch, key=lambda j: str(j.normalize)),
                                              key=lambda j: j.normalize):
                self._run(list(group))

    def _gather(self, first: _Waiting) -> list[_Waiting]:
        batch, size = [first], len(first.texts)
        deadline = time.monotonic() + self.wait_s
        while size < self.max_texts:
            try:
                job = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            batch.append(job)
            size += len(job.texts)
        return batch

    def _run(self, jobs: list[_Waiting]) -> None:
        texts = [text for job in jobs for text in job.texts]
        metrics.EMBED_PASSES.labels(self.provider.model.name).inc()
        try:
            output = self.provider.embed(texts, jobs[0].normalize)
        except BaseException as exc:
            if len(jobs) > 1:  # one bad job must not fail the others: run each alone
                for job in jobs:
                    self._run([job])
                return
            jobs[0].error = exc
            jobs[0].done.set()
            return
        start = 0
        total_chars = sum(len(text) for text in texts) or 1
        for job in jobs:
            vectors = output.vectors[start:start + len(job.texts)]
            start += len(job.texts)
            # The engine counts tokens for the whole pass; each job gets its share by length.
            tokens = round(output.usage.prompt_tokens * sum(len(t) for t in job.texts) / total_chars)
            job.result = Embeddings(vectors, Usage(prompt_tokens=tokens, total_tokens=tokens))
            job.done.set()
